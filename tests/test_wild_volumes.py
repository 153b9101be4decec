"""Inputs as they come from the wild (issue 30): NaN voxels and pixels, a truncated DICOM slice, an output that
cannot be written, a 2-D NIfTI, and how ``validate`` words a volume's blocks.

Every refusal is the CLI's one line, exit code 2, nothing written or left in the output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import yaml
from conftest import SCENE, write_tif
from helpers import assert_one_line_error, class_map, run
from medical import CH2, load_ct, write_dicom_series, write_nifti

NODATA = 255  # the class map's value for voxels that were not segmented


def segpipe(tmp_path: Path, command: str, job: dict, name: str = "job.yaml") -> subprocess.CompletedProcess:
    """``python -m segpipe.cli run|validate job.yaml`` as a person runs it."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return subprocess.run([sys.executable, "-m", "segpipe.cli", command, str(path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a) NaN is no value ----------------------------------------------------------------------------------------

def _ch2_float() -> tuple[np.ndarray, np.ndarray]:
    """The ch2 MRI template's voxels as float32 (z, y, x), and its affine."""
    img = nib.load(str(CH2))
    return np.asarray(img.dataobj, np.float32).transpose(2, 1, 0).copy(), img.affine


def test_nan_voxels_of_a_float_nifti_are_nodata_like_the_jobs_nodata(client, tmp_path):
    """Derived: the real ch2 MRI template as float32 with a slab of NaN voxels (z 60-89, crossing the block border
    at 64) and a NaN box across block corners. They are invalid: 255 in the class map, and everywhere else the
    map is the one of the same volume with those voxels at -1 given as the job's ``nodata: -1`` (so the Otsu
    threshold came from the same valid voxels: NaN entered no statistic)."""
    zyx, affine = _ch2_float()
    holes = np.zeros(zyx.shape, bool)
    holes[60:90] = True
    holes[100:140, 50:80, 40:100] = True
    with_nan = write_nifti(tmp_path / "ch2_nan.nii.gz", np.where(holes, np.float32(np.nan), zyx), affine)
    with_sentinel = write_nifti(tmp_path / "ch2_minus1.nii.gz", np.where(holes, np.float32(-1), zyx), affine)
    job = {"method": {"name": "otsu"}, "tile_size": 64}

    got = class_map(run(client, tmp_path / "nan", input=str(with_nan), **job))
    want = class_map(run(client, tmp_path / "sentinel", input=str(with_sentinel), nodata=-1, **job))

    assert (got[holes] == NODATA).all()
    assert not (got[~holes] == NODATA).any()
    np.testing.assert_array_equal(got, want)
    assert 0.05 < (got[~holes] == 1).mean() < 0.95  # a real split of the head, not one class


def test_nan_pixels_of_a_float_geotiff_are_nodata_with_the_jobs_nodata_too(client, tmp_path):
    """Derived: the SpaceNet sample as float32 with a NaN strip, run with a job ``nodata`` (which used to make NaN
    count as a value): NaN pixels are 255, the rest equals the run with the strip at that nodata value."""
    with rasterio.open(SCENE) as ds:
        pixels = ds.read().astype(np.float32)
    strip = np.zeros(pixels.shape[1:], bool)
    strip[300:420, 100:700] = True
    nan_tif = write_tif(tmp_path / "nan.tif", np.where(strip, np.float32(np.nan), pixels))
    nodata_tif = write_tif(tmp_path / "nodata.tif", np.where(strip, np.float32(-9999), pixels))
    job = {"method": {"name": "otsu"}, "tile_size": 256, "nodata": -9999}

    got = class_map(run(client, tmp_path / "nan", input=str(nan_tif), **job))
    want = class_map(run(client, tmp_path / "nodata", input=str(nodata_tif), **job))

    assert (got[strip] == NODATA).all() and not (got[~strip] == NODATA).any()
    np.testing.assert_array_equal(got, want)


# --- b) a truncated DICOM slice --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def truncated_series(tmp_path_factory) -> tuple[Path, Path]:
    """Derived: the real head CT as a DICOM series (tests/medical.py), one slice file cut to 60 % of its bytes
    (in the middle of its pixel data), as an interrupted copy leaves it."""
    folder = write_dicom_series(tmp_path_factory.mktemp("dicom") / "series", load_ct())
    bad = sorted(folder.iterdir())[40]
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.6)])
    return folder, bad


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_truncated_dicom_slice_is_one_line_naming_the_file(tmp_path, truncated_series, command):
    folder, bad = truncated_series
    out = tmp_path / "out"
    proc = segpipe(tmp_path, command, {"input": str(folder), "output": str(out), "method": {"name": "otsu"}})
    assert_one_line_error(proc, "DICOM slice", "pixel data", "truncated", str(bad))
    assert not out.exists()  # no scene.zarr, no folder


