"""NIfTI export of a volume's class map, with the source volume's affine.

The class array is (z, y, x) in C order, which is exactly NIfTI's on-disk (i, j, k) Fortran order,
so the file is streamed slab by slab after its header (bounded memory for any volume size). The
header carries the source affine as both sform and qform (with the source's sform code), the
NIfTI label intent, and millimetre units; 255 marks voxels that were not segmented. The file is
written under a temporary name and renamed into place, so a failed export never leaves a
half-written file over a good one.
"""

from __future__ import annotations

import gzip
import os
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from segpipe.io.store import remove_leftovers

HEADER_BYTES = 352  # 348-byte NIfTI-1 header + 4-byte extension flag (no extensions)


def export_nifti(result_path: str, dest: str | Path, slab: int | None = None) -> Path:
    """Write ``class`` of a volume result store to ``dest`` (``.nii`` or ``.nii.gz``)."""
    group = zarr.open_group(result_path, mode="r")
    arr = group["class"]
    depth, height, width = arr.shape
    affine = np.asarray(group.attrs["affine"], dtype=np.float64)
    code = int(group.attrs.get("nifti_xform_code", 1))
    names = list(group.attrs.get("class_names", []))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((width, height, depth))
    hdr.set_data_dtype(np.uint8)
    hdr.set_sform(affine, code=code)
    hdr.set_qform(affine, code=code)
    hdr.set_xyzt_units("mm")
    hdr.set_intent("label")
    hdr.set_data_offset(HEADER_BYTES)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["descrip"] = ("classes: " + ",".join(names))[:79].encode()
    hdr["cal_min"], hdr["cal_max"] = 0, max(0, len(names) - 1)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    step = slab or int(arr.chunks[0])
    try:
        with ExitStack() as stack:
            raw = stack.enter_context(open(tmp, "wb"))
            f = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0)) \
                if dest.name.lower().endswith(".gz") else raw
            f.write(hdr.binaryblock)
            f.write(b"\0" * (HEADER_BYTES - len(hdr.binaryblock)))
            for z0 in range(0, depth, step):
                block = np.asarray(arr[z0:min(depth, z0 + step)], dtype=np.uint8)
                f.write(np.ascontiguousarray(block).tobytes())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest

