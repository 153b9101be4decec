"""Fuzzy c-means: scikit-fuzzy's c-means on the whole image as the reference, memberships as probabilities, and
bit-identical classes and memberships for tile sizes 256, 384 and 900 on the real SpaceNet scene with nodata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import skfuzzy
import zarr
from helpers import class_map, run

M = 2.0
METHOD = {"name": "fcm", "params": {"c": 3, "m": M}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, holed_scene, client) -> dict:
    root = tmp_path_factory.mktemp("fcm_runs")
    return {t: run(client, root / str(t), input=str(holed_scene), tile_size=t, method=METHOD, probabilities=True)
            for t in (256, 384, 900)}


def memberships(outcome) -> np.ndarray:
    return np.asarray(zarr.open_array(outcome.result, path="probability", mode="r")[:])


def scene(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as ds:
        img = ds.read(1).astype(np.float64)
    return img, img != 0


@pytest.mark.slow
def test_classes_and_memberships_are_identical_for_tile_sizes_256_384_900(runs):
    ref, ref_u = class_map(runs[900]), memberships(runs[900])
    assert ref_u.dtype == np.float16 and ref_u.shape == (3, 900, 900)
    for t in (256, 384):
        np.testing.assert_array_equal(class_map(runs[t]), ref)
        np.testing.assert_array_equal(memberships(runs[t]), ref_u)  # bit for bit, NaN where nodata
    valid = ref != 255
    assert np.isnan(ref_u[:, ~valid]).all() and (~valid).sum() == 80 * 540
    assert np.abs(ref_u[:, valid].astype(np.float64).sum(axis=0) - 1).max() < 4e-3  # float16 memberships
    np.testing.assert_array_equal(np.argmax(ref_u[:, valid], axis=0), ref[valid])
    assert set(np.unique(ref[valid])) == {0, 1, 2}


@pytest.mark.slow
def test_whole_image_scikit_fuzzy_cmeans_gives_the_same_centres_classes_and_memberships(runs, holed_scene):
    """The reference fits on every valid pixel of the file (standardised with numpy), never calling segpipe."""
    img, valid = scene(holed_scene)
    x = img[valid]
    mean, std = x.mean(), x.std()
    z = ((x - mean) / std)[None]
    cntr, *_ = skfuzzy.cmeans(z[:, ::4], 3, M, error=1e-6, maxiter=1000, seed=0)  # a quarter: the test's time
    cntr = np.sort(cntr[:, 0])[:, None]
    u_ref, *_ = skfuzzy.cmeans_predict(z, cntr, M, error=1e-6, maxiter=5)  # whole image, the reference centres
    fit = zarr.open_group(runs[900].result, mode="r").attrs["fit"]
    print(f"\nfcm centres: segpipe {np.ravel(fit['centres'])}, scikit-fuzzy {cntr.ravel()}")
    assert fit["mean"][0] == pytest.approx(mean, rel=1e-9) and fit["std"][0] == pytest.approx(std, rel=1e-9)
    np.testing.assert_allclose(np.ravel(fit["centres"]), cntr.ravel(), atol=0.02)  # standardised units
    cls, u = class_map(runs[900])[valid], memberships(runs[900])[:, valid].astype(np.float64)
    agree = (cls == np.argmax(u_ref, axis=0)).mean()
    print(f"class agreement with scikit-fuzzy {agree:.5f}; membership max |diff| {np.abs(u - u_ref).max():.4f}")
    assert agree > 0.995 and np.abs(u - u_ref).max() < 0.03

    # With segpipe's own centres, scikit-fuzzy's membership formula gives segpipe's memberships (float16 apart).
    centres = np.asarray(fit["centres"])
    u_same, *_ = skfuzzy.cmeans_predict(((x - fit["mean"][0]) / fit["std"][0])[None], centres, M, error=1e-9,
                                        maxiter=2)
    assert np.abs(u - u_same).max() < 1e-3
    top = np.sort(u_same, axis=0)
    decided = top[-1] - top[-2] > 1e-3
    np.testing.assert_array_equal(cls[decided], np.argmax(u_same, axis=0)[decided])


@pytest.mark.slow
def test_fcm_memberships_go_to_probabilities_tif(runs):
    with rasterio.open(Path(runs[384].result).parent / "probabilities.tif") as ds:
        assert ds.count == 4 and ds.descriptions == ("class0", "class1", "class2", "confidence")
        bands = ds.read()
    u = memberships(runs[384])
    valid = ~np.isnan(u[0])
    np.testing.assert_array_equal(bands[:3][:, valid], np.rint(u[:, valid].astype(np.float64) * 254).astype(np.uint8))
    assert (bands[:, ~valid] == 255).all()
