"""The dicom-seg export on the real head CT (derived DICOM series, tests/medical.py), read back by highdicom, pydicom
and dciodvfy, never by segpipe: references, frame positions, pixels against the NIfTI export, refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
import zarr
from conftest import SCENE
from helpers import assert_one_line_error, run
from medical import CT, ct_affine, load_ct, write_dicom_series, write_nifti

from segpipe import __version__
from segpipe.io.exports import ExportRun
from segpipe.io.exports import dicom_seg as dicom_seg_export
from segpipe.methods.names import METHODS

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

CLASSES = ["background", "soft tissue", "bone"]
BONE = {"category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"code": "3138006", "scheme": "SCT", "meaning": "Bone tissue"}}
JOB = {"tile_size": 128, "method": {"name": "otsu", "params": {"classes": 3}}, "class_names": CLASSES,
       "exports": ["nifti", "dicom-seg"], "dicom_seg": {"segments": {"bone": BONE}}}


@pytest.fixture(scope="module")
def seg_run(client, tmp_path_factory):
    """The whole CT (108 slices, files named in shuffled order) as a DICOM series, three Otsu classes."""
    d = tmp_path_factory.mktemp("dicom_seg")
    series = write_dicom_series(d / "ct", load_ct())
    o = run(client, d / "o", input=str(series), **JOB)
    sources = {str(ds.SOPInstanceUID): ds for ds in
               (pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.iterdir()))}
    return d / "o", o, sources


def _voxels(frame_ipp, ds, affine: np.ndarray) -> tuple[np.ndarray, ...]:
    """The NIfTI voxel (i, j, k) under every pixel of a frame placed as its header says: LPS -> RAS -> ijk by the
    NIfTI file's own affine."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r, c = np.mgrid[0:int(ds.Rows), 0:int(ds.Columns)]
    lps = np.asarray(frame_ipp, float)[:, None, None] + iop[:3, None, None] * c * dc + iop[3:, None, None] * r * dr
    ras = np.stack([-lps[0], -lps[1], lps[2], np.ones_like(lps[0])]).reshape(4, -1)
    ijk = np.linalg.inv(affine) @ ras
    assert np.abs(ijk - np.round(ijk)).max() < 1e-3  # the frame lies on the NIfTI grid
    return tuple(np.round(ijk[:3]).astype(int).reshape(3, *r.shape))


def test_seg_references_the_source_series(seg_run):
    out, o, sources = seg_run
    path = out / "segmentation.seg.dcm"
    assert path in o.exports
    seg = hd.seg.segread(path)
    src = next(iter(sources.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (binary)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.PatientID == src.PatientID and seg.SeriesInstanceUID != src.SeriesInstanceUID
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} <= set(sources)
    referenced = seg.get_source_image_uids()
    assert {(st, se) for st, se, _ in referenced} == {(src.StudyInstanceUID, src.SeriesInstanceUID)}
    assert {sop for _, _, sop in referenced} <= set(sources)


def test_one_segment_per_class_but_background_coded_and_identified(seg_run):
    out, _, _ = seg_run
    seg = hd.seg.segread(out / "segmentation.seg.dcm")
    assert seg.number_of_segments == 2
    soft, bone = (seg.get_segment_description(n) for n in (1, 2))
    assert (soft.segment_label, bone.segment_label) == ("soft tissue", "bone")
    for s in (soft, bone):
        assert s.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        (alg,) = s.SegmentationAlgorithmIdentificationSequence
        assert alg.AlgorithmName == "segpipe" and alg.AlgorithmVersion == __version__
        assert alg.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Histogram Analysis"  # otsu: CID 7162
    assert (bone.segmented_property_type.value, bone.segmented_property_type.scheme_designator) == ("3138006", "SCT")
    assert bone.segmented_property_category.value == "91723000"
    assert soft.segmented_property_type.value == soft.segmented_property_category.value == "85756007"  # generic
    assert set(dicom_seg_export.FAMILY) <= set(METHODS)


def test_every_frame_lies_on_its_source_slice_and_equals_the_nifti_export(seg_run):
    """Read with pydicom alone: each frame's plane position is its source slice's, and its pixels are the NIfTI
    export's class (placed by the NIfTI affine, not by segpipe's slice order) under every pixel."""
    out, o, sources = seg_run
    ds = pydicom.dcmread(out / "segmentation.seg.dcm")
    nifti = nib.load(str(o.nifti))
    classes = np.asarray(nifti.dataobj)
    labels = {int(s.SegmentNumber): CLASSES.index(s.SegmentLabel) for s in ds.SegmentSequence}
    frames = ds.pixel_array
    assert frames.shape == (int(ds.NumberOfFrames), 256, 256) and frames.max() == 1
    under = {uid: classes[_voxels(src.ImagePositionPatient, src, nifti.affine)] for uid, src in sources.items()}
    seen: dict[int, set[str]] = {n: set() for n in labels}
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-4)
        n = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        seen[n].add(uid)
        np.testing.assert_array_equal(frame == 1, under[uid] == labels[n])
    for n, k in labels.items():  # empty frames are left out: a slice has a frame exactly where it has the class
        having = {uid for uid, placed in under.items() if (placed == k).any()}
        assert seen[n] == having and having, CLASSES[k]
    np.testing.assert_allclose(nifti.affine, ct_affine(load_ct()), atol=1e-5)


