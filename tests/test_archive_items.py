"""Archive items: nested DICOM trees (one item per series), series selection, changed job settings, tile clipping.

Data: crops of the real SpaceNet scene, and DICOM series and NIfTI files derived from InVesalius' real head CT
(``tests/medical.py``); the series' descriptions and folder layout are made here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from conftest import BUILDINGS, SCENE, write_tif
from helpers import check_error
from medical import ct_affine, load_ct, write_dicom_series, write_nifti
from prefect.testing.utilities import prefect_test_harness
from rasterio.windows import Window

from segpipe.archive import discover, item_job
from segpipe.config import job_from_dict
from segpipe.errors import InputError
from segpipe.pipeline import check


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def add_series(folder: Path, z: slice, description: str) -> str:
    """Derived: slices ``z`` of the real CT (a 96 x 96 crop) as one DICOM series with ``description``, its
    files written into ``folder`` beside any other series there; returns its SeriesInstanceUID."""
    import pydicom

    ct = load_ct()
    part = type(ct)(ct.hu[z, 80:176, 80:176], ct.bone[z], ct.head[z], ct.spacing)
    staging = folder.parent / f".{folder.name}-{description.replace(' ', '_')}"
    write_dicom_series(staging, part)
    folder.mkdir(parents=True, exist_ok=True)
    uid = ""
    for f in sorted(staging.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = description
        uid = str(ds.SeriesInstanceUID)
        ds.save_as(folder / f"{description.replace(' ', '_')}_{f.name}", enforce_file_format=True)
    shutil.rmtree(staging)
    return uid


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory):
    """``root/head.nii.gz`` beside ``patient1/study1/{axial,mixed}`` and ``patient2/study1/axial``; ``mixed``
    holds two series (8 slices 'soft tissue', 5 slices 'bone')."""
    root = tmp_path_factory.mktemp("tree") / "archive"
    ct = load_ct()
    root.mkdir()
    write_nifti(root / "head.nii.gz", ct.hu[40:46, 80:176, 80:176], ct_affine(ct))
    uids = {"p1 axial": add_series(root / "patient1" / "study1" / "axial", slice(40, 46), "axial"),
            "p2 axial": add_series(root / "patient2" / "study1" / "axial", slice(50, 56), "axial"),
            "soft": add_series(root / "patient1" / "study1" / "mixed", slice(40, 48), "soft tissue"),
            "bone": add_series(root / "patient1" / "study1" / "mixed", slice(60, 65), "bone")}
    (root / "patient1" / "notes.txt").write_text("not an item")
    return root, uids


def test_every_dicom_series_of_a_nested_tree_is_one_item_with_a_unique_name(dicom_tree, tmp_path):
    root, uids = dicom_tree
    out = tmp_path / "out"
    items = {i.name: i.source for i in discover(str(root), out)}
    mixed = root / "patient1" / "study1" / "mixed"
    assert items == {
        "head": str(root / "head.nii.gz"),
        "patient1_study1_axial": str(root / "patient1" / "study1" / "axial"),  # both folders are 'axial'
        "patient2_study1_axial": str(root / "patient2" / "study1" / "axial"),
        "cranium_soft_tissue": f"{mixed}#series={uids['soft']}",  # PatientID_SeriesDescription
        "cranium_bone": f"{mixed}#series={uids['bone']}",
    }
    # A recursive glob gives the same series, one item each (not one per folder or slice file).
    by_glob = {i.name: i.source for i in discover(str(root / "**"), out)}
    assert by_glob == items
    slices = {i.name: i.source for i in discover(str(root / "**" / "*.dcm"), out)}
    assert slices == {k: v for k, v in items.items() if k != "head"}
    only_bone = discover(str(mixed / "bone_*.dcm"), out)  # its folder holds two series: named by its own
    assert [(i.name, i.source) for i in only_bone] == [("cranium_bone", f"{mixed}#series={uids['bone']}")]


def test_an_output_inside_the_archive_and_hidden_folders_hold_no_items(dicom_tree, tmp_path):
    root, _ = dicom_tree
    copy = tmp_path / "archive"
    shutil.copytree(root, copy)
    shutil.copytree(copy / "patient2", copy / "out" / "patient2")  # as if results were written there
    shutil.copytree(copy / "patient2", copy / ".superseded" / "patient2")
    names = {i.name for i in discover(str(copy), copy / "out")}
    assert names == {"head", "patient1_study1_axial", "patient2_study1_axial", "cranium_soft_tissue",
                     "cranium_bone"}


def test_a_series_split_across_two_folders_gives_items_that_fail_saying_so(dicom_tree, tmp_path):
    """Each part would pass for the whole scan: the items carry the problem, and the archive goes on."""
    root, uids = dicom_tree
    files = sorted((root / "patient2" / "study1" / "axial").iterdir())
    for name, part in (("part1", files[:3]), ("part2", files[3:])):
        (tmp_path / "a" / name).mkdir(parents=True)
        for f in part:
            shutil.copy(f, tmp_path / "a" / name / f.name)
    items = discover(str(tmp_path / "a"), tmp_path / "out")
    assert [i.name for i in items] == ["part1", "part2"]
    for i in items:
        assert uids["p2 axial"] in i.problem and "split across" in i.problem and "part1, " in i.problem


def test_a_folder_of_unreadable_dicom_files_is_an_item_that_fails_naming_the_file(dicom_tree, tmp_path):
    root, _ = dicom_tree
    broken = tmp_path / "a" / "patient3" / "broken"
    broken.mkdir(parents=True)
    first = sorted((root / "patient2" / "study1" / "axial").iterdir())[0]
    (broken / "IM0001.dcm").write_bytes(first.read_bytes()[:300])  # the preamble and magic, then cut short
    shutil.copy(root / "head.nii.gz", tmp_path / "a" / "head.nii.gz")
    items = {i.name: i.source for i in discover(str(tmp_path / "a"), tmp_path / "out")}
    assert items == {"head": str(tmp_path / "a" / "head.nii.gz"), "broken": str(broken)}
    message = check_error(tmp_path, {"input": str(broken), "output": str(tmp_path / "o"), "method": {"name": "otsu"}})
    assert "IM0001.dcm" in message


def test_a_folder_of_two_series_is_refused_listing_them_and_the_series_key_picks_one(dicom_tree, tmp_path):
    root, uids = dicom_tree
    mixed = root / "patient1" / "study1" / "mixed"
    job = {"input": str(mixed), "output": str(tmp_path / "o"), "tile_size": 64, "method": {"name": "otsu"}}
    message = check_error(tmp_path, job)
    for words in (uids["soft"], "'soft tissue' (8 slices)", uids["bone"], "'bone' (5 slices)", "series:"):
        assert words in message, message

    def slices(series: str) -> int:
        return check(job_from_dict({**job, "series": series}, tmp_path), stores=False).info.shape[0]

    assert slices("bone") == slices(uids["bone"]) == 5
    assert slices("Soft Tissue") == slices(uids["soft"]) == 8  # a description matches whatever its case
    message = check_error(tmp_path, {**job, "series": "T2 FLAIR"})
    assert "'T2 FLAIR'" in message and uids["soft"] in message and uids["bone"] in message
    with pytest.raises(InputError, match="local folder"):
        job_from_dict({**job, "input": "s3://bucket/ct", "series": "bone"}, tmp_path)


def crop(path: Path, rows: int, cols: int, row0: int = 0, col0: int = 0) -> Path:
    """Derived: a window of the real SpaceNet scene, georeferenced where it lies."""
    with rasterio.open(SCENE) as src:
        window = Window(col0, row0, cols, rows)
        data = src.read(window=window)
        transform = src.window_transform(window)
    return write_tif(path, data, transform=transform)


def crops_archive(tmp_path: Path, n: int, size: int, step: int, cluster: dict) -> tuple[Path, Path]:
    """Derived: a folder of ``n`` square crops of the real scene (``step`` rows apart) and an otsu job template
    (tile 128) whose input and output the archive run replaces."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(n):
        crop(folder / f"s{i}.tif", size, size, step * i, 100)
    template = tmp_path / "template.yaml"
    template.write_text(yaml.safe_dump({"input": "unused.tif", "output": "unused", "tile_size": 128,
                                        "method": {"name": "otsu"}, "cluster": cluster}))
    return folder, template


