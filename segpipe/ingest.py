"""Source (GeoTIFF/COG, whole-slide image, NIfTI or DICOM series) -> chunked Zarr v3 scene store.

Memory is bounded by one row of chunks per task whatever the scene size: each task reads one row
of chunk windows (for volumes, one slab of chunk thickness along z) from the source and writes
them straight into whole Zarr chunks, so no two tasks write the same chunk and no lock is needed.
For rasters, validity comes from GDAL's dataset mask, so nodata values, alpha bands and internal
masks are all honoured; for slides it is the scanned area intersected with the tissue mask; every
voxel of a volume is valid unless the job names a ``nodata`` value.

The validity array's fill value is 1 (valid) and an all-valid span is never written: most scenes are
valid almost everywhere, so validity costs neither encoding nor storage there. The pixels are stored with
Blosc's LZ4 over shuffled bytes: measured on a uint16 GeoTIFF it wrote 1.4x faster than Zarr's default
zstd and read no slower, at 0.69 instead of 0.59 of the raw size.
"""

from __future__ import annotations

from contextlib import ExitStack, suppress
from pathlib import Path

import numpy as np
import rasterio
import zarr
from distributed import Client
from rasterio.enums import MaskFlags
from zarr.codecs import BloscCodec

from segpipe import progress
from segpipe.config import JobSpec
from segpipe.errors import InputError
from segpipe.grid import Box, TileGrid
from segpipe.io.fingerprint import source_fingerprint
from segpipe.io.raster import RasterInfo, is_remote, open_raster, raster_info
from segpipe.io.slide import is_slide, read_window, slide_info, tissue_mask, upsample_mask
from segpipe.io.source_pixels import SourcePixels, suits_in_place
from segpipe.io.store import Marks, ensure_array, geo_attrs, open_or_create, remove_store
from segpipe.io.volume import is_volume, read_volume, volume_info
from segpipe.scene import Scene, scene_path

STAGE = "ingest"
IMAGE_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def selected_bands(job: JobSpec, info: RasterInfo) -> list[int]:
    """The 1-based bands to ingest; refuse band numbers the file does not have."""
    bands = job.bands or list(range(1, info.count + 1))
    missing = [b for b in bands if b > info.count]
    if missing:
        raise InputError(f"band(s) {missing} requested but {info.path} has {info.count} band(s)")
    return bands


def fingerprint(job: JobSpec, info: RasterInfo) -> dict:
    """What the scene store depends on: change any of it and the store must not be reused."""
    if is_remote(info.path):
        with open_raster(info.path) as ds:  # objects change under the same URL: identify by content metadata
            stamp = {"size": None, "mtime_ns": ds.tags().get("TIFFTAG_DATETIME")}
    else:
        stamp = source_fingerprint(info.path)
    return {"source": info.path, **stamp, "shape": [info.count, *info.shape],
            "bands": selected_bands(job, info), "nodata": job.nodata, "chunk": job.chunk_for(len(info.shape)),
            "pixels": "source" if in_place(job, info) else "copy", **({"level": info.level} if info.level else {})}


def in_place(job: JobSpec, info: RasterInfo) -> bool:
    """Whether the job reads the source's pixels in place instead of copying them (see ``pixels``)."""
    return job.pixels == "auto" and info.kind == "raster" and suits_in_place(info.block, job.chunk_for(2))


def source_info(path: str, level: int = 0) -> RasterInfo:
    """Inspect the input: GeoTIFF/COG (rasterio), whole-slide image (OpenSlide; at pyramid ``level``) or volume
    (nibabel/pydicom)."""
    if not is_remote(path) and is_volume(path):
        v = volume_info(path)
        return RasterInfo(v.path, v.shape[1], v.shape[2], v.count, v.dtype, None, rasterio.Affine.identity(), None,
                          (None,) * v.count, kind="volume", depth=v.shape[0], geometry=v.attrs())
    if not is_slide(path):
        return raster_info(path)
    s = slide_info(path, level)
    return RasterInfo(s.path, s.height, s.width, 3, "uint8", None, s.transform, None, ("red", "green", "blue"),
                      kind="slide", mpp=(s.mpp_x, s.mpp_y), level=s.level)


