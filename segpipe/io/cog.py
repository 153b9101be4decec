"""Georeferenced exports: the class map as a Cloud-Optimized GeoTIFF.

Slides (no CRS) get the same tiled, pyramidal TIFF without GeoTIFF tags, with the pixel size as
TIFF resolution tags (pixels per centimetre), which slide viewers and tifffile read.

Why it is built the way it is (a 40000² map took 172 s and 2.6 GB when GDAL did everything):

* The Zarr array is read once, in full-width strips of whole chunks (few calls, each chunk
  decoded once). Each strip goes to an uncompressed staging GeoTIFF (thrown away, so compressing it
  only costs time) and, subsampled by nearest neighbour, to one staging GeoTIFF per overview level.
  The overviews are thus made from data already in memory, never by GDAL rereading the full map.
* The overview picks are exactly GDAL's: each level is the nearest-neighbour reduction of the level
  above it, as GDAL's COG driver would make it, so classes are never averaged and the output is the
  same as when GDAL builds the pyramid itself.
* A small VRT ties the staging files together (the levels as the base's overviews) and carries the
  metadata. GDAL's COG driver then only compresses and lays out (deflate level 5, see DEFLATE_LEVEL, on
  all cores through ``NUM_THREADS``); it uses the given overviews instead of building its own.
* GDAL's block cache is bounded (default is 5 % of RAM), which is most of the old peak memory.

The COG is written to a temporary name and renamed into place, and the staging folder is removed
whatever happens: a failed export never leaves a half-written COG over a good one, nor leftovers.
"""

from __future__ import annotations

import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.io
import rasterio.shutil
import zarr

from segpipe.geometry import SceneGeometry
from segpipe.io.raster import quiet_not_georeferenced
from segpipe.io.result import NODATA
from segpipe.io.store import remove_leftovers
from segpipe.io.tiff_levels import add_level_resolutions

PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]

COG_TILE = 512
# Deflate level of the COG. Measured on a 16384² otsu map (benchmarks/bench_export.py), per core: level 6
# (GDAL's default) costs 2.5x the CPU of level 5 for a 7 % smaller file; levels 1-3 save little more time
# and make the file 18-30 % larger. ZSTD (level 1-3) compressed faster than deflate 1 but no smaller, and
# tifffile cannot read it without imagecodecs (not installed), so deflate stays.
DEFLATE_LEVEL = 5
# GDAL's block cache only needs the tiles in flight: the map is streamed once. GDAL's default (5 % of RAM)
# filled up with tiles never read again; 64 MiB was as fast as 256 MiB and 1 GiB in the benchmark.
CACHE_MB = 64
# Creation options of the staging GeoTIFFs beyond tiling. Empty (uncompressed) measured fastest; the staging
# then takes about 1.33 bytes per pixel on disk while it lives. {"compress": "zstd", "zstd_level": 1} cuts
# that tenfold for about 20 % more export time.
STAGING: dict[str, Any] = {}
MAX_STRIP_ROWS = 2048  # a strip of whole chunks taller than this is read as 512-row strips instead
GDAL_TYPES = {np.dtype("uint8"): "Byte", np.dtype("uint16"): "UInt16"}  # the map types a COG is written from


