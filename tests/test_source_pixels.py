"""Tiled GeoTIFFs read in place: the same pixels and class maps as a copy into the scene store."""

import numpy as np
import pytest
import rasterio
import zarr
from conftest import SCENE, write_tif
from helpers import class_map, run

from segpipe.io.scene import Scene
from segpipe.io.source_pixels import SourcePixels


@pytest.fixture(scope="module")
def three_bands(tmp_path_factory):
    rng = np.random.default_rng(3)
    data = rng.integers(1, 4000, size=(3, 700, 650), dtype=np.uint16)
    data[:, 100:180, 200:330] = 0
    return data, write_tif(tmp_path_factory.mktemp("sp") / "three.tif", data, nodata=0)


@pytest.mark.parametrize("key", [
    (slice(None),), (slice(None), slice(10, 300), slice(5, 640)), (0, slice(None), slice(None)),
    (slice(1, 3), 7, slice(None)), (slice(None), slice(None, None, 37), slice(None, None, 13)),
    (2, -1, -3), (slice(None), slice(650, 2000), slice(0, 10)), (Ellipsis, slice(3, 9)), (slice(0, 0),),
    (slice(None), slice(690, 720, 4), slice(3, 1000, 50)),
])
def test_indexing_matches_numpy(three_bands, key):
    data, path = three_bands
    view = SourcePixels(str(path), [3, 1, 2], (700, 650), "uint16", 256)
    expect = data[[2, 0, 1]][key]
    got = view[key]
    assert got.dtype == expect.dtype and got.shape == expect.shape
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("budget", [1, 5000, 40000])
def test_strided_reads_in_small_pieces_match_numpy(three_bands, monkeypatch, budget):
    """A quick-look of a huge scene is read a few rows at a time; the pieces must join up exactly."""
    import segpipe.io.source_pixels as sp

    monkeypatch.setattr(sp, "_STRIDED_BYTES", budget)
    data, path = three_bands
    view = SourcePixels(str(path), [1, 2, 3], (700, 650), "uint16", 256)
    for key in ((slice(None), slice(3, 700, 7), slice(None, None, 5)), (1, slice(None, None, 2), slice(10, 20))):
        np.testing.assert_array_equal(view[key], data[key])


def test_tiled_geotiff_is_read_in_place_with_the_same_results_as_a_copy(tmp_path, client, three_bands):
    data, path = three_bands
    job = {"input": str(path), "tile_size": 256, "bands": [3, 1],
           "method": {"name": "kmeans", "params": {"k": 3}}, "exports": ["cog", "ome-zarr"]}
    a = run(client, tmp_path / "inplace", **job)
    b = run(client, tmp_path / "copy", pixels="copy", **job)
    g = zarr.open_group(str(tmp_path / "inplace" / "scene.zarr"), mode="r")
    assert "image" not in g and g.attrs["pixels"] == "source"  # the pixels were not copied
    assert "image" in zarr.open_group(str(tmp_path / "copy" / "scene.zarr"), mode="r")
    scene = Scene(str(tmp_path / "inplace" / "scene.zarr"))
    np.testing.assert_array_equal(scene.image[:], data[[2, 0]])
    assert scene.chunk == 256 and scene.count == 2
    valid = np.asarray(scene.valid[:]) > 0
    np.testing.assert_array_equal(valid, (data != 0).any(axis=0))
    np.testing.assert_array_equal(class_map(a), class_map(b))
    for name in ("segmentation.tif", "image.ome.zarr"):
        assert (tmp_path / "inplace" / name).exists()
    ome = zarr.open_array(str(tmp_path / "inplace" / "image.ome.zarr"), path="0", mode="r")
    np.testing.assert_array_equal(ome[:], data[[2, 0]])


def test_a_unet_reads_in_place_as_it_reads_a_copy(tmp_path, client, tiny_model):
    job = {"input": str(SCENE), "tile_size": 256, "method": {"name": "unet", "model": str(tiny_model),
                                                             "patch_size": 128}}
    a = run(client, tmp_path / "inplace", **job)
    b = run(client, tmp_path / "copy", pixels="copy", **job)
    assert zarr.open_group(str(tmp_path / "inplace" / "scene.zarr"), mode="r").attrs["pixels"] == "source"
    np.testing.assert_array_equal(class_map(a), class_map(b))


def test_strips_and_misaligned_tiles_are_copied(tmp_path, client, sample_pixels):
    strips = tmp_path / "strips.tif"
    with rasterio.open(SCENE) as src:
        profile = {**src.profile, "tiled": False, "blockysize": 16}
        profile.pop("blockxsize")
    with rasterio.open(strips, "w", **profile) as dst:
        dst.write(sample_pixels)
    for src, chunk in ((strips, 256), (SCENE, 384)):  # strips; 256-px tiles that do not nest with 384 chunks
        out = tmp_path / f"{src.stem}-{chunk}"
        run(client, out, input=str(src), tile_size=chunk, chunk_size=chunk, method={"name": "otsu"})
        g = zarr.open_group(str(out / "scene.zarr"), mode="r")
        assert "image" in g and "pixels" not in g.attrs
        np.testing.assert_array_equal(g["image"][:], sample_pixels)


def test_a_source_without_nodata_is_not_read_at_ingest(tmp_path, client, sample_pixels):
    """No nodata, mask or alpha: every pixel is valid, and nothing is stored but the geometry."""
    src = write_tif(tmp_path / "plain.tif", sample_pixels.clip(1))
    with rasterio.open(src) as ds:
        assert ds.nodata is None
    out = tmp_path / "out"
    run(client, out, input=str(src), tile_size=256, method={"name": "otsu"})
    valid = zarr.open_array(str(out / "scene.zarr"), path="valid", mode="r")
    assert valid.nchunks_initialized == 0 and bool(np.all(valid[:] == 1))