def test_an_archive_item_smaller_than_the_template_tile_is_one_tile_but_a_single_job_is_still_refused(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    crop(folder / "small.tif", 200, 300)
    crop(folder / "large.tif", 600, 600, 100, 100)
    template = tmp_path / "template.yaml"
    template.write_text(yaml.safe_dump({"input": "unused.tif", "output": "unused", "tile_size": 512,
                                        "method": {"name": "otsu"}}))
    items = {i.name: i for i in discover(str(folder), tmp_path / "out")}
    small, large = item_job(template, items["small"]), item_job(template, items["large"])
    assert (small.tile_size, large.tile_size) == (300, 512)  # clipped to the small item's longer edge only
    assert check(small, stores=False).layout.result_fp["tile_size"] == 300
    chunked = tmp_path / "chunked.yaml"  # a chunk size the tile must stay a multiple of: the smallest that covers
    chunked.write_text(yaml.safe_dump({**yaml.safe_load(template.read_text()), "chunk_size": 128}))
    assert item_job(chunked, items["small"]).tile_size == 384
    message = check_error(tmp_path, {"input": str(folder / "small.tif"), "output": str(tmp_path / "o"),
                                     "tile_size": 512, "method": {"name": "otsu"}})
    assert "tile_size 512 is larger than the scene" in message


@pytest.mark.slow
def test_archive_refuses_an_item_made_with_other_settings_and_redoes_it_with_overwrite(prefect_api, tmp_path):
    """Issue 30 case 2: otsu classes 2, then classes 3 with per-item truth: refused naming the change, outputs
    untouched; with overwrite: true redone, 3 classes and scores; then skipped as done."""
    from segpipe_flows.archive import archive

    folder, labels = tmp_path / "scenes", tmp_path / "labels"
    folder.mkdir()
    labels.mkdir()
    crop(folder / "a.tif", 300, 300)
    crop(folder / "b.tif", 300, 400, 500, 400)
    for name in ("a", "b"):
        shutil.copy(BUILDINGS, labels / f"{name}.geojson")
    base = {"input": "unused.tif", "output": "unused", "tile_size": 512, "cluster": {"n_workers": 1}}
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**base, "method": {"name": "otsu", "params": {"classes": 2}}}))
    three = {**base, "method": {"name": "otsu", "params": {"classes": 3}},
             "class_names": ["dark", "mid", "bright"], "truth": {"path": str(labels / "{name}.geojson")}}
    refused_job, overwrite_job = tmp_path / "three.yaml", tmp_path / "three_overwrite.yaml"
    refused_job.write_text(yaml.safe_dump(three))
    overwrite_job.write_text(yaml.safe_dump({**three, "overwrite": True}))
    out = tmp_path / "out"

    def classes(name: str) -> int:
        with rasterio.open(out / name / "segmentation.tif") as ds:
            return len(set(np.unique(ds.read(1)).tolist()) - {255})

    first = {r["item"]: r for r in archive(str(folder), str(two), str(out))}
    assert first["a"]["status"] == first["b"]["status"] == "done"  # a's tile clipped to 300, b's to 400
    assert classes("a") == classes("b") == 2 and first["a"]["global_mean_iou"] is None
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    second = {r["item"]: r for r in archive(str(folder), str(refused_job), str(out))}
    for name in ("a", "b"):
        status = second[name]["status"]
        assert status.startswith("refused: ") and "method.params.classes: 2 -> 3" in status, status
        assert "overwrite: true" in status and second[name]["global_mean_iou"] is None
        assert classes(name) == 2 and not (out / name / "metrics" / "tiles.csv").exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written  # nothing touched

    third = {r["item"]: r for r in archive(str(folder), str(overwrite_job), str(out))}
    for name in ("a", "b"):
        status = third[name]["status"]
        assert status.startswith("redone (settings changed: method.params.classes: 2 -> 3"), status
        assert "truth: null -> " in status
        assert classes(name) == 3 and 0.0 <= third[name]["global_mean_iou"] <= 1.0
        summary = json.loads((out / name / "metrics" / "summary.json").read_text())
        assert summary["summary"]["global_mean_iou"] == third[name]["global_mean_iou"]

    fourth = {r["item"]: r for r in archive(str(folder), str(overwrite_job), str(out))}
    assert fourth["a"]["status"] == fourth["b"]["status"] == "skipped (done before)"
    assert fourth["a"]["global_mean_iou"] == third["a"]["global_mean_iou"]