def test_a_truncated_dicom_slice_leaves_an_existing_output_as_it_was(tmp_path, truncated_series):
    folder, bad = truncated_series
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.nii.gz").write_bytes(b"previous good result")
    before = snapshot(out)
    proc = segpipe(tmp_path, "run", {"input": str(folder), "output": str(out), "method": {"name": "otsu"}})
    assert_one_line_error(proc, bad.name)
    assert snapshot(out) == before and sorted(out.iterdir()) == list(before)


# --- c) an output that cannot be written -----------------------------------------------------------------------

@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into, root included, holding one earlier file.

    Tests run as root, where permission bits stop nothing; an immutable folder (``chattr +i``, ext4, tmpfs, xfs,
    btrfs) binds root too. Another user gets plain mode 0555. Skipped only where neither is possible (root
    without CAP_LINUX_IMMUTABLE, or a filesystem without the flag), since then no write can be refused.
    """
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "earlier.txt").write_text("kept")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("running as root, where permission bits do not stop writes, and `chattr +i` is not available "
                    "here: no read-only condition binds root")
    try:
        try:
            (folder / "probe").write_text("x")
        except PermissionError:
            yield folder
        else:
            (folder / "probe").unlink()
            pytest.skip(f"{folder} stayed writable under {undo[0]}: no read-only condition binds this user here")
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_output_that_cannot_be_written_is_refused_up_front(tmp_path, read_only_folder, command):
    """Both an output folder to be made inside the read-only folder and the read-only folder itself as the
    output: refused by the check, in one line, by run and validate alike (validate used to say "valid")."""
    before = snapshot(read_only_folder)
    job = {"input": str(SCENE), "method": {"name": "otsu"}, "tile_size": 256}
    inside = segpipe(tmp_path, command, {**job, "output": str(read_only_folder / "out")})
    assert_one_line_error(inside, "cannot be written", str(read_only_folder / "out"), "not writable")
    itself = segpipe(tmp_path, command, {**job, "output": str(read_only_folder)})
    assert_one_line_error(itself, "cannot be written", str(read_only_folder), "not writable")
    assert snapshot(read_only_folder) == before and sorted(read_only_folder.iterdir()) == list(before)


# --- d) a 2-D NIfTI, and validate's words for a volume ----------------------------------------------------------

def _ch2_slice(k: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``k`` of ch2 as (X, Y) uint8, and the affine that places it where it was in the volume."""
    img = nib.load(str(CH2))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [0, 0, k] + img.affine[:3, 3]
    return np.asarray(img.dataobj[:, :, k]), affine


def test_a_2d_nifti_is_read_as_a_single_slice_volume(client, tmp_path):
    """Derived: slice 90 of the ch2 MRI template saved as a 2-D NIfTI (shape (181, 217)). It runs as a volume of
    one slice: segmentation.nii.gz is (181, 217, 1) with the source's affine, and its values are those of the same
    slice saved as (181, 217, 1) (the form NIfTI itself gives one slice) and agree with Otsu on the slice."""
    from skimage.filters import threshold_otsu

    xy, affine = _ch2_slice()
    flat = tmp_path / "slice_2d.nii.gz"
    nib.save(nib.Nifti1Image(xy, affine), str(flat))
    assert nib.load(str(flat)).shape == (181, 217)
    one = tmp_path / "slice_3d.nii.gz"
    nib.save(nib.Nifti1Image(xy[:, :, None], affine), str(one))

    job = {"method": {"name": "otsu"}, "tile_size": 64}
    o = run(client, tmp_path / "flat", input=str(flat), **job)
    seg = nib.load(str(o.nifti))
    assert seg.shape == (181, 217, 1)
    np.testing.assert_array_equal(seg.affine, nib.load(str(flat)).affine)
    values = np.asarray(seg.dataobj)[:, :, 0]
    ref = np.asarray(nib.load(str(run(client, tmp_path / "one", input=str(one), **job).nifti)).dataobj)[:, :, 0]
    np.testing.assert_array_equal(values, ref)
    assert not (values == NODATA).any()
    assert ((xy > threshold_otsu(xy)) == (values == 1)).mean() > 0.999


def test_validate_words_a_volume_in_voxels_and_blocks(tmp_path):
    xy, affine = _ch2_slice()
    flat = tmp_path / "slice_2d.nii.gz"
    nib.save(nib.Nifti1Image(xy, affine), str(flat))
    proc = segpipe(tmp_path, "validate", {"input": str(flat), "output": str(tmp_path / "out"),
                                          "method": {"name": "otsu"}, "tile_size": 64})
    assert proc.returncode == 0, proc.stderr
    assert "volume, 181x217x1 voxels" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("blocks:"))
    assert "64 voxels a side (12 blocks)" in line and " px" not in line, line
    assert "tiles:" not in proc.stdout
    assert not (tmp_path / "out").exists()
