"""Real medical test data (Debian packages, see ../shared/DATA.md) and files derived from it.

- MRI: the Colin27 ``ch2`` T1 template with its skull-stripped version ``ch2bet`` (brain mask = > 0)
  and the AAL atlas, all on the same 181 x 217 x 181, 1 mm grid (package ``mricron-data``).
- CT: InVesalius' ``Cranium.inv3`` head CT (108 x 256 x 256 int16 HU, 0.957 x 0.957 x 1.5 mm) with
  its two threshold masks (bone: 226..3071 HU; head: -142..2986 HU) (package ``invesalius-examples``).
  Derived here: the CT as NIfTI, and as a DICOM series (one file per slice, shuffled file names,
  stored as unsigned values with a rescale intercept) so that DICOM geometry and rescaling are
  exercised on real voxels.
"""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

MRI = Path("/usr/share/mricron/templates")
CH2, CH2BET, AAL = MRI / "ch2.nii.gz", MRI / "ch2bet.nii.gz", MRI / "aal.nii.gz"
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
CT_ORIGIN_LPS = (-122.0, -130.0, 40.0)  # any origin: the CT project file stores none


@dataclass(frozen=True)
class CT:
    hu: np.ndarray  # (z, y, x) int16
    bone: np.ndarray  # (z, y, x) bool
    head: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) mm


@lru_cache(maxsize=1)
def load_ct() -> CT:
    """The CT and its masks from the InVesalius project (a gzip tar of plists and raw arrays)."""
    with tarfile.open(CRANIUM) as tar:
        files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def raw(name: str) -> bytes:
            return tar.extractfile(files[name]).read()

        main = plistlib.loads(raw("main.plist"))
        shape = tuple(main["matrix"]["shape"])
        hu = np.frombuffer(raw(main["matrix"]["filename"]), dtype=main["matrix"]["dtype"]).reshape(shape)

        def mask(k: int) -> np.ndarray:
            info = plistlib.loads(raw(f"mask_{k}.plist"))
            m = np.frombuffer(raw(info["mask_file"]), np.uint8).reshape(info["mask_shape"])
            return m[1:, 1:, 1:] > 0  # InVesalius pads each axis by one leading slice

        sx, sy, sz = main["spacing"]
        return CT(hu.copy(), mask(0), mask(1), (float(sz), float(sy), float(sx)))


def ct_affine(ct: CT) -> np.ndarray:
    """RAS+ affine of the derived CT files: axial slices, LPS origin as a DICOM scanner would write it."""
    sz, sy, sx = ct.spacing
    a = np.diag([-sx, -sy, sz, 1.0])
    a[:3, 3] = [-CT_ORIGIN_LPS[0], -CT_ORIGIN_LPS[1], CT_ORIGIN_LPS[2]]
    return a


def write_nifti(path: Path, zyx: np.ndarray, affine: np.ndarray, code: int = 1) -> Path:
    """Write a (z, y, x) array as NIfTI (stored as (i, j, k) = (x, y, z))."""
    img = nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine)
    img.header.set_sform(affine, code=code)
    img.header.set_qform(affine, code=code)
    nib.save(img, str(path))
    return path


def write_dicom_series(folder: Path, ct: CT) -> Path:
    """Derived: the CT as a DICOM CT series, slice files named in shuffled order."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    sz, sy, sx = ct.spacing
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(ct.hu.shape[0])
    for k in range(ct.hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "cranium"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [CT_ORIGIN_LPS[0], CT_ORIGIN_LPS[1], CT_ORIGIN_LPS[2] + k * sz]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.Rows, ds.Columns = ct.hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (ct.hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{order[k]:04d}.dcm", enforce_file_format=True)
    return folder


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