def overview_shapes(height: int, width: int, tile: int = COG_TILE) -> list[tuple[int, int]]:
    """Overview sizes as GDAL's COG driver chooses them: halve (rounding down) until one tile holds the level."""
    shapes = []
    h, w = height, width
    while h > tile or w > tile:
        h, w = max(1, h // 2), max(1, w // 2)
        shapes.append((h, w))
    return shapes


def nearest_picks(n_src: int, n_dst: int) -> np.ndarray:
    """Source indices GDAL's nearest resampling takes when reducing ``n_src`` samples to ``n_dst``.

    Same double-precision arithmetic as GDAL (``int(0.5 + i * ratio)``), so the picks match it bit for bit,
    also for odd sizes where the ratio is not exactly 2.
    """
    ratio = float(n_src) / float(n_dst)
    return np.minimum((0.5 + np.arange(n_dst, dtype=np.float64) * ratio).astype(np.int64), n_src - 1)


def overview_picks(height: int, width: int, tile: int = COG_TILE) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows and columns of the full map that each overview level shows.

    GDAL reduces each level from the one above it; composing those picks gives, per level, indices into
    the full map, so every level can be filled from the strip in memory.
    """
    picks = []
    rows, cols = np.arange(height), np.arange(width)
    for h, w in overview_shapes(height, width, tile):
        rows, cols = rows[nearest_picks(len(rows), h)], cols[nearest_picks(len(cols), w)]
        picks.append((rows, cols))
    return picks


def export_cog(result_path: str, dest: str | Path, block: int = 512, *, array: str = "class",
               names: Sequence[str] | None = None, nodata: int | None = None,
               colors: Sequence[tuple[int, int, int]] | None = None, compress: str = "DEFLATE",
               level: int | None = DEFLATE_LEVEL, num_threads: str | int = "ALL_CPUS",
               cache_mb: int = CACHE_MB) -> Path:
    """Write ``array`` (default ``class``) of the result store to ``dest`` as a COG with the scene CRS and transform.

    Any 2-D uint8 or uint16 array of a group laid out like the result store exports the same way (the change
    product's transition codes, for one), so there is one COG writer. ``names`` label the values 0, 1, ...
    (the ``class_names`` tag; default the group's ``class_names``), ``nodata`` is the no-data value (default the
    array's ``nodata`` attribute, else 255) and ``colors`` the palette entries of those values (default
    :data:`PALETTE`, cycled); uint16 maps get no palette (a 65536-entry colour table helps no viewer).
    ``block`` is the least number of rows read from Zarr at a time (rounded up to whole chunks and COG
    tiles). ``compress``/``level`` are the COG's codec and level (None: GDAL's default, 6 for deflate),
    ``num_threads`` how many threads GDAL compresses with, ``cache_mb`` the bound on GDAL's block cache.
    """
    group = zarr.open_group(result_path, mode="r")
    arr = group[array]
    if np.dtype(arr.dtype) not in GDAL_TYPES:
        raise ValueError(f"export_cog writes uint8 or uint16 maps, not {arr.dtype} ({array!r})")
    grid = SceneGeometry.of_attrs(tuple(int(n) for n in arr.shape), dict(group.attrs))
    names = list(group.attrs.get("class_names", []) if names is None else names)
    nodata = int(arr.attrs.get("nodata", NODATA) if nodata is None else nodata)
    band = _Band(array, np.dtype(arr.dtype), names, nodata, colors)
    h, w = (int(n) for n in arr.shape)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.staging")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    options: dict[str, Any] = {"compress": compress, "overview_resampling": "NEAREST", "blocksize": COG_TILE,
                               "num_threads": str(num_threads)}
    if level is not None:
        options["level"] = level
    try:
        remove_leftovers(dest)
        staging.mkdir()
        # rasterio hands GDAL_CACHEMAX to GDALSetCacheMax64: bytes, applied at once, restored on exit.
        with rasterio.Env(GDAL_CACHEMAX=cache_mb * 2**20, GDAL_NUM_THREADS=str(num_threads)):
            levels = _write_staging(arr, staging, _strip_rows(arr, block))
            vrt = _write_vrt(staging / f"{array}.vrt", grid, levels, band)
            rasterio.shutil.copy(vrt, tmp, driver="COG", **options)
        if grid.is_slide:  # every level's own pixel size, for viewers that read it per page
            add_level_resolutions(tmp, grid.mpp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return dest


def _strip_rows(arr: zarr.Array, block: int) -> int:
    """Rows per read: whole chunks (whole shards where the array has them) and whole COG tiles, so no chunk is
    decoded twice, no tile is half written and a shard is read in one piece rather than chunk by chunk (a strip
    across a shard's middle reads its index and then each chunk on its own: 40 % more export time measured at
    10^4 64-px tiles)."""
    per_tile = COG_TILE * max(1, math.ceil(block / COG_TILE))
    rows = math.lcm(int((arr.shards or arr.chunks)[0]), per_tile)
    if rows <= MAX_STRIP_ROWS:
        return rows
    rows = math.lcm(int(arr.chunks[0]), per_tile)
    return rows if rows <= MAX_STRIP_ROWS else per_tile


class _Level:
    """One overview level being filled: rows picked from each strip, written to GDAL a full tile row at a time.

    Writing whole tile rows means GDAL never holds a half-filled tile, whatever the block cache size.
    """

    def __init__(self, ds: rasterio.io.DatasetWriter, rows: np.ndarray, cols: np.ndarray) -> None:
        self.ds, self.rows, self.cols = ds, rows, cols
        self.pending: list[np.ndarray] = []
        self.written = 0

    def add(self, data: np.ndarray, r0: int) -> None:
        """Take this level's pixels from the strip ``data`` that starts at full-map row ``r0``."""
        a, b = np.searchsorted(self.rows, [r0, r0 + len(data)])
        if b > a:
            self.pending.append(data[np.ix_(self.rows[a:b] - r0, self.cols)])
        last = b == len(self.rows)
        have = sum(len(p) for p in self.pending)
        if have and (have >= COG_TILE or last):
            band = np.concatenate(self.pending)
            n = len(band) if last else len(band) // COG_TILE * COG_TILE
            self.ds.write(band[:n], 1, window=((self.written, self.written + n), (0, len(self.cols))))
            self.written += n
            self.pending = [band[n:]] if n < len(band) else []


def _write_staging(arr: zarr.Array, staging: Path, strip: int) -> list[Path]:
    """Stream the map into the uncompressed staging base and its overview levels; return their paths.

    Uncompressed because the files are read once by GDAL and deleted: a codec costs time on both sides.
    The next strip is read from Zarr while this one is written, so decoding overlaps the writes.
    """
    h, w = (int(n) for n in arr.shape)
    picks = overview_picks(h, w)
    paths = [staging / "base.tif", *(staging / f"overview{k + 1}.tif" for k in range(len(picks)))]
    shapes = [(h, w), *((len(r), len(c)) for r, c in picks)]

    def read(r0: int) -> np.ndarray:
        return np.asarray(arr[r0:min(h, r0 + strip), :], dtype=arr.dtype)

    with ExitStack() as stack:
        quiet_not_georeferenced()  # staging files carry no georeferencing: the VRT does
        outs = [stack.enter_context(rasterio.open(p, "w", driver="GTiff", height=sh[0], width=sh[1], count=1,
                                                  dtype=str(arr.dtype), tiled=True, blockxsize=COG_TILE,
                                                  blockysize=COG_TILE, **STAGING))
                for p, sh in zip(paths, shapes, strict=True)]
        levels = [_Level(ds, rows, cols) for ds, (rows, cols) in zip(outs[1:], picks, strict=True)]
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        starts = range(0, h, strip)
        ahead = pool.submit(read, starts[0])
        for i, r0 in enumerate(starts):
            data = ahead.result()
            if i + 1 < len(starts):
                ahead = pool.submit(read, starts[i + 1])
            outs[0].write(data, 1, window=((r0, r0 + len(data)), (0, w)))
            for lvl in levels:
                lvl.add(data, r0)
    return paths


@dataclass(frozen=True)
class _Band:
    """What the COG's one band says about its values: its name, type, value names, no-data value and palette."""

    description: str
    dtype: np.dtype
    names: list[str]
    nodata: int
    colors: Sequence[tuple[int, int, int]] | None = None

    def palette(self) -> dict[int, tuple[int, int, int]]:
        """Colour of each named value: the given colours, else :data:`PALETTE` cycled."""
        if self.colors is not None:
            return dict(enumerate(self.colors))
        return {i: PALETTE[i % len(PALETTE)] for i in range(max(1, len(self.names)))}


def _write_vrt(path: Path, grid: SceneGeometry, levels: list[Path], band_info: _Band) -> Path:
    """A VRT over the staging files: the levels become the base's overviews; it carries all the COG's metadata.

    GDAL's COG driver copies the VRT's dataset and band metadata, and uses existing overviews as they are.
    """
    (h, w), crs, transform, mpp = grid.shape, grid.crs, grid.transform, grid.mpp
    root = ET.Element("VRTDataset", rasterXSize=str(w), rasterYSize=str(h))
    if crs is not None:
        ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = crs.to_wkt()
        ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in transform.to_gdal())
    md = ET.SubElement(root, "Metadata")
    tags = {"class_names": ",".join(band_info.names)}
    if grid.is_slide:  # slide viewers read the pixel size from the resolution tags
        tags.update(TIFFTAG_XRESOLUTION=str(1e4 / mpp[0]), TIFFTAG_YRESOLUTION=str(1e4 / mpp[1]),
                    TIFFTAG_RESOLUTIONUNIT="3", mpp=f"{mpp[0]},{mpp[1]}")
    for key, value in tags.items():
        ET.SubElement(md, "MDI", key=key).text = value
    band = ET.SubElement(root, "VRTRasterBand", dataType=GDAL_TYPES[band_info.dtype], band="1")
    ET.SubElement(band, "Description").text = band_info.description
    ET.SubElement(band, "NoDataValue").text = str(band_info.nodata)
    if band_info.dtype == np.uint8:
        ET.SubElement(band, "ColorInterp").text = "Palette"
        table = ET.SubElement(band, "ColorTable")
        cmap = band_info.palette()
        for i in range(256):  # the same 256 entries GDAL writes for a colormap set on a GeoTIFF
            r, g, b = cmap.get(i, (0, 0, 0))
            ET.SubElement(table, "Entry", c1=str(r), c2=str(g), c3=str(b), c4="255")
    src = ET.SubElement(band, "SimpleSource")
    ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = levels[0].name
    ET.SubElement(src, "SourceBand").text = "1"
    for lvl in levels[1:]:
        ov = ET.SubElement(band, "Overview")
        ET.SubElement(ov, "SourceFilename", relativeToVRT="1").text = lvl.name
        ET.SubElement(ov, "SourceBand").text = "1"
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path
