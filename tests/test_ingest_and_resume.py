"""Ingest: any band count, nodata and masks honoured, georeferencing in attributes; resume."""

import numpy as np
import pytest
import rasterio
import zarr
from conftest import SCENE, write_tif
from helpers import class_map, run

from segpipe.errors import InputError
from segpipe.geometry import read_geo
from segpipe.io.scene import Scene
from segpipe.io.store import Marks


def test_multiband_ingest_keeps_pixels_nodata_and_georeferencing(tmp_path, client):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 5000, size=(4, 700, 650), dtype=np.uint16)
    data[:, 100:200, 300:420] = 9999
    src = write_tif(tmp_path / "four.tif", data, nodata=9999)
    out = tmp_path / "out"
    run(client, out, input=str(src), bands=[4, 2], tile_size=256, pixels="copy",
        method={"name": "kmeans", "params": {"k": 2}})
    g = zarr.open_group(str(out / "scene.zarr"), mode="r")
    assert g["image"].shape == (2, 700, 650) and g["image"].chunks == (2, 256, 256)
    np.testing.assert_array_equal(g["image"][:], data[[3, 1]])
    valid = g["valid"][:] > 0
    assert not valid[100:200, 300:420].any() and valid.sum() == 700 * 650 - 100 * 120
    crs, transform = read_geo(dict(g.attrs))
    with rasterio.open(SCENE) as s:
        assert crs == s.crs and transform == s.transform
    assert g.attrs["bands"] == [4, 2]
    assert (class_map_of(out)[100:200, 300:420] == 255).all()


def class_map_of(out):
    return np.asarray(zarr.open_array(str(out / "result.zarr"), path="class", mode="r")[:])


def test_internal_mask_is_honoured(tmp_path, client):
    data = np.full((1, 300, 300), 500, np.uint16)
    src = write_tif(tmp_path / "masked.tif", data)
    with rasterio.open(src, "r+") as ds:
        mask = np.full((300, 300), 255, np.uint8)
        mask[:50] = 0
        ds.write_mask(mask)
    out = tmp_path / "out"
    run(client, out, input=str(src), tile_size=256, chunk_size=128, method={"name": "otsu"})
    valid = zarr.open_array(str(out / "scene.zarr"), path="valid", mode="r")
    assert valid[:][:50].sum() == 0 and valid[:][50:].all()
    # all-valid chunk rows are never written (the array reads as valid where unwritten): only row 0 is stored
    assert valid.fill_value == 1 and valid.nchunks_initialized == 3
    scene = Scene(str(out / "scene.zarr"))
    assert scene.group.attrs["all_valid"] is False
    np.testing.assert_array_equal(scene.valid_in((slice(40, 60), slice(None))), valid[40:60] > 0)


def test_a_scene_valid_everywhere_is_marked_so_and_reads_as_valid(tmp_path, client):
    """No validity chunk written: the store says so, and readers get all-true windows of the right shape."""
    src = write_tif(tmp_path / "full.tif", np.arange(300 * 280, dtype=np.uint16).reshape(1, 300, 280))
    out = tmp_path / "out"
    run(client, out, input=str(src), tile_size=256, chunk_size=128, method={"name": "otsu"})
    scene = Scene(str(out / "scene.zarr"))
    assert scene.group.attrs["all_valid"] is True and scene.valid.nchunks_initialized == 0
    for where in [(slice(None), slice(None)), (slice(250, 400), slice(10, 20)), (slice(5, 5), slice(0, 3))]:
        got = scene.valid_in(where)
        assert got.dtype == bool and got.all()
        assert got.shape == np.zeros((300, 280))[where].shape


def test_validity_of_a_store_from_an_older_version_is_written_in_full(tmp_path, client):
    """A scene store made with fill value 0 (before unwritten meant valid) must get every window written."""
    from segpipe.config import job_from_dict
    from segpipe.tiling.ingest import ingest, source_info

    out = tmp_path / "out"
    job = job_from_dict({"input": str(SCENE), "output": str(out), "chunk_size": 128, "method": {"name": "otsu"}},
                        tmp_path)
    info = source_info(str(SCENE))
    ingest(job, info, client)
    g = zarr.open_group(str(out / "scene.zarr"), mode="r+")
    attrs = dict(g["valid"].attrs)
    del g["valid"]
    g.create_array("valid", shape=info.shape, chunks=(128, 128), dtype="uint8", fill_value=0,
                   dimension_names=("y", "x")).attrs.update(attrs)
    Marks(out / "scene.zarr", "ingest").clear()
    ingest(job, info, client)
    with rasterio.open(SCENE) as ds:
        expect = ds.dataset_mask() > 0
    np.testing.assert_array_equal(zarr.open_array(str(out / "scene.zarr"), path="valid", mode="r")[:] > 0, expect)


