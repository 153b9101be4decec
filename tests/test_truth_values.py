"""Truth values from the wild (issue 30, case 1): 0/255 masks, float masks, ids beyond the classes.

Only the truth's nodata tag, ``truth.ignore`` and NaN are ignored; anything else beyond the method's classes is
refused in one line naming the values and the settings that read them. Built from real data: the head CT's own
bone mask (InVesalius' threshold mask, derived: 24 axial slices of it, stored as 0/255, as 0.999 floats), and
SpaceNet's 43 building footprints rasterised onto the sample scene (derived: burned in as 0/255 and 256/257).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from conftest import BUILDINGS, SCENE, write_tif
from helpers import check_error, run
from medical import ct_affine, dice, load_ct, write_nifti
from rasterio.features import rasterize

from segpipe.io.vector import read_features

SLAB = slice(40, 64)  # 24 axial slices through skull and face: every case of the CT, at a third of its voxels
DIGITS = 1e-6  # the summary keeps six digits


def refused(tmp_path: Path, job: dict) -> str:
    """The one line the check refuses ``job`` with (into an output that is then never made)."""
    message = check_error(tmp_path, {**job, "output": str(tmp_path / "refused")})
    assert not (tmp_path / "refused").exists()
    return message


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A slab of the real head CT as NIfTI, its bone mask, and its affine."""
    root = tmp_path_factory.mktemp("ct")
    c = load_ct()
    affine = ct_affine(c)
    affine[:3, 3] += affine[:3, 2] * SLAB.start  # the slab's first slice is where it lies in the full CT
    path = write_nifti(root / "ct.nii.gz", c.hu[SLAB], affine)
    return path, c.bone[SLAB], affine


@pytest.fixture(scope="module")
def buildings() -> np.ndarray:
    """SpaceNet's building footprints burned onto the sample scene's grid (True inside a building)."""
    features = read_features(BUILDINGS, None)
    with rasterio.open(SCENE) as src:
        return rasterize(features.geometries, out_shape=(src.height, src.width), transform=src.transform) > 0


def otsu_job(path: Path, truth: dict) -> dict:
    return {"input": str(path), "tile_size": 128, "method": {"name": "otsu"}, "truth": truth,
            "exports": ["nifti"] if path.suffix == ".gz" else ["cog"]}


def test_a_0_255_mask_is_refused_naming_255_and_read_with_binarize_scores_as_a_recount(tmp_path, client, ct):
    path, bone, affine = ct
    truth = write_nifti(tmp_path / "bone255.nii.gz", bone.astype(np.uint8) * 255, affine)
    message = refused(tmp_path, otsu_job(path, {"path": str(truth)}))
    assert "ground truth holds value(s) [255] beyond the method's classes 0..1" in message
    assert "truth.binarize: true" in message and "truth.remap: {255: 1}" in message
    for how in ({"binarize": True}, {"remap": {255: 1}}):
        o = run(client, tmp_path / next(iter(how)), **otsu_job(path, {"path": str(truth), **how}))
        pred = np.asarray(zarr.open_array(o.result, path="class", mode="r")[:])
        recount = dice(pred == 1, bone)
        # bone is found (otsu splits air from the head, bone lies within it): not the 0.0 of 255 read as "ignore"
        assert 0.1 < recount < 1
        assert o.report.summary["global_dice"]["class1"] == pytest.approx(recount, abs=DIGITS)
        assert o.report.summary["pixels"] == bone.size  # every voxel scored


def test_float_truth_must_hold_whole_numbers_unless_a_threshold_cuts_it(tmp_path, client, ct):
    path, bone, affine = ct
    soft = write_nifti(tmp_path / "soft.nii.gz", bone.astype(np.float32) * 0.999, affine)
    message = refused(tmp_path, otsu_job(path, {"path": str(soft)}))
    assert "holds values that are not whole numbers (e.g. 0.999)" in message and "truth.threshold" in message
    o = run(client, tmp_path / "cut", **otsu_job(path, {"path": str(soft), "threshold": 0.5}))
    pred = np.asarray(zarr.open_array(o.result, path="class", mode="r")[:])
    assert o.report.summary["global_dice"]["class1"] == pytest.approx(dice(pred == 1, bone), abs=DIGITS)
    whole = write_nifti(tmp_path / "whole.nii.gz", bone.astype(np.float32), affine)  # 0.0 / 1.0: class ids
    o = run(client, tmp_path / "whole", **otsu_job(path, {"path": str(whole)}))
    assert o.report.summary["global_dice"]["class1"] == pytest.approx(dice(pred == 1, bone), abs=DIGITS)


