"""CRF refinement of a model's probabilities (method.refine.crf): tile-exact within its halo, equal to a plain
whole-image mean field over the same truncated kernel, and sensible on the real SpaceNet scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from conftest import BUILDINGS, DEMO_MODEL, SCENE
from helpers import assert_one_line_error, class_map, cli, run
from scipy import ndimage
from scipy.special import softmax

from segpipe.config import job_from_dict
from segpipe.errors import InputError
from segpipe.models.checkpoint import read_spec

MODEL = {"name": "model", "model": str(DEMO_MODEL), "patch_size": 256, "overlap": 0.25, "batch_size": 4}
# The defaults, spelled out: the reference below must use the same numbers.
CRF = {"iterations": 5, "theta_alpha": 2.0, "theta_beta": 0.5, "theta_gamma": 1.0, "w_bilateral": 0.3,
       "w_spatial": 0.3, "radius": 6}
NAMES = ["background", "building"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, holed_scene, client) -> dict:
    """The plain model run (tile 512) and the refined one at tile sizes 256, 384 and 900 (one tile)."""
    root = tmp_path_factory.mktemp("crf_runs")
    common = {"input": str(holed_scene), "class_names": NAMES}
    out = {"plain": run(client, root / "plain", tile_size=512, method=MODEL, truth={"path": str(BUILDINGS)},
                        **common)}
    for tile in (256, 384, 900):
        out[tile] = run(client, root / str(tile), tile_size=tile, method={**MODEL, "refine": {"crf": CRF}},
                        probabilities=True, keep_work=tile == 900, **common)
    return out


def probabilities(outcome) -> np.ndarray:
    return np.asarray(zarr.open_array(outcome.result, path="probability", mode="r")[:])


@pytest.mark.slow
def test_refined_classes_and_probabilities_are_identical_for_tile_sizes_256_384_900(runs):
    ref, ref_p = class_map(runs[900]), probabilities(runs[900])
    assert ref.shape == (900, 900) and (ref == 255).sum() == 80 * 540
    for tile in (256, 384):
        np.testing.assert_array_equal(class_map(runs[tile]), ref)
        np.testing.assert_array_equal(probabilities(runs[tile]), ref_p)  # bit-identical, NaN where nodata
    assert (ref != class_map(runs["plain"])).any(), "refinement changed nothing: the test would be vacuous"


def reference_mean_field(logits: np.ndarray, image: np.ndarray, valid: np.ndarray, p: dict) -> np.ndarray:
    """Whole-image mean field of the truncated dense CRF, written from the paper's update (float64).

    Unary -log P; every neighbour j != i with |i - j| <= radius (not pairs, no relative logits, unlike the
    module); Potts compatibility mu(l, l') = [l != l'] applied as a matrix; invalid pixels take no part.
    Returns Q (C, h, w).
    """
    n, h, w = logits.shape
    unary = -np.log(softmax(logits, axis=0))
    potts = 1.0 - np.eye(n)
    q = softmax(-unary, axis=0)
    r = p["radius"]
    for _ in range(p["iterations"]):
        msg = np.zeros_like(q)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if (dy, dx) == (0, 0) or dy * dy + dx * dx > r * r:
                    continue
                yi, xi = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
                yj, xj = slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx))
                feat = ((image[:, yi, xi] - image[:, yj, xj]) ** 2).sum(axis=0)
                d2 = dy * dy + dx * dx
                k = (p["w_bilateral"] * np.exp(-d2 / (2 * p["theta_alpha"] ** 2) - feat / (2 * p["theta_beta"] ** 2))
                     + p["w_spatial"] * np.exp(-d2 / (2 * p["theta_gamma"] ** 2)))
                msg[:, yi, xi] += k * (valid[yi, xi] & valid[yj, xj]) * q[:, yj, xj]
        q = softmax(-unary - np.tensordot(potts, msg, axes=1), axis=0)
    return q


@pytest.mark.slow
def test_the_pipeline_equals_a_whole_image_numpy_reference_and_starts_from_the_models_logits(runs, holed_scene):
    rel = np.asarray(zarr.open_array(str(Path(runs[900].result).parent / "work.zarr"), path="grid_logits",
                                     mode="r")[:], np.float64)  # the blended unary the CRF pass read
    plain = class_map(runs["plain"])
    with rasterio.open(holed_scene) as ds:
        img = ds.read().astype(np.float64)
    valid = img[0] != 0
    decided = valid & (rel[0] != 0)  # the unary is the plain run's blend (float16): same arg-max
    np.testing.assert_array_equal((rel[0] > 0)[decided], plain[decided] == 1)

    spec = read_spec(DEMO_MODEL)
    image = (img - np.asarray(spec.mean)[:, None, None]) / np.asarray(spec.std)[:, None, None]
    q = reference_mean_field(np.concatenate([np.zeros_like(rel), rel]), np.where(valid, image, 0), valid, CRF)
    got, got_p = class_map(runs[900]), probabilities(runs[900]).astype(np.float64)
    margin = np.abs(q[1] - q[0])
    differ = valid & (got != q.argmax(axis=0))
    print(f"\nCRF vs numpy reference: {differ.sum()} of {valid.sum()} classes differ "
          f"(reference margin there <= {margin[differ].max() if differ.any() else 0:.2g}); "
          f"probability max |diff| {np.abs(got_p - q)[:, valid].max():.2g}")
    assert not (differ & (margin > 1e-4)).any()
    assert np.abs(got_p - q)[:, valid].max() < 2e-3  # float16 output, float32 vs float64 arithmetic
    assert (got[~valid] == 255).all() and np.isnan(got_p[:, ~valid]).all()


def shape_numbers(cls: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    pred, true = (cls == 1) & valid, (truth == 1) & valid
    labels, n_objects = ndimage.label(pred)
    sizes = np.bincount(labels.ravel())[1:]
    both_valid_y, both_valid_x = valid[1:] & valid[:-1], valid[:, 1:] & valid[:, :-1]
    edges = ((cls[1:] != cls[:-1]) & both_valid_y).sum() + ((cls[:, 1:] != cls[:, :-1]) & both_valid_x).sum()
    return {"iou": (pred & true).sum() / (pred | true).sum(), "objects": n_objects,
            "small_objects": int((sizes < 20).sum()), "boundary": int(edges)}


@pytest.mark.slow
def test_refinement_smooths_boundaries_without_losing_buildings(runs):
    """Numbers are printed; what is asserted is what a Potts smoothing must do, with a margin for IoU."""
    plain, refined = class_map(runs["plain"]), class_map(runs[900])
    truth = np.asarray(zarr.open_array(runs["plain"].result, path="truth", mode="r")[:])
    valid = plain != 255
    before, after = shape_numbers(plain, truth, valid), shape_numbers(refined, truth, valid)
    changed = int((plain != refined).sum())
    print(f"\nplain {before}\nrefined {after}\nchanged pixels {changed} of {valid.sum()}")
    assert after["iou"] >= before["iou"] - 0.01
    assert after["boundary"] < before["boundary"]
    assert after["objects"] <= before["objects"] and after["small_objects"] <= before["small_objects"]
    assert 0 < changed < 0.01 * valid.sum()


@pytest.mark.parametrize("method,words", [
    ({**MODEL, "refine": {"crf": {"theta_beta": 0}}}, ["method.refine.crf.theta_beta", "greater than 0"]),
    ({"name": "otsu", "refine": "crf"}, ["refine works on a model's probabilities", "'otsu'"]),
])
def test_bad_crf_settings_are_one_line_before_anything_is_written(tmp_path, method, words):
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.tif").write_bytes(b"previous good result")
    job = {"input": str(SCENE), "output": str(out), "tile_size": 256, "method": method}
    assert_one_line_error(cli(tmp_path, job), *words)
    assert sorted(p.name for p in out.iterdir()) == ["segmentation.tif"]
    assert (out / "segmentation.tif").read_bytes() == b"previous good result"


@pytest.mark.parametrize("refine,words", [
    ({"crf": {"iterations": 10, "radius": 30}}, ["300 px of halo", "at most 256"]),
    ({"crf": {"radius": 0}}, ["radius"]),
    ({"crf": {"iterations": 2.5}}, ["iterations"]),
    ({"crf": {"w_spatial": -1}}, ["w_spatial"]),
    ({"crf": {"sigma": 3}}, ["sigma", "Extra inputs"]),
    ("snake", ["unknown refinement 'snake'"]),
])
def test_crf_parameters_are_typed_and_checked(refine, words):
    with pytest.raises(InputError) as err:
        job_from_dict({"input": str(SCENE), "output": "o", "method": {**MODEL, "refine": refine}}, Path.cwd())
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_refine_crf_alone_means_the_defaults():
    job = job_from_dict({"input": str(SCENE), "output": "o", "method": {**MODEL, "refine": "crf"}}, Path.cwd())
    assert job.method.refine.crf.model_dump() == CRF and job.method.refine.crf.halo == 30


def test_refine_on_a_volume_is_one_line_before_anything_is_written(tmp_path):
    from medical import write_nifti

    model = Path(__file__).resolve().parent / "data" / "unet3d_ct_bone.pt"
    vol = write_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).normal(0, 300, (24, 48, 48)).astype(np.float32),
                      np.diag([1.5, 0.96, 0.96, 1.0]))
    out = tmp_path / "out"
    job = {"input": str(vol), "output": str(out), "tile_size": 64,
           "method": {"name": "model", "model": str(model), "patch_size": 32, "refine": "crf"}}
    assert_one_line_error(cli(tmp_path, job), "crf refines 2-D images only", "3-D")
    assert not out.exists()