def test_rerun_skips_finished_tiles_and_redoes_only_missing_ones(tmp_path, client, tiny_model):
    """The logits work store is scratch, removed after success; a rerun recomputes only what lost tiles need."""
    job = {"input": str(SCENE), "tile_size": 256, "chunk_size": 128,
           "method": {"name": "unet", "model": str(tiny_model), "patch_size": 128}}
    out = tmp_path / "out"
    first = class_map(run(client, out, **job))
    assert not (out / "work.zarr").exists() and not (out / "_segpipe_done" / "work.zarr").exists()
    result = out / "result.zarr"
    marks = Marks(result, "segment")
    assert len(marks.keys()) == 16
    again = run(client, out, **job)  # finished: nothing to redo, no scratch made again
    np.testing.assert_array_equal(class_map(again), first)
    assert not (out / "work.zarr").exists()
    # Simulate a crash that lost two tiles: their marks and pixels are gone.
    arr = zarr.open_array(str(result), path="class", mode="r+")
    for key in ("1_2", "3_0"):
        (marks.dir / key).unlink()
        r, c = map(int, key.split("_"))
        arr[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = 0
    stamps = {k: (marks.dir / k).stat().st_mtime_ns for k in marks.keys()}
    second = class_map(run(client, out, **{**job, "keep_work": True}))
    np.testing.assert_array_equal(first, second)
    assert {k for k in marks.keys() if (marks.dir / k).stat().st_mtime_ns != stamps.get(k)} == {"1_2", "3_0"}
    from segpipe.geometry import Box
    from segpipe.tiling.grid import PatchGrid
    grid = PatchGrid((900, 900), 128, 0.25)
    lost = [Box.rc(256, 512, 512, 768), Box.rc(768, 0, 900, 256)]
    near = {(i, j) for i in range(grid.counts[0]) for j in range(grid.counts[1])
            if any(grid.window((i, j)).overlaps(b) for b in lost)}
    order = [(i, j) for i in range(grid.counts[0]) for j in range(grid.counts[1])]  # every patch is valid here
    batches = [order[k:k + 8] for k in range(0, len(order), 8)]
    expected = sum(len(b) for b in batches if near & set(b))  # whole batches of 8 around the lost tiles
    logits = zarr.open_array(str(out / "work.zarr"), path="logits", mode="r")
    assert logits.nchunks_initialized == expected < len(order)


def test_changed_settings_on_existing_output_are_refused(tmp_path, client):
    out = tmp_path / "out"
    run(client, out, input=str(SCENE), tile_size=256, method={"name": "otsu"})
    with pytest.raises(InputError, match="different input or settings"):
        run(client, out, input=str(SCENE), tile_size=256, method={"name": "otsu", "params": {"classes": 3}})


def test_gdal_virtual_path_input(tmp_path, client):
    """Inputs need not be local files: a GeoTIFF inside a zip, read through GDAL's /vsizip/."""
    import zipfile
    archive = tmp_path / "scene.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(SCENE, "scene.tif")
    src = f"/vsizip/{archive}/scene.tif"
    out = tmp_path / "out"
    o = run(client, out, input=src, tile_size=256, method={"name": "otsu"})
    direct = run(client, tmp_path / "direct", input=str(SCENE), tile_size=256, method={"name": "otsu"})
    np.testing.assert_array_equal(class_map(o), class_map(direct))
    assert zarr.open_group(str(out / "scene.zarr"), mode="r").attrs["source"] == src


def test_patches_without_valid_pixels_are_never_computed(tmp_path, client, tiny_model, sample_pixels):
    from segpipe.tiling.grid import PatchGrid

    data = sample_pixels.copy()
    data[:, 200:700, 100:800] = 0  # a large nodata block (the sample's nodata value is 0)
    src = write_tif(tmp_path / "holes.tif", data, nodata=0)
    out = tmp_path / "out"
    cls = class_map(run(client, out, input=str(src), tile_size=256, chunk_size=128, keep_work=True,
                        method={"name": "unet", "model": str(tiny_model), "patch_size": 128}))
    grid = PatchGrid((900, 900), 128, 0.25)
    valid = data[0] != 0
    expect = {(i, j) for i in range(grid.counts[0]) for j in range(grid.counts[1])
              if valid[grid.window((i, j)).slices].any()}
    assert len(expect) < grid.counts[0] * grid.counts[1]
    logits = zarr.open_array(str(out / "work.zarr"), path="logits", mode="r")
    assert logits.nchunks_initialized == len(expect)
    assert (cls[~valid] == 255).all() and (cls[valid] != 255).all()
