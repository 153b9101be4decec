"""Medical volumes: NIfTI files and DICOM series (a folder of slices), read window by window.

Axis convention: a volume is stored and processed as ``(z, y, x)`` = NIfTI's ``(k, j, i)``, which
is C order for the array NIfTI keeps on disk in Fortran order, so slabs of ``z`` stream straight to
and from files. Geometry is kept as the NIfTI-style 4x4 ``affine`` that maps voxel ``(i, j, k)``
to RAS+ millimetres; spacing, origin and direction are derived from it and written alongside.
DICOM (LPS+) geometry is converted to the same RAS+ affine, so both formats export alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.errors import InputError, first_line
from segpipe.geometry import Box, SceneGeometry
from segpipe.io.dicom import group_series, is_dicom_file, pick
from segpipe.io.extras import require
from segpipe.io.fingerprint import source_fingerprint
from segpipe.io.paths import split_series, with_series

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


_is_dicom_file = is_dicom_file  # carries the DICOM magic (segpipe.io.dicom: discovery and reading agree)


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of ``folder``, sorted by name."""
    return [p for p in sorted(folder.iterdir()) if _is_dicom_file(p)]


def is_dicom_series(path: str | Path) -> bool:
    """A folder with at least one DICOM file (stops at the first one found), or one series of such a folder
    (``<folder>#series=<UID or description>``, :mod:`segpipe.io.dicom`)."""
    p = Path(split_series(path)[0])
    return p.is_dir() and any(_is_dicom_file(q) for q in p.iterdir())


def is_volume(path: str | Path) -> bool:
    return is_nifti(path) or is_dicom_series(path)