def test_highdicom_reads_the_volume_the_nifti_export_holds(seg_run):
    out, o, sources = seg_run
    seg = hd.seg.segread(out / "segmentation.seg.dcm")
    uids = sorted(sources, key=lambda u: float(sources[u].ImagePositionPatient[2]))  # superior along z (axial CT)
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])  # (slices, rows, cols, segments)
    classes = np.asarray(nib.load(str(o.nifti)).dataobj).transpose(2, 1, 0)  # (k, j, i) = this CT's slices, rows, cols
    for s, k in enumerate((1, 2)):
        np.testing.assert_array_equal(masks[..., s].astype(bool), classes == k)


def test_dciodvfy_finds_no_error(seg_run):
    """dicom3tools' validator on the SEG. The warnings it gives are about Study Date, Time and ID for a DICOMDIR,
    which the derived source series does not carry (Type 2: the SEG has them empty), not about the SEG."""
    out, _, _ = seg_run
    proc = subprocess.run(["/usr/bin/dciodvfy", str(out / "segmentation.seg.dcm")], capture_output=True, text=True,
                          timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [ln for ln in lines if ln.startswith("Error")], lines
    assert all(ln.startswith("Warning") and "DICOMDIR" in ln for ln in lines if ln.startswith("Warning")), lines


def test_voxels_without_data_are_in_no_segment_and_a_named_class_0_is_a_segment(tmp_path):
    """The writer alone, on a small series and a hand-made class map holding NODATA (255)."""
    ct = load_ct()
    small = CT(ct.hu[:4, :32, :48], ct.bone[:4, :32, :48], ct.head[:4, :32, :48], ct.spacing)
    series = write_dicom_series(tmp_path / "ct", small)
    cls = np.zeros((4, 32, 48), np.uint8)
    cls[:, :, 24:] = 1
    cls[1, :8, :] = 255
    zarr.open_group(str(tmp_path / "result.zarr"), mode="w").create_array("class", data=cls)
    run_ = ExportRun(result=str(tmp_path / "result.zarr"), scene="", output=tmp_path / "o",
                     class_names=["air", "head"], source=str(series.resolve()), method="otsu")
    (path,) = dicom_seg_export.write(run_)
    seg = hd.seg.segread(path)
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["air", "head"]
    first = {str(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]): f for f in series.iterdir()}
    uids = [str(pydicom.dcmread(first[z], stop_before_pixels=True).SOPInstanceUID) for z in sorted(first, key=float)]
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2]).astype(bool)
    np.testing.assert_array_equal(masks[..., 0], cls == 0)
    np.testing.assert_array_equal(masks[..., 1], cls == 1)
    assert not masks[1, :8].any()  # NODATA: neither segment


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_seg")
    ct = load_ct()
    small = CT(ct.hu[:6, :64, :64], ct.bone[:6, :64, :64], ct.head[:6, :64, :64], ct.spacing)
    return {"nifti": write_nifti(d / "small.nii.gz", small.hu, ct_affine(ct)),
            "series": write_dicom_series(d / "series", small)}


