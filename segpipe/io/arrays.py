"""In-memory sources (xarray DataArray, numpy or dask array) written as the files the pipeline reads.

Why a file and not a store of its own: every check, reader, fingerprint and resume rule of the pipeline is
defined on a source file, so an array written once as a GeoTIFF (2-D images, any band count) or a NIfTI volume
(3-D, with a 4x4 affine) behaves exactly like the same pixels given as a path. The file is written beside the
results (``<output>/source.tif`` or ``source.nii.gz``) with the SHA-256 of what it holds; a later call with the
same pixels and georeferencing keeps the file untouched, so the run resumes instead of starting over.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from segpipe.errors import InputError

# GDAL stores these as they are; bool becomes uint8.
GDAL_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64", "float32", "float64"}
ROWS_PER_WRITE = 512  # rows of a dask array computed and written at a time: bounded memory, whole GeoTIFF tiles


@dataclass(frozen=True)
class ArraySource:
    """An array with what places its pixels: ``(bands, y, x)`` with a 2-D affine and CRS, or ``(z, y, x)`` with
    a 4x4 NIfTI affine (voxel ``(x, y, z)`` index to RAS+ millimetres)."""

    data: Any  # numpy or dask array
    transform: Affine | None = None
    crs: CRS | None = None
    affine: np.ndarray | None = None
    nodata: float | None = None

    @property
    def is_volume(self) -> bool:
        return self.affine is not None

    @property
    def file_name(self) -> str:
        return "source.nii.gz" if self.is_volume else "source.tif"


def is_array(source: Any) -> bool:
    """Whether ``source`` is pixels rather than a path or URL."""
    return hasattr(source, "shape") and hasattr(source, "dtype")


def array_source(source: Any, crs: Any = None, transform: Any = None, nodata: float | None = None) -> ArraySource:
    """Check an in-memory source and what georeferences it; nothing is written.

    An ``xr.DataArray`` brings its CRS, transform and nodata through rioxarray (which also reads odc-geo's and
    CF's ``spatial_ref`` coordinate); ``crs``/``transform``/``nodata`` given here take precedence. A numpy or
    dask array needs ``transform``: an affine (``affine.Affine`` or its 6 GDAL-order numbers ``a, b, c, d, e,
    f``) with a ``crs`` for an image, or a 4x4 matrix for a ``(z, y, x)`` volume.
    """
    data = source
    if _is_data_array(source):
        data, da_crs, da_transform, da_nodata = _from_data_array(source)
        crs = crs if crs is not None else da_crs
        transform = transform if transform is not None else da_transform
        nodata = nodata if nodata is not None else da_nodata
    dtype = np.dtype(data.dtype)
    if dtype.kind == "b":
        data = data.astype(np.uint8)
    elif dtype.name not in GDAL_DTYPES:
        raise InputError(f"array source of dtype {dtype} cannot be segmented (use an integer or float dtype)")
    if transform is None:
        raise InputError("an array source needs transform= (an affine for an image, a 4x4 affine for a volume), "
                         "or an xarray DataArray with x/y coordinates and a CRS")
    matrix = np.asarray(transform, dtype=float) if not isinstance(transform, Affine) else None
    if matrix is not None and matrix.shape == (4, 4):
        if data.ndim != 3:
            raise InputError(f"a 4x4 affine places a (z, y, x) volume; this array has shape {tuple(data.shape)}")
        return ArraySource(data, affine=matrix, nodata=nodata)
    if not isinstance(transform, Affine):
        if matrix is None or matrix.size not in (6, 9):
            raise InputError(f"transform must be an affine (6 numbers a, b, c, d, e, f) or a 4x4 matrix: {transform}")
        transform = Affine(*matrix.ravel()[:6])
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputError(f"an image array is (y, x) or (band, y, x); this one has shape {tuple(data.shape)}")
    if crs is None:
        raise InputError("an image array source needs crs= (e.g. 'EPSG:32633'), or a DataArray with a CRS")
    try:
        crs = CRS.from_user_input(crs)
    except Exception as exc:  # noqa: BLE001 - pyproj/rasterio raise several types for a bad CRS
        raise InputError(f"crs {crs!r} is not a coordinate reference system ({exc})") from None
    return ArraySource(data, transform=transform, crs=crs, nodata=nodata)


def _is_data_array(source: Any) -> bool:
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a core dependency
        return False
    return isinstance(source, xr.DataArray)


def _from_data_array(da: Any) -> tuple[Any, CRS | None, Affine | None, float | None]:
    """A DataArray's pixels as (band, y, x) or (y, x), and its CRS, transform and nodata via rioxarray."""
    import rioxarray  # noqa: F401 - registers the .rio accessor

    try:
        y, x = da.rio.y_dim, da.rio.x_dim
        transform = da.rio.transform(recalc=True)
    except Exception as exc:  # noqa: BLE001 - rioxarray raises its own types for missing spatial dims
        raise InputError(f"DataArray source has no x/y spatial dimensions rioxarray can read ({exc})") from None
    others = [d for d in da.dims if d not in (y, x)]
    if len(others) > 1:
        raise InputError(f"DataArray source has dimensions {da.dims}; an image is (band, y, x) or (y, x)")
    da = da.transpose(*others, y, x)
    return da.data, da.rio.crs, transform, da.rio.nodata


def write_array_source(src: ArraySource, folder: Path) -> tuple[Path, bool]:
    """Write ``src`` into ``folder`` unless the file there already holds the same pixels and georeferencing.

    Returns the file and whether this call wrote it (for taking it back when the job is then refused).
    Written under a temporary name with its hash computed on the way, then renamed: one pass over a dask
    array, and a killed write never leaves a half file under the final name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / src.file_name
    stamp = dest.with_name(dest.name + ".sha256")
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.staging{''.join(dest.suffixes)}")
    digest = hashlib.sha256(_header(src).encode())
    try:
        if src.is_volume:
            _write_nifti(src, staging, digest)
        else:
            _write_geotiff(src, staging, digest)
        if dest.is_file() and stamp.is_file() and stamp.read_text().strip() == digest.hexdigest():
            staging.unlink()
            return dest, False
        os.replace(staging, dest)
        stamp.write_text(digest.hexdigest() + "\n")
        return dest, True
    finally:
        staging.unlink(missing_ok=True)


def remove_array_source(path: Path) -> None:
    """Take back a source file this call wrote (and its hash) when the job is refused after all."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def _header(src: ArraySource) -> str:
    where = src.affine.tolist() if src.is_volume else [*src.transform[:6], src.crs.to_wkt()]
    return repr((tuple(src.data.shape), str(src.data.dtype), where, src.nodata))


def _write_geotiff(src: ArraySource, path: Path, digest: Any) -> None:
    import rasterio

    from segpipe.io.raster import quiet_not_georeferenced

    bands, height, width = src.data.shape
    profile = {"driver": "GTiff", "height": height, "width": width, "count": bands, "dtype": str(src.data.dtype),
               "crs": src.crs, "transform": src.transform, "nodata": src.nodata, "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    quiet_not_georeferenced()
    with rasterio.open(path, "w", **profile) as out:
        for r0 in range(0, height, ROWS_PER_WRITE):
            r1 = min(height, r0 + ROWS_PER_WRITE)
            block = np.ascontiguousarray(np.asarray(src.data[:, r0:r1, :]))
            digest.update(block.tobytes())
            out.write(block, window=((r0, r1), (0, width)))


def _write_nifti(src: ArraySource, path: Path, digest: Any) -> None:
    import nibabel as nib

    zyx = np.asarray(src.data)  # nibabel writes a whole image; volumes given as arrays fit in memory
    digest.update(np.ascontiguousarray(zyx).tobytes())
    img = nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), src.affine)
    img.header.set_sform(src.affine, code=1)
    img.header.set_qform(src.affine, code=1)
    nib.save(img, str(path))
