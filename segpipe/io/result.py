"""The result store: a Zarr v3 group laid out so xarray + rioxarray open it georeferenced.

Layout (CF/rioxarray conventions plus GeoZarr attributes): ``class`` (y, x) uint8 (no data: the ``nodata``
attribute, 255, so plain ``xr.open_zarr`` keeps the dtype and rioxarray reads it) with
``grid_mapping = spatial_ref``, 1-D pixel-centre coordinates ``x`` and ``y``, and a scalar
``spatial_ref`` carrying ``crs_wkt`` and the GDAL ``GeoTransform``. ``truth`` (y, x) is added
when ground truth is given. Volumes have ``class`` (z, y, x) and carry the scene's voxel
geometry (``affine``, ``spacing``, ``origin``, ``direction``) as attributes instead of a CRS, with 1-D
``z``, ``y``, ``x`` voxel-centre coordinates in world mm (S, A, R) where the volume's axes are the world's
(``world_coordinates`` says which). ``probability`` (class_index, [z,] y, x) is added when asked for: its class
axis is not named ``class``, the class map's name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from segpipe.geometry import SceneGeometry
from segpipe.io.store import ensure_array, open_or_create

# The completion mark of a final result tile (one per tile, beside the result store): written by every method
# and stitcher, read by resuming runs and by the change product to know a result is whole.
SEGMENT_STAGE = "segment"
NODATA = 255
# How the class and truth arrays say which value is no data: rioxarray reads ``nodata``, xarray leaves it alone.
# A ``_FillValue`` would make xarray decode the uint8 map to float32 with NaN.
NODATA_ATTRS = {"nodata": NODATA}


def create_result(path: str, fingerprint: dict[str, Any], grid: SceneGeometry, chunk: int,
                  class_names: list[str], shards: tuple[int, int] | None = None) -> zarr.Group:
    """Create (or reopen for resume) the result group on the scene's ``grid``, ``chunk`` per axis, with its
    coordinate variables (a volume's in world millimetres where its axes are the world's).

    ``shards``: Zarr v3 shards of an image's ``class`` array, for a segment stage whose every shard one task
    writes (:func:`segpipe.methods.classical_tiles.class_shards`); None keeps one object per chunk, as every
    other writer of the class map needs. A result made before keeps its layout on resume.
    """
    if grid.is_volume:
        group = open_or_create(path, fingerprint, "result store")
        group.update_attributes({**grid.attrs(), **world_attrs(grid), "kind": "volume", "class_names": class_names,
                            "nodata": NODATA})
        for dim, (values, attrs) in volume_coords(grid).items():
            if dim not in group:
                arr = group.create_array(dim, shape=values.shape, dtype="float64", chunks=values.shape,
                                         dimension_names=(dim,))
                arr[:] = values
                arr.update_attributes(attrs)
        ensure_array(group, "class", grid.shape, (chunk,) * 3, "uint8", NODATA, ("z", "y", "x"),
                     _class_attrs(class_names))
        return group
    return _create_image_result(path, fingerprint, grid, chunk, class_names, shards)


# NIfTI's sform/qform codes: the world frame a volume's affine maps into.
NIFTI_FRAMES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "Talairach", 4: "MNI 152", 5: "template"}


def world_frame(grid: SceneGeometry) -> str:
    """The volume's world frame in words, as the coordinates' attributes name it."""
    return f"RAS+ mm, NIfTI {NIFTI_FRAMES.get(grid.xform_code, 'unknown')} frame"


def volume_coords(grid: SceneGeometry) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """A volume's ``z``, ``y``, ``x`` coordinates: voxel-centre world positions (mm along S, A, R, decreasing on a
    flipped axis), so that xarray selects and rioxarray places by world position as with the NIfTI. Empty for an
    oblique or axis-swapping affine: no per-axis number would be true there (``world_attrs`` says so)."""
    axes = grid.world_axes()
    if axes is None:
        return {}
    frame = world_frame(grid)
    return {dim: (start + step * np.arange(n), {"units": "mm", "axis": dim.upper(), "world_axis": world,
                                                "long_name": f"{world} of the voxel centre ({frame})"})
            for dim, world, n, (start, step) in zip("zyx", "SAR", grid.shape, axes, strict=True)}


def world_attrs(grid: SceneGeometry) -> dict[str, str]:
    """Where a volume lies, in the result's attributes: whether its coordinates give it, or only ``affine`` can."""
    if grid.world_axes() is None:
        how = ("no z/y/x coordinates: the affine is oblique or swaps axes; voxel (z, y, x) lies at "
               "affine @ (x, y, z, 1)")
    else:
        how = "z, y, x coordinates: voxel centres along S, A, R, equal to affine @ (x, y, z, 1)"
    return {"world_frame": world_frame(grid), "world_coordinates": how}