def _segpipe(tmp_path: Path, command: str, job: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return subprocess.run([sys.executable, "-m", "segpipe.cli", command, str(path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


CASES = {
    "nifti input": ("nifti", {}, ["'dicom-seg' needs a DICOM series as input", "a NIfTI file"]),
    "geotiff input": ("geotiff", {}, ["'dicom-seg' does not apply to a raster input"]),
    "missing class": ("series", {"dicom_seg": {"segments": {"tumour": BONE}}},
                      ["dicom_seg.segments names 'tumour'", "not a class of this job", "'bone'"]),
    "background": ("series", {"dicom_seg": {"segments": {"background": BONE}}}, ["class 0, left out of the SEG"]),
    "codes without the export": ("series", {"exports": ["nifti"], "dicom_seg": {"segments": {"bone": BONE}}},
                                 ["dicom_seg settings are given but exports does not name dicom-seg"]),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_one_line_exit_2_and_writes_nothing(bad_inputs, tmp_path, command, case):
    source, extra, words = CASES[case]
    inputs = {**bad_inputs, "geotiff": SCENE}
    out = tmp_path / "out"
    job = {**JOB, "tile_size": 64, "input": str(inputs[source]), "output": str(out), **extra}
    if source == "geotiff":
        job = {**job, "method": {"name": "otsu"}, "class_names": ["background", "bone"]}
    proc = _segpipe(tmp_path, command, job)
    assert_one_line_error(proc, *words)
    assert not out.exists()


def test_validate_accepts_dicom_seg_with_codes_on_a_dicom_series(bad_inputs, tmp_path):
    out = tmp_path / "out"
    proc = _segpipe(tmp_path, "validate", {**JOB, "tile_size": 64, "input": str(bad_inputs["series"]),
                                           "output": str(out)})
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()


def test_the_ct_archive_example_writes_a_seg_per_series_that_highdicom_reads(tmp_path):
    """examples/ct_dicom_seg.yaml as its header says to run it: ``segpipe archive`` over a folder of two series
    (both derived from the real CT); each item's SEG references its own series and holds its NIfTI's bone."""
    ct = load_ct()
    archive = tmp_path / "archive"
    for name, rows in (("upper", slice(0, 6)), ("lower", slice(50, 56))):
        write_dicom_series(archive / name, CT(ct.hu[rows, :96, :96], ct.bone[rows, :96, :96],
                                              ct.head[rows, :96, :96], ct.spacing))
    example = Path(__file__).resolve().parents[1] / "examples" / "ct_dicom_seg.yaml"
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "archive", str(archive), str(example), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    segs = sorted((tmp_path / "out").rglob("segmentation.seg.dcm"))
    assert len(segs) == 2, proc.stdout
    for path in segs:
        seg = hd.seg.segread(path)
        series = [pydicom.dcmread(f, stop_before_pixels=True) for f in (archive / path.parent.name).iterdir()]
        assert {str(ds.SeriesInstanceUID) for ds in series} == {
            str(r.SeriesInstanceUID) for r in seg.ReferencedSeriesSequence}
        bone = next(n for n in seg.segment_numbers if seg.get_segment_description(n).segment_label == "bone")
        assert seg.get_segment_description(bone).segmented_property_type.value == "3138006"
        uids = [str(ds.SOPInstanceUID) for ds in sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))]
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[bone])[..., 0].astype(bool)
        classes = np.asarray(nib.load(str(path.parent / "segmentation.nii.gz")).dataobj).transpose(2, 1, 0)
        np.testing.assert_array_equal(mask, classes == 2)
        assert mask.any()


WARM_CHECK = """
import sys
from segpipe.io import exports
assert "highdicom" not in sys.modules
assert exports.warm(["nifti"]) is None  # nothing to load for it
thread = exports.warm(["nifti", "dicom-seg"])
thread.join(60)
from highdicom import _standard_utils as standard
print("highdicom" in sys.modules, thread.daemon, standard.get_iod_module_map.cache_info().currsize,
      standard.get_module_attribute_map.cache_info().currsize)
"""


def test_warming_loads_highdicom_and_the_standards_tables_in_a_daemon_thread():
    """``exports.warm`` (called as a run starts) leaves a fresh process with highdicom imported and the tables a SEG
    needs parsed, so the export stage does not pay for them."""
    proc = subprocess.run([sys.executable, "-c", WARM_CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "1", "1"]
