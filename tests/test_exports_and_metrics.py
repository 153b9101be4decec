"""COG and Zarr exports keep georeferencing; metrics are per tile core and summed globally."""

import csv
import json

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
from conftest import BUILDINGS, SCENE
from helpers import run
from rasterio.features import rasterize
from rio_cogeo.cogeo import cog_validate

from segpipe.report.metrics import confusion, scores


@pytest.fixture(scope="module")
def otsu_run(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("otsu")
    o = run(client, out, input=str(SCENE), tile_size=256, chunk_size=128, method={"name": "otsu"},
            truth={"path": str(BUILDINGS)}, class_names=["background", "building"])
    return out, o


def test_cog_is_valid_and_keeps_crs_and_bounds(otsu_run):
    _, o = otsu_run
    valid, errors, _ = cog_validate(str(o.cog))
    assert valid, errors
    with rasterio.open(o.cog) as cog, rasterio.open(SCENE) as src:
        assert cog.crs == src.crs
        assert cog.transform.almost_equals(src.transform)
        assert cog.bounds == src.bounds
        assert cog.nodata == 255
        assert cog.overviews(1), "COG should carry overviews"
        assert set(np.unique(cog.read(1))) <= {0, 1, 255}


def test_zarr_result_opens_georeferenced_with_xarray_rioxarray(otsu_run):
    _, o = otsu_run
    ds = xr.open_zarr(o.result, consolidated=False)
    da = ds["class"]
    assert da.dims == ("y", "x")
    with rasterio.open(SCENE) as src:
        assert da.rio.crs == src.crs
        assert da.rio.transform().almost_equals(src.transform)
        assert da.rio.bounds() == pytest.approx(tuple(src.bounds))
    cog = rasterio.open(o.cog).read(1)
    np.testing.assert_array_equal(np.nan_to_num(da.values, nan=255).astype(np.uint8), cog)


def test_report_files_per_tile_and_global_from_summed_matrix(otsu_run):
    out, o = otsu_run
    rows = list(csv.DictReader(open(out / "metrics" / "tiles.csv")))
    assert len(rows) == 16  # 900 px at 256 px tiles: 4 x 4
    summary = json.loads((out / "metrics" / "summary.json").read_text())["summary"]
    cm = np.asarray(summary["confusion_matrix"])
    assert cm.sum() == sum(int(r["pixels"]) for r in rows) == 900 * 900
    s = scores(cm)
    assert summary["global_iou"]["building"] == pytest.approx(s.iou[1], abs=1e-6)
    # global IoU is not the average of tile IoUs
    gj = json.loads((out / "metrics" / "tiles.geojson").read_text())
    assert len(gj["features"]) == 16
    lon, lat = gj["features"][0]["geometry"]["coordinates"][0][0]
    assert -85 < lon < -84 and 33 < lat < 34  # UTM 16N sample, reprojected to WGS 84


def test_metrics_match_a_direct_computation_on_the_whole_scene(otsu_run):
    out, o = otsu_run
    pred = rasterio.open(o.cog).read(1)
    with rasterio.open(SCENE) as src:
        doc = json.loads(BUILDINGS.read_text())
        truth = rasterize([(f["geometry"], 1) for f in doc["features"]], out_shape=(src.height, src.width),
                          transform=src.transform, dtype="uint8")
    summary = json.loads((out / "metrics" / "summary.json").read_text())["summary"]
    np.testing.assert_array_equal(np.asarray(summary["confusion_matrix"]), confusion(pred, truth, 2))
    assert 40 * 50 < truth.sum()  # 43 buildings really burned in


def test_scores_edge_cases():
    cm = np.array([[5, 0, 0], [0, 0, 0], [1, 0, 4]])
    s = scores(cm)
    assert s.iou[0] == pytest.approx(5 / 6) and np.isnan(s.iou[1]) and s.iou[2] == pytest.approx(4 / 5)
    assert s.dice[2] == pytest.approx(8 / 9)
    assert s.accuracy == pytest.approx(0.9)
    pred = np.array([[0, 1], [255, 1]], np.uint8)
    truth = np.array([[0, 0], [1, 255]], np.uint8)
    np.testing.assert_array_equal(confusion(pred, truth, 2), [[1, 1], [0, 0]])


def test_raster_truth_gives_the_same_metrics_as_the_vector_it_came_from(tmp_path, client, otsu_run):
    """Ground truth as a raster (255 = building, remapped to 1) on the scene grid."""
    from conftest import write_tif
    from helpers import run

    out, _ = otsu_run
    with rasterio.open(SCENE) as src:
        doc = json.loads(BUILDINGS.read_text())
        burned = rasterize([(f["geometry"], 255) for f in doc["features"]], out_shape=(src.height, src.width),
                           transform=src.transform, dtype="uint8")
    gt = write_tif(tmp_path / "gt.tif", burned[None])
    o = run(client, tmp_path / "o", input=str(SCENE), tile_size=256, chunk_size=128, method={"name": "otsu"},
            truth={"path": str(gt), "remap": {255: 1}}, class_names=["background", "building"])
    vector = json.loads((out / "metrics" / "summary.json").read_text())["summary"]
    assert o.report.summary["confusion_matrix"] == vector["confusion_matrix"]
