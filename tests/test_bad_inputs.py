"""Bad input: one line on stderr, exit code 2, and nothing already written is touched."""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import BUILDINGS, DEMO_MODEL, SCENE, write_tif
from helpers import assert_one_line_error, check_error, cli


@pytest.fixture
def existing_output(tmp_path):
    """An output folder holding a previous good result that must survive."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.tif").write_bytes(b"previous good result")
    return out


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def base_job(out: Path, **kw) -> dict:
    return {"input": str(SCENE), "output": str(out), "tile_size": 256, "method": {"name": "otsu"}, **kw}


def test_missing_input(tmp_path, existing_output):
    before = snapshot(existing_output)
    proc = cli(tmp_path, base_job(existing_output, input=str(tmp_path / "nope.tif")))
    assert_one_line_error(proc, "not found", "nope.tif")
    assert snapshot(existing_output) == before


def test_corrupt_tiff(tmp_path, existing_output):
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(SCENE.read_bytes()[:20000])
    before = snapshot(existing_output)
    assert_one_line_error(cli(tmp_path, base_job(existing_output, input=str(bad))), "corrupt.tif")
    assert snapshot(existing_output) == before


def test_not_a_tiff(tmp_path, existing_output):
    bad = tmp_path / "junk.tif"
    bad.write_text("hello")
    assert_one_line_error(cli(tmp_path, base_job(existing_output, input=str(bad))), "not a readable raster")


def test_no_crs(tmp_path, existing_output):
    plain = write_tif(tmp_path / "nocrs.tif", np.ones((1, 300, 300), np.uint8), like=None)
    before = snapshot(existing_output)
    assert_one_line_error(cli(tmp_path, base_job(existing_output, input=str(plain))), "no CRS")
    assert snapshot(existing_output) == before


def test_truth_on_another_crs(tmp_path, existing_output):
    from rasterio.crs import CRS
    gt = write_tif(tmp_path / "gt.tif", np.zeros((1, 900, 900), np.uint8), crs=CRS.from_epsg(32617))
    proc = cli(tmp_path, base_job(existing_output, truth={"path": str(gt)}))
    assert_one_line_error(proc, "another CRS")


def test_truth_on_another_grid(tmp_path, existing_output):
    gt = write_tif(tmp_path / "gt.tif", np.zeros((1, 450, 450), np.uint8))
    assert_one_line_error(cli(tmp_path, base_job(existing_output, truth={"path": str(gt)})), "another grid")


def test_truth_vector_not_overlapping(tmp_path, existing_output):
    import json
    doc = json.loads(BUILDINGS.read_text())
    for f in doc["features"]:
        f["geometry"]["coordinates"] = [[[x - 50000, y] for x, y, *_ in ring] for ring in f["geometry"]["coordinates"]]
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps(doc))
    assert_one_line_error(cli(tmp_path, base_job(existing_output, truth={"path": str(far)})), "overlap")


def test_wrong_band_count_for_model(tmp_path, existing_output, tiny_model):
    rgb = write_tif(tmp_path / "rgb.tif", np.ones((3, 300, 300), np.uint16))
    job = base_job(existing_output, input=str(rgb), method={"name": "unet", "model": str(tiny_model)})
    assert_one_line_error(cli(tmp_path, job), "expects 1 band", "provides 3")


def test_tile_larger_than_scene(tmp_path, existing_output):
    job = base_job(existing_output, tile_size=2048, chunk_size=512)
    assert_one_line_error(cli(tmp_path, job), "tile_size 2048", "larger than the scene")


def test_unsafe_model_file_is_refused(tmp_path, existing_output):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"format": "segpipe-unet2d/1", "x": Evil()}))
    proc = cli(tmp_path, base_job(existing_output, method={"name": "unet", "model": str(bad)}))
    assert_one_line_error(proc, "weights-only")
    assert not (tmp_path / "pwned").exists()


def test_unknown_method_parameter_and_invalid_yaml(tmp_path, existing_output):
    proc = cli(tmp_path, base_job(existing_output, method={"name": "otsu", "params": {"clases": 3}}))
    assert_one_line_error(proc, "clases")
    proc = cli(tmp_path, base_job(existing_output, method={"name": "snake"}))
    assert_one_line_error(proc, "method.name")


@pytest.mark.parametrize("method,words", [
    ({"name": "otsu", "params": {"classes": "three"}}, ["parameter classes", "valid integer", "'three'"]),
    ({"name": "adaptive", "params": {"block_size": 50}}, ["parameter block_size", "must be odd"]),
    ({"name": "edges", "params": {"operator": "prewitt"}}, ["parameter operator", "'prewitt'"]),
    ({"name": "hsv", "params": {"hue": [0.1]}}, ["parameter hue"]),
    ({"name": "kmeans", "params": {"k": 1}}, ["parameter k", "greater than or equal to 2"]),
    ({"name": "fcm", "params": {"m": 1.0}}, ["'fcm' parameter m", "greater than 1"]),
    ({"name": "region_growing", "params": {"seeds": [[5, 5]], "tolerance": "abc"}},
     ["'region_growing' parameter tolerance", "valid number", "'abc'"]),
    ({"name": "region_growing", "params": {"seeds": [[5, 5]]}}, ["'region_growing' parameter tolerance",
                                                                  "Field required"]),
    ({"name": "region_growing", "params": {"tolerance": 10}}, ["needs 'seeds'"]),
    ({"name": "region_growing", "params": {"seeds": [[5, 5]], "tolerance": 10, "connectivity": 3}},
     ["parameter connectivity"]),
    ({"name": "region_growing", "params": {"seeds": [[5, 5], [950, 20]], "tolerance": 10}},
     ["seed (950, 20) lies outside the 900x900 scene"]),
    ({"name": "region_growing", "params": {"seeds_xy": [[0.0, 0.0]], "tolerance": 10}}, ["lies outside the"]),
    ({"name": "model", "model": str(DEMO_MODEL), "params": {"classes": "three"}},
     ["a model takes no params", "['classes']", "patch_size"]),
])
def test_method_parameters_are_typed_and_checked_before_anything_is_written(tmp_path, existing_output, method,
                                                                            words):
    """In this process (the CLI runs the same check; its one-line wrapper: the test above and test_cli)."""
    before = snapshot(existing_output)
    message = check_error(tmp_path, base_job(existing_output, method=method))
    assert all(w in message for w in words), message
    assert snapshot(existing_output) == before


def test_output_from_another_job_is_not_overwritten(tmp_path, client):
    from helpers import run

    out = tmp_path / "o"
    job = base_job(out)
    del job["output"]
    run(client, out, **job)
    before = snapshot(out)
    other = write_tif(tmp_path / "other.tif", np.full((1, 900, 900), 7, np.uint16))
    proc = cli(tmp_path, base_job(out, input=str(other)))
    assert_one_line_error(proc, "different input")
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", ["rotation", "shear"])
def test_a_rotated_or_sheared_geotransform_is_refused_rather_than_misplaced(tmp_path, existing_output, kind):
    import rasterio
    from affine import Affine
    from conftest import write_tif

    with rasterio.open(SCENE) as ds:
        data, t = ds.read(), ds.transform
    skew = Affine.rotation(10) if kind == "rotation" else Affine.shear(0, 5)  # shear: only the row term
    src = write_tif(tmp_path / f"{kind}.tif", data, transform=t * skew)
    with rasterio.open(src) as ds:
        assert ds.transform.b or ds.transform.d
    before = snapshot(existing_output)
    assert_one_line_error(cli(tmp_path, base_job(existing_output, input=str(src))), "rotated or sheared")
    assert snapshot(existing_output) == before


def test_an_output_path_under_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(cli(tmp_path, base_job(blocker / "sub" / "out")), "which is a file")
    assert_one_line_error(cli(tmp_path, base_job(blocker)), "exists and is not a folder")
    assert blocker.read_text() == "not a folder"


def test_an_all_nodata_scene_is_one_line_and_leaves_the_output_as_it_was(tmp_path, existing_output):
    """Only the pixels tell: found at ingest, whose store is taken back; a new output folder is not left."""
    empty = write_tif(tmp_path / "empty.tif", np.zeros((3, 300, 400), np.uint8), nodata=0)
    before = snapshot(existing_output)
    proc = cli(tmp_path, base_job(existing_output, input=str(empty)), "-q")
    assert_one_line_error(proc, "no valid pixel", "empty.tif")
    assert snapshot(existing_output) == before and sorted(existing_output.iterdir()) == list(before)
    fresh = tmp_path / "new" / "out"
    assert_one_line_error(cli(tmp_path, base_job(fresh, input=str(empty)), "-q"), "no valid pixel")
    assert not (tmp_path / "new").exists()