def _read_raster(ds: rasterio.DatasetReader, w: Box, bands: list[int],
                 nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
    rwin = ((w.row0, w.row1), (w.col0, w.col1))
    data = ds.read(bands, window=rwin)
    if nodata is not None:
        ok = _not_nodata(data, nodata)
    else:
        ok = ds.dataset_mask(window=rwin) > 0
        if np.issubdtype(data.dtype, np.floating):
            ok &= np.all(np.isfinite(data), axis=0)
    return data, ok


def _read_slide(src: str, w: Box, bands: list[int], tissue: tuple[np.ndarray, float],
                level: int) -> tuple[np.ndarray, np.ndarray]:
    rgb, scanned = read_window(src, w, level)
    return rgb[[b - 1 for b in bands]], scanned & upsample_mask(*tissue, w)


def _read_volume(src: str, w: Box, bands: list[int], nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
    data = read_volume(src, w)[[b - 1 for b in bands]]
    return data, np.ones(w.shape, bool) if nodata is None else _not_nodata(data, nodata)


def _valid_everywhere(ds: rasterio.DatasetReader) -> bool:
    """An integer raster without nodata, mask or alpha in any band: GDAL's dataset mask is valid everywhere."""
    return (np.issubdtype(np.dtype(ds.dtypes[0]), np.integer)
            and all(ds.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in range(1, ds.count + 1)))


def _not_nodata(data: np.ndarray, nodata: float) -> np.ndarray:
    """Pixels where no band holds the nodata value (NaN compared as NaN)."""
    return ~np.any(np.isnan(data) if np.isnan(nodata) else data == nodata, axis=0)


def _ingest_row(src: str, store: str, row: int, chunk: int, bands: list[int], nodata: float | None,
                tissue: tuple[np.ndarray, float] | None = None, level: int = 0) -> int:
    """Copy one row of chunk windows (a z slab for volumes) from ``src`` into the store; returns the row.

    A store without an ``image`` array reads the pixels in place: only validity is written.
    """
    group = zarr.open_group(store, mode="r+")
    valid = group["valid"]
    image = group["image"] if "image" in group else None
    grid = TileGrid(tuple(valid.shape), chunk)
    if len(grid.shape) == 3:  # one read per slab: volume formats are read slice-wise anyway
        w = Box((row * chunk, 0, 0), (min(grid.shape[0], (row + 1) * chunk), *grid.shape[1:]))
        data, ok = _read_volume(src, w, bands, nodata)
        image[(slice(None), *w.slices)] = data
        _write_valid(valid, w.slices, ok)
        Marks(store, STAGE).mark(str(row))
        return row
    with ExitStack() as stack:
        ds = None if tissue is not None else stack.enter_context(open_raster(src))
        if image is None and ds is not None and nodata is None and _valid_everywhere(ds):
            Marks(store, STAGE).mark(str(row))  # nothing to copy and nothing to learn: no pixel is read
            return row
        dtype = image.dtype if image is not None else np.dtype(ds.dtypes[0])  # in place: rasters only
        for w in _row_spans(grid, row, dtype.itemsize * len(bands)):
            data, ok = _read_slide(src, w, bands, tissue, level) if ds is None else _read_raster(ds, w, bands, nodata)
            if image is not None:
                image[:, w.row0:w.row1, w.col0:w.col1] = data
            _write_valid(valid, w.slices, ok)
    Marks(store, STAGE).mark(str(row))
    return row


def _write_valid(valid: zarr.Array, where: tuple[slice, ...], ok: np.ndarray) -> None:
    """Store a window's validity; nothing to write where all is valid and the array reads as valid when unwritten.

    A store ingested by an older version has fill value 0 and gets every window written.
    """
    if valid.fill_value == 1 and ok.all():
        return
    valid[where] = ok.astype(np.uint8)


def _row_spans(grid: TileGrid, row: int, bytes_per_pixel: int, budget: int = 64 * 2**20) -> list[Box]:
    """Row ``row`` of chunk windows in as few reads as fit ``budget`` bytes, each a whole number of chunks.

    One read and one Zarr write per span instead of per chunk: GDAL decodes the span's blocks in one call
    and Zarr writes its chunks in one (concurrent) call, which is where per-chunk overhead went.
    """
    core = grid.tile((row, 0)).core
    width, n = grid.size[-1], grid.counts[-1]
    step = max(1, budget // max(1, core.height * width * bytes_per_pixel))
    return [Box.rc(core.row0, c * width, core.row1, min(grid.shape[-1], (c + step) * width)) for c in range(0, n, step)]


def ingest(job: JobSpec, info: RasterInfo, client: Client) -> Scene:
    """Ingest the job's input into ``<output>/scene.zarr``; resumes a partial ingest."""
    store = scene_path(job.store_root)
    created = _missing_folders(Path(job.output))
    Path(job.output).mkdir(parents=True, exist_ok=True)
    bands = selected_bands(job, info)
    group = open_or_create(store, fingerprint(job, info), "scene store")
    nd = len(info.shape)
    c = job.chunk_for(nd)
    dims = ("z", "y", "x")[-nd:]
    pixels = {}
    if in_place(job, info):
        pixels = SourcePixels(info.path, bands, info.shape, info.dtype, c).attrs()
    else:
        ensure_array(group, "image", (len(bands), *info.shape), (len(bands), *(c,) * nd), info.dtype,
                     0, ("band", *dims), compressors=IMAGE_CODEC)
    ensure_array(group, "valid", info.shape, (c,) * nd, "uint8", 1, dims)
    geometry = info.geometry if info.geometry is not None else geo_attrs(info.crs, info.transform, info.mpp)
    group.attrs.update({**geometry, **pixels, "source": info.path, "kind": info.kind, "all_valid": False,
                        "bands": bands, "nodata": job.nodata if job.nodata is not None else info.nodata,
                        "band_names": [info.descriptions[b - 1] or f"band{b}" for b in bands]})
    marks = Marks(store, STAGE)
    done = marks.keys()
    total = TileGrid(info.shape, c).counts[0]
    rows = [r for r in range(total) if str(r) not in done]
    tissue = tissue_mask(info.path, level=info.level) if info.kind == "slide" and rows else None
    futures = client.map(_ingest_row, [info.path] * len(rows), [store] * len(rows), rows,
                         chunk=c, bands=bands, nodata=job.nodata, tissue=tissue, level=info.level, pure=False)
    with progress.stage("ingest", total, "row" if nd == 2 else "slab", done=total - len(rows)) as advance:
        progress.gather(client, futures, advance)
    valid = group["valid"]
    # No validity chunk written (fill value 1) means every pixel is valid: readers then skip the array.
    group.attrs["all_valid"] = bool(valid.fill_value == 1 and valid.nchunks_initialized == 0)
    if not group.attrs["all_valid"] and not _any_valid(valid):
        # Only the pixels can tell, so this is found here rather than in the up-front checks: take back
        # what this run wrote so the output is as it was, and say so in one line.
        remove_store(store)
        for folder in created:
            with suppress(OSError):  # a folder something else wrote into stays
                folder.rmdir()
        raise InputError(f"input has no valid pixel (every pixel is nodata or masked): {info.path}")
    return Scene(store)


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first: what ``mkdir(parents=True)`` makes."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _any_valid(valid: zarr.Array) -> bool:
    """Whether any pixel of the validity array is valid, reading as little as it takes.

    An unwritten chunk reads as its fill value, so with fill 1 a missing chunk is a valid one; otherwise
    the array is read a slab of chunks at a time and the scan stops at the first valid pixel.
    """
    if valid.fill_value == 1 and valid.nchunks_initialized < valid.nchunks:
        return True
    step = valid.chunks[0]
    return any(np.any(valid[r:r + step]) for r in range(0, valid.shape[0], step))