def test_255_is_ignored_only_when_the_job_says_so(tmp_path, client, buildings):
    mask = write_tif(tmp_path / "b255.tif", (buildings * 255).astype(np.uint8)[None], count=1, dtype="uint8")
    job = otsu_job(SCENE, {"path": str(mask)})
    assert "value(s) [255]" in refused(tmp_path, job)
    o = run(client, tmp_path / "ignored", **{**job, "truth": {"path": str(mask), "ignore": [255]}})
    assert o.report.summary["pixels"] == int((~buildings).sum())  # only the 0 pixels scored
    tagged = write_tif(tmp_path / "b255nodata.tif", (buildings * 255).astype(np.uint8)[None], count=1,
                       dtype="uint8", nodata=255)
    o2 = run(client, tmp_path / "tagged", **{**job, "truth": {"path": str(tagged)}})  # the file's nodata tag
    assert o2.report.summary["confusion_matrix"] == o.report.summary["confusion_matrix"]


def test_uint16_ids_beyond_the_classes_are_named(tmp_path, buildings):
    ids = np.where(buildings, 256, 257).astype(np.uint16)
    mask = write_tif(tmp_path / "ids.tif", ids[None], count=1, dtype="uint16")
    message = refused(tmp_path, otsu_job(SCENE, {"path": str(mask)}))
    assert "ground truth holds value(s) [256, 257] beyond the method's classes 0..1" in message
    assert "truth.remap" in message


def test_a_volume_truth_on_another_affine_says_what_differs(tmp_path, ct):
    path, bone, affine = ct
    moved = affine.copy()
    moved[:3, 3] += [0, 0, 3.0]
    truth = write_nifti(tmp_path / "moved.nii.gz", bone.astype(np.uint8), moved)
    message = refused(tmp_path, otsu_job(path, {"path": str(truth)}))
    z = affine[2, 3]
    assert "has another affine than the input (origin (" in message and f"{z + 3:g}) vs (" in message
    assert f"{z:g}) mm)" in message


def test_training_labels_stored_0_255_are_refused_and_trained_on_with_binarize(tmp_path, buildings):
    """The silent error: a 0/255 label raster trained a model that never saw a foreground pixel."""
    labels = write_tif(tmp_path / "labels.tif", (buildings * 255).astype(np.uint8)[None], count=1, dtype="uint8")
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "train", "--image", str(SCENE), "--labels",
                           str(labels), "--out", str(tmp_path / "m.pt"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("segpipe: error: ground truth holds value(s) [255]")
    assert "segpipe train --binarize" in proc.stderr and not (tmp_path / "m.pt").exists()
    from distributed import Client

    from segpipe.methods.train import prepare_store

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client:
        scene = prepare_store(SCENE, labels, tmp_path / "work", None, client, binarize=True)
    truth = np.asarray(zarr.open_array(scene.path, path="truth", mode="r")[:])
    assert json.dumps(sorted(int(v) for v in np.unique(truth))) == "[0, 1]"
    assert int((truth == 1).sum()) == int(buildings.sum())  # every building pixel is a training target


def test_vector_features_of_class_255_are_refused_not_dropped(tmp_path):
    """The footprints burned as 255 (``truth.value``) would otherwise fall out of the counts as "ignore"."""
    message = refused(tmp_path, otsu_job(SCENE, {"path": str(BUILDINGS), "value": 255}))
    assert "ground truth holds value(s) [255] beyond the method's classes 0..1" in message
    assert refused(tmp_path, otsu_job(SCENE, {"path": str(BUILDINGS), "value": 3})).startswith(
        "ground truth holds value(s) [3]")
