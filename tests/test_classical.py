"""Classical methods give sensible answers on real imagery."""

import numpy as np
import pytest
from conftest import BUILDINGS, SCENE, write_tif
from helpers import class_map, run

from segpipe.errors import InputError


def test_watershed_and_canny_run_and_find_structure(tmp_path, client):
    ws = class_map(run(client, tmp_path / "ws", input=str(SCENE), tile_size=256, method={"name": "watershed"}))
    assert 0.05 < (ws == 1).mean() < 0.95
    edges = class_map(run(client, tmp_path / "e", input=str(SCENE), tile_size=256,
                          method={"name": "edges", "params": {"operator": "canny", "sigma": 2.0}}))
    assert 0.005 < (edges == 1).mean() < 0.3


def test_hsv_range_picks_the_coloured_square(tmp_path, client):
    rgb = np.full((3, 400, 400), 120, np.uint8)
    rgb[:, 100:200, 150:300] = np.array([200, 30, 30], np.uint8)[:, None, None]  # red
    rgb[:, 300:350, :] = np.array([30, 200, 30], np.uint8)[:, None, None]  # green
    src = write_tif(tmp_path / "rgb.tif", rgb)
    cls = class_map(run(client, tmp_path / "o", input=str(src), tile_size=256, chunk_size=128,
                        method={"name": "hsv", "params": {"hue": [0.95, 0.05], "saturation": [0.5, 1.0],
                                                          "scale": 255}}))
    expect = np.zeros((400, 400), np.uint8)
    expect[100:200, 150:300] = 1
    np.testing.assert_array_equal(cls, expect)


def test_hsv_needs_three_bands(tmp_path, client):
    with pytest.raises(InputError, match="needs 3 bands"):
        run(client, tmp_path / "o", input=str(SCENE), tile_size=256, method={"name": "hsv"})


def test_otsu_uses_scene_statistics_not_tile_statistics(tmp_path, client):
    """A tile that is uniformly bright must stay one class, not be split by its own threshold."""
    a = np.full((1, 512, 512), 100, np.uint16)
    a[:, :, 256:] = 1000
    a[:, :256, 256:] += np.random.default_rng(0).integers(0, 50, (256, 256)).astype(np.uint16)
    src = write_tif(tmp_path / "halves.tif", a)
    cls = class_map(run(client, tmp_path / "o", input=str(src), tile_size=256, chunk_size=128,
                        method={"name": "otsu"}))
    assert (cls[:, :256] == 0).all() and (cls[:, 256:] == 1).all()


def test_kmeans_with_truth_reports_iou(tmp_path, client):
    o = run(client, tmp_path / "o", input=str(SCENE), tile_size=256, method={"name": "kmeans", "params": {"k": 2}},
            truth={"path": str(BUILDINGS)}, class_names=["dark", "bright"])
    assert o.report.summary["tiles"] == 16
    assert 0 < o.report.summary["global_iou"]["bright"] < 1
