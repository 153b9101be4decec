"""Tiling must not change the answer: same class map for every tile size and worker count."""

import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import class_map, run

from segpipe.geometry import Box
from segpipe.io.scene import Scene
from segpipe.methods.classical import make_classical


@pytest.fixture(scope="module")
def unet_maps(tmp_path_factory, big_scene, tiny_model, client):
    out = {}
    method = {"name": "unet", "model": str(tiny_model), "patch_size": 128, "overlap": 0.25, "batch_size": 8}
    for tile in (512, 1024, 2048):
        o = run(client, tmp_path_factory.mktemp(f"t{tile}"), input=str(big_scene), tile_size=tile,
                chunk_size=512, method=method)
        out[(tile, 2)] = class_map(o)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                      host="127.0.0.1") as cluster, Client(cluster) as one:
        o = run(one, tmp_path_factory.mktemp("w1"), input=str(big_scene), tile_size=512, chunk_size=512,
                method=method)
        out[(512, 1)] = class_map(o)
    return out


@pytest.mark.slow
def test_unet_class_map_identical_for_tile_sizes_512_1024_2048(unet_maps):
    ref = unet_maps[(512, 2)]
    assert ref.shape == (2100, 2300)
    assert len(np.unique(ref[ref != 255])) >= 2, "a constant map would make this test vacuous"
    np.testing.assert_array_equal(unet_maps[(1024, 2)], ref)
    np.testing.assert_array_equal(unet_maps[(2048, 2)], ref)


def test_unet_class_map_identical_for_one_and_two_workers(unet_maps):
    np.testing.assert_array_equal(unet_maps[(512, 1)], unet_maps[(512, 2)])


def test_nodata_pixels_stay_nodata(unet_maps, big_scene):
    import rasterio
    with rasterio.open(big_scene) as ds:
        invalid = ds.read(1) == 0
    assert invalid.any()
    assert (unet_maps[(512, 2)][invalid] == 255).all()
    assert (unet_maps[(512, 2)][~invalid] != 255).all()


@pytest.mark.parametrize("name,params", [
    ("otsu", {}), ("otsu", {"classes": 3}), ("kmeans", {"k": 3}), ("adaptive", {"block_size": 31}),
    ("edges", {"operator": "sobel", "threshold": 0.08}), ("gabor", {"frequencies": [0.2], "orientations": 2}),
])
def test_bounded_classical_methods_match_whole_image_processing(tmp_path, big_scene, client, name, params):
    """Tiled output equals the method applied to the whole scene at once (same fitted state)."""
    from segpipe.methods.segment import fit_classical
    maps = [class_map(run(client, tmp_path / str(t), input=str(big_scene), tile_size=t, chunk_size=512,
                          method={"name": name, "params": params})) for t in (512, 1024)]
    np.testing.assert_array_equal(maps[0], maps[1])
    scene = Scene(str(tmp_path / "512" / "scene.zarr"))
    method = make_classical(name, params)
    state = fit_classical(method, scene, client)
    img, valid = scene.read(Box.rc(0, 0, scene.height, scene.width))
    whole = np.where(valid, method.predict(img, valid, state), 255)
    np.testing.assert_array_equal(maps[0], whole)
    assert len(np.unique(whole[valid])) >= 2


@pytest.mark.parametrize("connectivity", [1, 2])
def test_region_growing_is_exact_across_tiles(tmp_path, big_scene, client, connectivity):
    """Tile-wise region growing equals whole-image flood fill, whatever the tile size."""
    import rasterio
    from skimage.segmentation import flood
    with rasterio.open(big_scene) as ds:
        img = ds.read(1).astype(np.float32)
    seed = (1000, 1500)
    tol = 200.0
    params = {"seeds": [list(seed)], "tolerance": tol, "connectivity": connectivity}
    maps = [class_map(run(client, tmp_path / str(t), input=str(big_scene), tile_size=t,
                          method={"name": "region_growing", "params": params})) for t in (512, 1024)]
    np.testing.assert_array_equal(maps[0], maps[1])
    nodata = img == 0  # nodata never joins a region, so it may not carry growth across in the reference either
    expect = flood(np.where(nodata, -1e6, img), seed, tolerance=tol, connectivity=connectivity)
    got = maps[0] == 1
    rows, cols = np.nonzero(expect)
    assert expect.sum() > 100_000 and np.ptp(rows) > 1024 and np.ptp(cols) > 1024, \
        "the region should span several tiles for this test to mean anything"
    np.testing.assert_array_equal(got, expect)
