"""Cutting a scene into tiles and putting it back: the scene grid and its geometry, ingest into scene.zarr,
scene statistics, model patches, resampling to a model's pixel size, and stitching tiles into the result."""