def _class_attrs(class_names: list[str]) -> dict[str, Any]:
    return {**NODATA_ATTRS, "flag_values": list(range(len(class_names))),
            "flag_meanings": " ".join(n.replace(" ", "_") for n in class_names)}


def _create_image_result(path: str, fingerprint: dict[str, Any], grid: SceneGeometry, chunk: int,
                         class_names: list[str], shards: tuple[int, int] | None = None) -> zarr.Group:
    group = open_or_create(path, fingerprint, "result store")
    group.update_attributes({**grid.attrs(), "class_names": class_names, "nodata": NODATA})
    crs, transform, (height, width) = grid.crs, grid.transform, grid.shape
    gt = " ".join(str(v) for v in (transform.c, transform.a, transform.b, transform.f, transform.d,
                                   transform.e))
    if crs is not None and "spatial_ref" not in group:
        sr = group.create_array("spatial_ref", shape=(), dtype="int64", fill_value=0, dimension_names=())
        sr[...] = 0
        sr.update_attributes({"crs_wkt": crs.to_wkt(), "spatial_ref": crs.to_wkt(), "GeoTransform": gt})
    if "x" not in group:
        x = group.create_array("x", shape=(width,), dtype="float64", chunks=(width,), dimension_names=("x",))
        x[:] = transform.c + (np.arange(width) + 0.5) * transform.a
        x.update_attributes({"standard_name": "projection_x_coordinate", "axis": "X"})
        y = group.create_array("y", shape=(height,), dtype="float64", chunks=(height,),
                               dimension_names=("y",))
        y[:] = transform.f + (np.arange(height) + 0.5) * transform.e
        y.update_attributes({"standard_name": "projection_y_coordinate", "axis": "Y"})
    grid_mapping = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"} if crs is not None else {}
    ensure_array(group, "class", (height, width), (chunk, chunk), "uint8", NODATA, ("y", "x"),
                 {**grid_mapping, **_class_attrs(class_names)}, shards=shards)
    return group


def class_outputs(result_path: str) -> tuple[zarr.Array, zarr.Array | None]:
    """The result's ``class`` array and its ``probability`` array when the job asked for one, opened once."""
    group = zarr.open_group(result_path, mode="r+")
    return group["class"], group["probability"] if "probability" in group else None


def record_fit(path: str, state: dict[str, Any]) -> None:
    """A classical method's fitted scene-wide state (thresholds, cluster centres, quantisation) in the result's
    ``fit`` attribute: what a person needs to read a k-means or c-means class, and what a reference
    recomputes the classes from."""
    zarr.open_group(path, mode="r+").attrs["fit"] = state


# The probability's class axis: not ``class``, the class map's name, or xarray would make the map a 2-D coordinate of
# that dimension (and ``sel`` on it fails).
CLASS_DIM = "class_index"


def add_probability_array(path: str, class_names: list[str], shape: tuple[int, ...], chunk: int) -> zarr.Array:
    """``probability`` beside ``class``: (class_index, [z,] y, x) float16 softmax, NaN where no pixel is valid."""
    group = zarr.open_group(path, mode="r+")
    grid_mapping = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"} if "spatial_ref" in group else {}
    dims = (CLASS_DIM, *("z", "y", "x")[-len(shape):])
    return ensure_array(group, "probability", (len(class_names), *shape), (len(class_names), *(chunk,) * len(shape)),
                        "float16", float("nan"), dims, {**grid_mapping, "class_names": class_names})


def add_truth_array(path: str, shape: tuple[int, ...], chunk: int) -> zarr.Array:
    """The ``truth`` array beside ``class``: labels as counted by the metrics (255 = not counted)."""
    group = zarr.open_group(path, mode="r+")
    grid_mapping = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"} if "spatial_ref" in group else {}
    return ensure_array(group, "truth", shape, (chunk,) * len(shape), "uint8", NODATA, ("z", "y", "x")[-len(shape):],
                        {**grid_mapping, **NODATA_ATTRS})