def volume_stem(path: str | Path) -> str:
    """Name of a volume without its format suffix (``ct.nii.gz`` -> ``ct``; a DICOM folder's name)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(path).is_file() else name


@dataclass(frozen=True)
class VolumeInfo:
    """Shape ``(z, y, x)``, bands, dtype and the RAS+ affine of voxel ``(i, j, k)``."""

    path: str
    shape: tuple[int, int, int]
    count: int
    dtype: str
    affine: tuple[tuple[float, ...], ...]
    xform_code: int = 1  # NIfTI sform code of the source (1 scanner, 2 aligned, 3 Talairach, 4 MNI)

    @property
    def grid(self) -> SceneGeometry:
        """Where the voxels lie: the grid value every reader returns."""
        return SceneGeometry.volume(self.shape, self.affine, self.xform_code)


# --- NIfTI -----------------------------------------------------------------------------------------

def _nifti(path: str):  # noqa: ANN202 - nibabel image
    """The image, opened once per process and file version.

    The file stays open so that slab after slab of a ``.nii.gz`` continues from the gzip index
    (indexed_gzip) instead of decompressing from the start of the file for every slab.
    """
    return _open_nifti(path, source_fingerprint(path)["mtime_ns"])


@lru_cache(maxsize=8)
def _open_nifti(path: str, stamp: int):  # noqa: ANN202, ARG001 - the stamp only keys the cache
    import nibabel as nib

    try:
        img = nib.load(path, keep_file_open=True)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise InputError(f"input volume is not a readable NIfTI file ({str(exc).splitlines()[0]}): {path}") from None
    if len(img.shape) not in (2, 3, 4):
        raise InputError(f"input volume has {len(img.shape)} dimension(s); 2-D (one slice), 3-D or 4-D (bands last) "
                         f"needed: {path}")
    return img


def _ijk_shape(img) -> tuple[int, ...]:  # noqa: ANN001 - nibabel image
    """The image's shape as (i, j, k[, band]): a 2-D NIfTI is one slice, k of length 1.

    Why: a single slice saved as 2-D (shape (X, Y)) is a volume of one slice to NIfTI itself (dim[3] = 1, its
    affine is still 4x4), so it is read as one, and its result is the (X, Y, 1) label volume with the same affine.
    """
    return (*img.shape, 1) if len(img.shape) == 2 else tuple(img.shape)


def _nifti_info(path: str) -> VolumeInfo:
    img = _nifti(path)
    shape = _ijk_shape(img)
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"input volume has a degenerate affine (no usable voxel geometry): {path}")
    dtype = np.dtype(img.get_data_dtype())
    scaled = img.dataobj.slope != 1 or img.dataobj.inter != 0
    try:  # decode the last voxel so that a truncated file fails here, before any output exists
        np.asarray(img.dataobj[(-1,) * len(img.shape)])
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"input volume is corrupt ({str(exc).splitlines()[0]}): {path}") from None
    code = int(img.header["sform_code"]) or int(img.header["qform_code"]) or 1
    return VolumeInfo(path, (shape[2], shape[1], shape[0]), shape[3] if len(shape) == 4 else 1,
                      "float32" if scaled else dtype.name, tuple(tuple(float(v) for v in r) for r in affine), code)


def _read_nifti(path: str, box: Box) -> np.ndarray:
    img = _nifti(path)
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    if len(img.shape) == 2:  # one slice (see _ijk_shape)
        a = np.asarray(img.dataobj[x0:x1, y0:y1])[:, :, None][:, :, z0:z1]
    else:
        a = np.asarray(img.dataobj[x0:x1, y0:y1, z0:z1])  # (i, j, k[, band])
    if a.ndim == 3:
        a = a[..., None]
    return np.ascontiguousarray(a.transpose(3, 2, 1, 0))  # (band, z, y, x)


# --- DICOM -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Series:
    files: tuple[str, ...]  # sorted along the slice normal
    affine: np.ndarray
    rows: int
    cols: int
    dtype: str


@lru_cache(maxsize=8)
def _series(folder: str, stamp: str) -> _Series:
    """Sort one series' slices along their normal and derive its RAS+ affine (cached per folder state)."""
    pydicom = require("pydicom", "medical", "reading DICOM series")
    directory, selector = split_series(folder)  # a folder, or one series of a folder holding several
    files = _dicom_files(Path(directory))
    headers = []
    for f in files:
        try:
            headers.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"DICOM file is unreadable ({str(exc).splitlines()[0]}): {f}") from None
    groups = group_series(directory, headers)  # by SeriesInstanceUID; a DICOMDIR or non-image object is no slice
    headers = groups[pick([s for s, _ in groups.values()], folder, selector).uid][1]
    need = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for f, h in headers:
        missing = [k for k in need if k not in h]
        if missing:
            raise InputError(f"DICOM slice lacks {', '.join(missing)}, so its geometry is unknown: {f}")
    iop = np.asarray(headers[0][1].ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = [(float(np.dot(np.asarray(h.ImagePositionPatient, float), normal)), str(f), h) for f, h in headers]
    pos.sort(key=lambda t: t[0])
    steps = np.diff([p[0] for p in pos])
    if len(pos) > 1 and (np.any(steps <= 0) or np.ptp(steps) > 1e-3 * max(1.0, abs(float(np.mean(steps))))):
        raise InputError(f"DICOM slices are not evenly spaced along their normal (missing or duplicate slice): "
                         f"{folder}")
    h0 = pos[0][2]
    dr, dc = (float(v) for v in h0.PixelSpacing)  # between rows (along j), between columns (along i)
    dk = float(np.mean(steps)) if len(pos) > 1 else float(h0.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = normal * dk
    lps[:3, 3] = np.asarray(h0.ImagePositionPatient, float)
    bits = int(h0.get("BitsAllocated", 16))
    signed = int(h0.get("PixelRepresentation", 0)) == 1
    scaled = any(float(h.get("RescaleSlope", 1) or 1) != 1 or float(h.get("RescaleIntercept", 0) or 0) != 0
                 for _, _, h in pos)
    dtype = "float32" if scaled else f"{'int' if signed else 'uint'}{bits}"
    return _Series(tuple(p[1] for p in pos), LPS_TO_RAS @ lps, int(h0.Rows), int(h0.Columns), dtype)


def _series_of(folder: str) -> _Series:
    return _series(folder, source_fingerprint(folder)["mtime_ns"])


def dicom_slices(path: str) -> tuple[str, ...]:
    """The slice files of a DICOM series input in the order the volume stacks them: file ``k`` is slice ``k`` of
    the (z, y, x) array (NIfTI's third axis), its rows and columns kept as stored. Exports that refer back to the
    source (DICOM-SEG) take this order rather than sorting the slices again."""
    return _series_of(path).files


PIXEL_DATA = 0x7FE00010  # the (7FE0,0010) Pixel Data tag


def _pixel_bytes(h: Any) -> int:
    """Bytes of native pixel data a slice header describes: Rows x Columns x SamplesPerPixel x NumberOfFrames x
    BitsAllocated / 8, rounded up to whole bytes."""
    values = int(h.Rows) * int(h.Columns) * int(h.get("SamplesPerPixel", 1) or 1)
    return (values * int(h.get("NumberOfFrames", 1) or 1) * int(h.get("BitsAllocated", 16)) + 7) // 8


def _pixel_data_problem(path: str) -> str | None:
    """What is wrong with a slice's pixel data, told from its header alone (None: nothing found).

    Why: a slice cut short (an interrupted copy or download) otherwise fails only when ingest decodes it, with
    pydicom's message, no file name, and stores already made. The Pixel Data element's declared length and where
    its value starts tell it up front without reading the pixels (``defer_size`` skips them). Compressed
    (encapsulated) pixel data has no length to compare and is left to decoding.
    """
    pydicom = require("pydicom", "medical", "reading DICOM series")
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
        element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad files
        return f"is unreadable ({first_line(exc)})"
    if element is None:
        return "has no pixel data"
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_encapsulated:
        return None
    if element.value is not None:  # a small value, read with the header
        have = len(element.value)
    else:
        have = min(int(element.length), Path(path).stat().st_size - int(element.value_tell))
    need = _pixel_bytes(ds)
    if have < need:
        return f"has {max(have, 0)} of the {need} bytes of pixel data its header describes (truncated or corrupt)"
    return None


@lru_cache(maxsize=8)
def _checked_slices(folder: str, stamp: str) -> int:  # noqa: ARG001 - the stamp only keys the cache
    """Every slice of the series holds the pixel data its header describes (:func:`_pixel_data_problem`), or
    an :class:`InputError` naming the first that does not. Checked once per folder state."""
    files = _series_of(folder).files
    for f in files:
        problem = _pixel_data_problem(f)
        if problem:
            raise InputError(f"DICOM slice {problem}: {f}")
    return len(files)


def _dicom_info(path: str) -> VolumeInfo:
    s = _series_of(path)
    _checked_slices(path, source_fingerprint(path)["mtime_ns"])
    try:  # decode one slice so that undecodable pixel data fails here, before any output exists
        _read_dicom(path, Box((len(s.files) - 1, 0, 0), (len(s.files), 1, 1)))
    except (ValueError, RuntimeError, AttributeError) as exc:
        raise InputError(f"DICOM pixel data cannot be decoded ({str(exc).splitlines()[0]}): {path}") from None
    return VolumeInfo(path, (len(s.files), s.rows, s.cols), 1, s.dtype,
                      tuple(tuple(float(v) for v in r) for r in s.affine))


def _read_dicom(path: str, box: Box) -> np.ndarray:
    pydicom = require("pydicom", "medical", "reading DICOM series")
    s = _series_of(path)
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    out = np.empty((1, z1 - z0, y1 - y0, x1 - x0), np.dtype(s.dtype))
    for k, f in enumerate(s.files[z0:z1]):
        ds = pydicom.dcmread(f)
        if (int(ds.Rows), int(ds.Columns)) != (s.rows, s.cols):
            raise InputError(f"DICOM slice has another size ({ds.Columns}x{ds.Rows}) than the series: {f}")
        px = ds.pixel_array[y0:y1, x0:x1]
        slope, inter = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        out[0, k] = px * slope + inter if s.dtype == "float32" else px
    return out


# --- either format ---------------------------------------------------------------------------------

def volume_info(path: str | Path) -> VolumeInfo:
    """Inspect a NIfTI file or DICOM series folder without loading its voxels."""
    folder, selector = split_series(path)
    p = Path(folder)
    if not p.exists():
        raise InputError(f"input volume not found: {p}")
    path = str(p.resolve()) if selector is None else with_series(p.resolve(), selector)
    return _nifti_info(path) if is_nifti(path) else _dicom_info(path)


def read_volume(path: str, box: Box) -> np.ndarray:
    """Voxels ``(band, z, y, x)`` of ``box``."""
    return _read_nifti(path, box) if is_nifti(path) else _read_dicom(path, box)
