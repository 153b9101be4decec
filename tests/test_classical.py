"""Classical methods give sensible answers on real imagery."""

import numpy as np
import pytest
import zarr
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


@pytest.mark.parametrize("dtype,bands", [("uint16", 1), ("uint8", 3), ("int16", 2), ("float32", 2)])
def test_scene_statistics_equal_a_whole_array_count(tmp_path, client, sample_pixels, dtype, bands):
    """Integer scenes are read once (grey-level counts binned afterwards); every path equals numpy on the whole."""
    from segpipe.io.scene import Scene
    from segpipe.tiling.stats import scene_stats

    a = sample_pixels[0].astype(np.float64)
    stack = np.stack([np.roll(a, 37 * k, axis=1) for k in range(bands)])
    if dtype == "uint8":
        stack = stack / stack.max() * 255
    elif dtype == "int16":
        stack = stack - 900
    elif dtype == "float32":
        stack = stack / 7.0
    data = stack.astype(dtype)
    data[:, 100:300, 200:400] = 0  # nodata
    o = run(client, tmp_path / "o", input=str(write_tif(tmp_path / "s.tif", data, nodata=0)), tile_size=256,
            chunk_size=128, method={"name": "otsu"})
    stats = scene_stats(Scene(o.scene), client)
    valid = np.asarray(zarr.open_array(o.scene, path="valid", mode="r")[:]) > 0
    assert not valid[100:300, 200:400].any() and valid.mean() > 0.9
    g = data.astype(np.float32).mean(axis=0) if bands > 1 else data[0].astype(np.float32)
    lo, hi = float(g[valid].min()), float(g[valid].max())
    expect = np.histogram(g[valid], bins=1024, range=(lo, hi))[0]
    np.testing.assert_array_equal(stats.hist_counts, expect)
    assert stats.hist_counts.sum() == valid.sum()
    np.testing.assert_allclose(stats.mean, data[:, valid].astype(np.float64).mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats.std, data[:, valid].astype(np.float64).std(axis=1), rtol=1e-6)