@pytest.mark.slow
def test_archive_over_a_nested_dicom_tree_segments_each_series_as_its_own_item(prefect_api, dicom_tree, tmp_path):
    """Issue 30 case 4: every series of a patient/study/series tree (two in one folder) and the NIfTI beside
    them, each into its own output folder, with the voxels of its own series."""
    import nibabel as nib

    from segpipe_flows.archive import archive

    root, _ = dicom_tree
    job = tmp_path / "template.yaml"
    job.write_text(yaml.safe_dump({"input": "unused", "output": "unused", "tile_size": 128,
                                   "method": {"name": "otsu"}, "cluster": {"n_workers": 1}}))
    out = tmp_path / "out"
    rows = {r["item"]: r for r in archive(str(root), str(job), str(out))}
    assert {k: r["status"] for k, r in rows.items()} == dict.fromkeys(
        ["cranium_bone", "cranium_soft_tissue", "head", "patient1_study1_axial", "patient2_study1_axial"], "done")
    depth = {name: nib.load(str(out / name / "segmentation.nii.gz")).shape[2] for name in rows}
    assert depth == {"head": 6, "patient1_study1_axial": 6, "patient2_study1_axial": 6,
                     "cranium_soft_tissue": 8, "cranium_bone": 5}
    # The NIfTI and the first series hold the same voxels: the same segmentation.
    head, axial = (np.asarray(nib.load(str(out / n / "segmentation.nii.gz")).dataobj)
                   for n in ("head", "patient1_study1_axial"))
    np.testing.assert_array_equal(head, axial)
    again = {r["item"]: r["status"] for r in archive(str(root), str(job), str(out))}
    assert set(again.values()) == {"skipped (done before)"}
