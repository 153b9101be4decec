"""Real STAC structures built from real rasters, for the mosaic input (issue 13): items, static catalogs, an HTTP
server that answers byte ranges, and a real STAC API (rustac) on loopback.

Why real: a mosaic's hard parts are in the data, not in the JSON: items in two UTM zones onto one grid, overlaps,
nodata outside rotated footprints, a cloud mask, an asset that is missing, one that is garbage, one cut short,
COGs read by ranges over HTTP. Every item here is *derived* from real imagery shipped on this machine:

- SpaceNet: ``segpipe/sample/spacenet_pan.tif`` (900 x 900 uint16, EPSG:32616, 0.5 m), cropped into four
  overlapping items, two of them reprojected to the neighbouring UTM zone (EPSG:32615);
- Landsat: ``localtileserver/tiler/data/landsat.tif`` (the installed localtileserver package's sample, 7 bands,
  EPSG:4326), cropped and reprojected to UTM zones 12 and 11 at 30 m.

The dates and the cloud masks are synthetic (the sources have one date each and no quality band); the pixels are
the real ones, cropped or resampled.

How a test module gets the fixtures: ``pytest_plugins = ["stac_catalogs"]`` at its top (or in conftest.py); the
functions are plain and can be called from benchmarks too. (PYTEST_DONT_REWRITE: this module has no asserts, and a
test module may import its names before pytest loads it as a plugin, which would warn.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterBand, RasterExtension
from rasterio.crs import CRS
from rasterio.warp import Resampling, aligned_target, calculate_default_transform, reproject, transform_geom

SAMPLE = Path(__file__).resolve().parents[1] / "segpipe" / "sample"
SPACENET = SAMPLE / "spacenet_pan.tif"

CLEAR, CLOUD, MASK_NODATA = 0, 1, 255  # values of the derived cloud / qa masks

# SpaceNet items: (id, first row, first col, CRS, date); each is 600 x 600 source pixels.
SPACENET_LAYOUT = (
    ("spacenet-a", 0, 0, "EPSG:32616", dt.datetime(2024, 6, 3, 10, 30, tzinfo=dt.UTC)),
    ("spacenet-b", 0, 300, "EPSG:32615", dt.datetime(2024, 6, 12, 10, 30, tzinfo=dt.UTC)),
    ("spacenet-c", 300, 0, "EPSG:32615", dt.datetime(2024, 6, 20, 10, 30, tzinfo=dt.UTC)),
    ("spacenet-d", 300, 300, "EPSG:32616", dt.datetime(2024, 6, 25, 10, 30, tzinfo=dt.UTC)),
)
SPACENET_SIZE = 600
SPACENET_CLOUD_ITEM = "spacenet-d"
SPACENET_CLOUD = (400, 700, 400, 700)  # rows, cols (end exclusive) of the original image: inside item D
SPACENET_MISSING = ("spacenet-e", dt.datetime(2024, 6, 27, 10, 30, tzinfo=dt.UTC))  # pan href: no such file
SPACENET_GARBAGE = ("spacenet-f", dt.datetime(2024, 6, 28, 10, 30, tzinfo=dt.UTC))  # pan: bytes, not a TIFF
SPACENET_TRUNCATED = ("spacenet-g", dt.datetime(2024, 6, 29, 10, 30, tzinfo=dt.UTC))  # pan: A's, cut short
SPACENET_BROKEN = (SPACENET_MISSING[0], SPACENET_GARBAGE[0], SPACENET_TRUNCATED[0])

# Exact crops of the SpaceNet sample on its own grid, for checks against a plain numpy recomputation:
# (id, first row, first col, date, eo:cloud_cover, rated: has the ``score`` quality asset, offset added to its
# valid pixels: the source is below 10000, so a mosaic pixel's value // 10000 names its crop); 600 x 600 each.
CROPS_LAYOUT = (
    ("crop-a", 0, 0, dt.datetime(2024, 6, 3, 10, 30, tzinfo=dt.UTC), 30.0, True, 10000),
    ("crop-m", 150, 150, dt.datetime(2024, 6, 15, 10, 30, tzinfo=dt.UTC), 10.0, False, 20001),
    ("crop-d", 300, 300, dt.datetime(2024, 6, 25, 10, 30, tzinfo=dt.UTC), 20.0, True, 30000),
)
CROPS_DECOY = ("decoy", dt.datetime(2024, 6, 30, 10, 30, tzinfo=dt.UTC), 50000)  # collection "decoy": whole image
SCORE_NODATA = 255
CROPS_SCORE_HOLE = (400, 500, 400, 500)  # rows, cols of the source where crop-d's score is nodata (pan valid)

LANDSAT_BANDS = {"B1": "blue", "B2": "green", "B3": "red", "B4": "nir", "B5": "swir16", "B6": "lwir",
                 "B7": "swir22"}  # asset key -> common name; B6 is the source's B6_VCID_2 (high gain)
LANDSAT_ROWS = (450, 850)  # rows of the source image kept: 400 rows (~12 km), so a period loads in well under 1 s
LANDSAT_SHARE = 0.6  # each item covers the west or the east 60 % of the columns: the middle 20 % overlaps
LANDSAT_RES = 30.0
# (id, side, CRS, date); the cloud rectangle is in the May east item only.
LANDSAT_LAYOUT = (
    ("landsat-2024-05-west", "west", "EPSG:32612", dt.datetime(2024, 5, 10, 18, 0, tzinfo=dt.UTC)),
    ("landsat-2024-05-east", "east", "EPSG:32612", dt.datetime(2024, 5, 26, 18, 0, tzinfo=dt.UTC)),
    ("landsat-2024-06-west", "west", "EPSG:32611", dt.datetime(2024, 6, 11, 18, 0, tzinfo=dt.UTC)),
    ("landsat-2024-06-east", "east", "EPSG:32612", dt.datetime(2024, 6, 27, 18, 0, tzinfo=dt.UTC)),
)
LANDSAT_CLOUD_ITEM = "landsat-2024-05-east"
# rows, cols of the source image: straddles the overlap (cols ~595-893) and the east-only part
LANDSAT_CLOUD = (600, 700, 700, 1000)


def landsat_source() -> Path:
    """The Landsat sample GeoTIFF that the installed localtileserver package ships (used only for its data)."""
    spec = importlib.util.find_spec("localtileserver")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("localtileserver is not installed: its tiler/data/landsat.tif is the source")
    return Path(next(iter(spec.submodule_search_locations))) / "tiler" / "data" / "landsat.tif"


# --- writing rasters and items -----------------------------------------------------------------------------------

def write_cog(path: Path, data: np.ndarray, crs: str | CRS, transform: Affine, nodata: float | None,
              resampling: str = "average") -> Path:
    """A real COG (GDAL's COG driver: 256-px tiles, deflate, overviews), as a STAC provider would publish.

    Why COG and not a plain tiled GeoTIFF: readers over HTTP fetch the header, then only the tiles (and the
    overview level) they need; a test of ranged reads should see the layout they meet in the field.
    """
    data = data if data.ndim == 3 else data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "COG", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": str(data.dtype), "crs": crs, "transform": transform, "nodata": nodata, "blocksize": 256,
               "compress": "deflate", "resampling": resampling}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _warp(data: np.ndarray, src_transform: Affine, src_crs: str | CRS, dst_crs: str, res: float, nodata: float,
          resampling: Resampling) -> tuple[np.ndarray, Affine]:
    """``data`` (bands, h, w) reprojected to ``dst_crs`` at ``res``, on a grid aligned to multiples of ``res``."""
    h, w = data.shape[-2:]
    left, top = src_transform @ (0, 0)
    right, bottom = src_transform @ (w, h)
    transform, width, height = calculate_default_transform(src_crs, dst_crs, w, h, left, bottom, right, top,
                                                           resolution=res)
    transform, width, height = aligned_target(transform, width, height, res)
    out = np.full((data.shape[0], height, width), nodata, data.dtype)
    reproject(data, out, src_transform=src_transform, src_crs=src_crs, src_nodata=nodata, dst_transform=transform,
              dst_crs=dst_crs, dst_nodata=nodata, resampling=resampling)
    return out, transform


def _footprint(transform: Affine, shape: tuple[int, int], crs: str | CRS) -> dict[str, Any]:
    """The data's footprint in EPSG:4326: the source crop's rectangle (which is where the data is, also after
    reprojection), its corners transformed with rasterio.warp.transform_geom."""
    h, w = shape
    corners = [transform @ xy for xy in ((0, 0), (w, 0), (w, h), (0, h), (0, 0))]
    geom = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [corners]})
    return {"type": "Polygon", "coordinates": [[[round(x, 8), round(y, 8)] for x, y in geom["coordinates"][0]]]}


def _bbox(geometry: dict[str, Any]) -> list[float]:
    xy = np.asarray(geometry["coordinates"][0])
    return [float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())]


def _add_asset(item: pystac.Item, key: str, path: Path, dtype: str, nodata: float | None, title: str,
               roles: list[str], common_name: str | None = None) -> None:
    """A COG asset with ``raster:bands`` (nodata, data_type) and, for spectral bands, ``eo:bands`` (common name)."""
    asset = pystac.Asset(str(path.resolve()), title=title, media_type=pystac.MediaType.COG, roles=roles)
    item.add_asset(key, asset)
    RasterExtension.ext(asset, add_if_missing=True).bands = [RasterBand.create(nodata=nodata, data_type=dtype)]
    if common_name is not None:
        EOExtension.ext(asset, add_if_missing=True).bands = [Band.create(name=title, common_name=common_name)]


def _item(item_id: str, when: dt.datetime, crs: str, transform: Affine, shape: tuple[int, int],
          footprint: dict[str, Any], cloud_cover: float, description: str) -> pystac.Item:
    """An item with the projection extension (v2: ``proj:code``, shape, transform) and ``eo:cloud_cover``."""
    item = pystac.Item(item_id, footprint, _bbox(footprint), when, {"description": description})
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = crs
    proj.shape = list(shape)
    proj.transform = list(transform)[:6]
    EOExtension.ext(item, add_if_missing=True).cloud_cover = round(float(cloud_cover), 3)
    return item


def spacenet_items(folder: Path, broken: bool = True) -> list[pystac.Item]:
    """Four overlapping items cut from the SpaceNet sample, plus (``broken``) two whose ``pan`` does not open.

    Derived from the real image: A (rows 0-600, cols 0-600) and D (rows 300-900, cols 300-900) are exact crops on
    the source grid (EPSG:32616); B (rows 0-600, cols 300-900) and C (rows 300-900, cols 0-600) are reprojected
    (bilinear, 0.5 m, nodata 0 outside the data) to EPSG:32615, the neighbouring UTM zone, so a mosaic onto the
    source grid mixes two zones and rotated footprints. Each item has ``pan`` (uint16 COG, nodata 0) and
    ``cloud`` (uint8: 0 clear, 1 cloud, 255 no data), a synthetic mask: all clear except the rectangle
    :data:`SPACENET_CLOUD` of item D (25 % of D, so D's ``eo:cloud_cover`` is 25).
    Item E's ``pan`` href names a file that does not exist, item F's ``pan`` is garbage bytes, item G's ``pan``
    is a copy of A's cut in the middle of its full-resolution tiles (:func:`truncated_copy`: the header and the
    overviews intact, so it opens); all three lie over A, are newer than A-D, and have a valid cloud mask: a
    loader has to skip them, not fail or fill with them.
    Files go to ``folder/<item id>/``; hrefs are absolute paths.
    """
    folder = Path(folder)
    with rasterio.open(SPACENET) as src:
        image, src_transform, src_crs = src.read(1), src.transform, src.crs.to_string()
    r0, r1, c0, c1 = SPACENET_CLOUD
    items = []
    for item_id, row, col, crs, when in SPACENET_LAYOUT:
        crop = image[row:row + SPACENET_SIZE, col:col + SPACENET_SIZE]
        cloud = np.full(crop.shape, CLEAR, np.uint8)
        if item_id == SPACENET_CLOUD_ITEM:
            cloud[r0 - row:r1 - row, c0 - col:c1 - col] = CLOUD
        crop_transform = src_transform @ Affine.translation(col, row)
        footprint = _footprint(crop_transform, crop.shape, src_crs)
        if crs == src_crs:
            pan, transform = crop, crop_transform
            how = "exact crop on the source grid"
        else:
            pan, transform = _warp(crop[None], crop_transform, src_crs, crs, 0.5, 0, Resampling.bilinear)
            pan = pan[0]
            warped_cloud, _ = _warp(cloud[None], crop_transform, src_crs, crs, 0.5, MASK_NODATA, Resampling.nearest)
            cloud = warped_cloud[0]
            how = f"reprojected to {crs} (bilinear, 0.5 m)"
        cloud[pan == 0] = MASK_NODATA
        has_data = (cloud != MASK_NODATA).sum()
        cover = 100.0 * (cloud == CLOUD).sum() / has_data
        base = folder / item_id
        item = _item(item_id, when, crs, transform, pan.shape, footprint, cover,
                     f"Derived from the SpaceNet sample: rows {row}-{row + SPACENET_SIZE}, cols "
                     f"{col}-{col + SPACENET_SIZE}, {how}.")
        _add_asset(item, "pan", write_cog(base / "pan.tif", pan, crs, transform, 0), "uint16", 0, "pan", ["data"])
        _add_asset(item, "cloud", write_cog(base / "cloud.tif", cloud, crs, transform, MASK_NODATA, "nearest"),
                   "uint8", MASK_NODATA, "cloud mask (derived, synthetic)", ["cloud"])
        items.append(item)
    if broken:
        a = items[0]
        proj = ProjectionExtension.ext(a)
        transform = Affine(*proj.transform)
        for (item_id, when), why in ((SPACENET_MISSING, "its pan file does not exist"),
                                     (SPACENET_GARBAGE, "its pan file is garbage bytes"),
                                     (SPACENET_TRUNCATED, "its pan file is item A's, cut short")):
            base = folder / item_id
            base.mkdir(parents=True, exist_ok=True)
            pan_path = base / "pan.tif"
            if item_id == SPACENET_GARBAGE[0]:
                pan_path.write_bytes(b"this is not a GeoTIFF\n" + np.random.default_rng(13).bytes(8192))
            elif item_id == SPACENET_TRUNCATED[0]:
                truncated_copy(Path(a.assets["pan"].href), pan_path)
            else:
                pan_path.unlink(missing_ok=True)
            cloud = np.full(tuple(proj.shape), CLEAR, np.uint8)
            item = _item(item_id, when, proj.code, transform, tuple(proj.shape), a.geometry, 0.0,
                         f"Broken on purpose, over item A: {why}.")
            _add_asset(item, "pan", pan_path, "uint16", 0, "pan", ["data"])
            _add_asset(item, "cloud", write_cog(base / "cloud.tif", cloud, proj.code, transform, MASK_NODATA,
                                                "nearest"), "uint8", MASK_NODATA, "cloud mask", ["cloud"])
            items.append(item)
    return items


def truncated_copy(src: Path, dst: Path) -> Path:
    """A copy of the tiled GeoTIFF ``src`` cut halfway through its full-resolution tiles' bytes.

    Why there: what an interrupted upload leaves. The header (and, in a COG, the overviews, stored before the
    full-resolution tiles) are intact, so the file opens and a decimated read succeeds; the tiles after the cut
    do not decode.
    """
    with rasterio.open(src) as ds:
        rows, cols = (-(-n // b) for n, b in zip(ds.shape, ds.block_shapes[0], strict=True))
        blocks = [(r, c) for r in range(rows) for c in range(cols)]
        spans = [(int(ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1)),
                  int(ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1))) for r, c in blocks]
    first, end = min(o for o, _ in spans), max(o + n for o, n in spans)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(Path(src).read_bytes()[:(first + end) // 2])
    return dst


def crop_items(folder: Path) -> list[pystac.Item]:
    """Exact crops of the SpaceNet sample (:data:`CROPS_LAYOUT`) on its own grid, plus the decoy.

    Why exact crops: on the source grid (nearest) a mosaic's pixels are the crops' own, so a test can recompute
    any composite with plain numpy from the items' files. Each crop has ``pan`` (uint16, nodata 0: the source's
    pixels plus the crop's offset where they are not 0, so overlapping crops differ and one can tell which
    item a mosaic pixel came from; the offsets make some two-item medians end in .5); the rated
    ones also ``score`` (uint8, a synthetic quality: 0-3 from a seeded generator, :data:`SCORE_NODATA` in
    :data:`CROPS_SCORE_HOLE` of crop-d, where its pan is valid). The decoy (:data:`CROPS_DECOY`, the whole image,
    newest) is meant for another collection: a collection filter has to leave it out. Files go to
    ``folder/<item id>/``; hrefs are absolute.
    """
    folder = Path(folder)
    with rasterio.open(SPACENET) as src:
        image, src_transform, crs = src.read(1), src.transform, src.crs.to_string()
    rng = np.random.default_rng(2024)
    items = []
    layout = [*CROPS_LAYOUT, (CROPS_DECOY[0], 0, 0, CROPS_DECOY[1], 0.0, False, CROPS_DECOY[2])]
    for item_id, row, col, when, cover, rated, offset in layout:
        size = image.shape[0] if item_id == CROPS_DECOY[0] else SPACENET_SIZE
        crop = image[row:row + size, col:col + size]
        pan = np.where(crop != 0, crop + offset, 0).astype(np.uint16)
        transform = src_transform @ Affine.translation(col, row)
        footprint = _footprint(transform, pan.shape, crs)
        item = _item(item_id, when, crs, transform, pan.shape, footprint, cover,
                     f"Exact crop of the SpaceNet sample: rows {row}-{row + size}, cols {col}-{col + size}.")
        base = folder / item_id
        _add_asset(item, "pan", write_cog(base / "pan.tif", pan, crs, transform, 0), "uint16", 0, "pan", ["data"])
        if rated:
            score = rng.integers(0, 4, pan.shape, dtype=np.uint8)
            if item_id == "crop-d":
                r0, r1, c0, c1 = CROPS_SCORE_HOLE
                score[r0 - row:r1 - row, c0 - col:c1 - col] = SCORE_NODATA
            _add_asset(item, "score", write_cog(base / "score.tif", score, crs, transform, SCORE_NODATA,
                                                "nearest"), "uint8", SCORE_NODATA, "score (synthetic)", ["quality"])
        items.append(item)
    return items


def write_static_collections(collections: dict[str, Sequence[pystac.Item]], folder: Path) -> Path:
    """A self-contained static catalog of several collections: ``folder/catalog.json``, a collection per key.

    Why: a collection filter is only tested by a catalog in which another collection has items too.
    """
    folder = Path(folder).resolve()
    root = pystac.Catalog("test-catalog", "Derived test collections")
    for name, items in collections.items():
        items = [item.clone() for item in items]
        times = [item.datetime for item in items]
        boxes = np.asarray([item.bbox for item in items])
        extent = pystac.Extent(
            pystac.SpatialExtent([[*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]]),
            pystac.TemporalExtent([[min(times), max(times)]]))
        collection = pystac.Collection(name, f"Derived test items: {name}", extent, license="other")
        collection.add_items(items)
        root.add_child(collection)
    root.normalize_hrefs(str(folder))
    root.make_all_asset_hrefs_relative()
    root.save(pystac.CatalogType.SELF_CONTAINED)
    return folder / "catalog.json"


def landsat_items(folder: Path) -> list[pystac.Item]:
    """Four Landsat-like items, two periods, one single-band COG per band (``B1``..``B7``) plus ``qa``.

    Derived from the real 7-band Landsat sample (EPSG:4326), rows :data:`LANDSAT_ROWS` only (small enough that a
    whole period loads in well under a second): May 2024 = the west 60 % and the east 60 % of the columns, both
    reprojected (bilinear, 30 m) to EPSG:32612; June 2024 = the same halves, the west one in EPSG:32611 (the
    neighbouring zone), the east one in EPSG:32612. Band values 0 are raised to 1 (5 pixels of B7) so 0 can
    mean no data, as in Landsat's own products. ``qa`` is uint8, 0 clear, 1 cloud, 255 no data: synthetic,
    all clear except the rectangle :data:`LANDSAT_CLOUD` in item :data:`LANDSAT_CLOUD_ITEM`, which straddles the
    overlap of the two May items and the east-only part. Files go to ``folder/<item id>/``; hrefs are absolute.
    """
    folder = Path(folder)
    row0, row1 = LANDSAT_ROWS
    with rasterio.open(landsat_source()) as src:
        image = np.maximum(src.read(window=((row0, row1), (0, src.width))), 1)
        src_crs = src.crs.to_string()
        src_transform = src.transform @ Affine.translation(0, row0)
        names = src.descriptions
    width = image.shape[2]
    keep = int(np.ceil(LANDSAT_SHARE * width))
    r0, r1, c0, c1 = LANDSAT_CLOUD
    items = []
    for item_id, side, crs, when in LANDSAT_LAYOUT:
        col0 = 0 if side == "west" else width - keep
        crop = image[:, :, col0:col0 + keep]
        crop_transform = src_transform @ Affine.translation(col0, 0)
        qa = np.full(crop.shape[1:], CLEAR, np.uint8)
        if item_id == LANDSAT_CLOUD_ITEM:
            qa[r0 - row0:r1 - row0, c0 - col0:c1 - col0] = CLOUD
        bands, transform = _warp(crop, crop_transform, src_crs, crs, LANDSAT_RES, 0, Resampling.bilinear)
        empty = (bands == 0).any(axis=0)
        bands[:, empty] = 0
        qa, _ = _warp(qa[None], crop_transform, src_crs, crs, LANDSAT_RES, MASK_NODATA, Resampling.nearest)
        qa = qa[0]
        qa[empty] = MASK_NODATA
        cover = 100.0 * (qa == CLOUD).sum() / (qa != MASK_NODATA).sum()
        base = folder / item_id
        item = _item(item_id, when, crs, transform, qa.shape, _footprint(crop_transform, crop.shape[1:], src_crs),
                     cover, f"Derived from the Landsat sample: rows {row0}-{row1}, the {side} 60 % of the columns, "
                            f"reprojected to {crs} (bilinear, {LANDSAT_RES:g} m).")
        for k, (key, common) in enumerate(LANDSAT_BANDS.items()):
            _add_asset(item, key, write_cog(base / f"{key}.tif", bands[k], crs, transform, 0), "uint8", 0,
                       names[k] or key, ["data"], common)
        _add_asset(item, "qa", write_cog(base / "qa.tif", qa, crs, transform, MASK_NODATA, "nearest"), "uint8",
                   MASK_NODATA, "quality mask (derived, synthetic)", ["cloud"])
        items.append(item)
    return items


def write_static_catalog(items: Sequence[pystac.Item], folder: Path, collection_id: str = "test-collection",
                         license: str = "other", description: str = "Derived test items") -> Path:
    """A self-contained static catalog: ``folder/collection.json`` and ``folder/<id>/<id>.json``.

    Every link and every asset href is relative, so the same folder works from disk and served over HTTP (pystac
    resolves the hrefs against where it read the JSON from). The assets should lie under ``folder`` (as
    :func:`spacenet_items` and :func:`landsat_items` put them when given the same folder), otherwise the
    relative hrefs climb out of it and an HTTP server of ``folder`` cannot serve them. The items are cloned:
    the caller's keep their absolute hrefs. Returns the path of collection.json.
    """
    folder = Path(folder).resolve()
    items = [item.clone() for item in items]
    times = [item.datetime for item in items if item.datetime is not None]
    boxes = np.asarray([item.bbox for item in items])
    extent = pystac.Extent(
        pystac.SpatialExtent([[*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]]),
        pystac.TemporalExtent([[min(times), max(times)]]))
    collection = pystac.Collection(collection_id, description, extent, license=license)
    collection.add_items(items)
    collection.normalize_hrefs(str(folder))
    collection.make_all_asset_hrefs_relative()
    collection.save(pystac.CatalogType.SELF_CONTAINED)
    return folder / "collection.json"


def items_served_at(items: Sequence[pystac.Item], folder: Path, base_url: str) -> list[pystac.Item]:
    """Clones of ``items`` whose asset hrefs (files under ``folder``) are URLs under ``base_url`` instead."""
    folder = Path(folder).resolve()
    out = []
    for item in items:
        clone = item.clone()
        clone.set_self_href(None)
        for asset in clone.assets.values():
            rel = Path(asset.get_absolute_href()).resolve().relative_to(folder)
            asset.href = f"{base_url.rstrip('/')}/{rel.as_posix()}"
        out.append(clone)
    return out


# --- HTTP with byte ranges ---------------------------------------------------------------------------------------

def _byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a single ``Range: bytes=...`` header; "unsatisfiable"; None to ignore the header
    (another unit, several ranges, or a syntax error: RFC 9110 lets a server answer those with the whole file)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first:
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(size - suffix, 0), size - 1
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """The stdlib file handler plus single byte ranges (206, Content-Range, Accept-Ranges) and keep-alive.

    Why: GDAL's /vsicurl/ reads a COG by ranges (header, then tiles) and the stdlib handler ignores Range,
    sending the whole file each time; a real object store or web server answers ranges.
    """

    protocol_version = "HTTP/1.1"  # keep-alive: GDAL reuses its connections, as with a real server
    timeout = 30  # an idle kept-alive connection ends, so no thread waits forever
    _remaining: int | None = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log = getattr(self.server, "request_log", None)
        if log is not None:
            log.append((self.command, self.path, self.headers.get("Range"), int(code)))

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def send_head(self):  # noqa: ANN201 - the stdlib's signature: a file object or None
        self._remaining = None
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if header is None or os.path.isdir(path):
            return super().send_head()
        try:
            f = open(path, "rb")  # noqa: SIM115 - handed to the stdlib, which closes it
        except OSError:
            self.send_error(404, "File not found")
            return None
        stat = os.fstat(f.fileno())
        span = _byte_range(header, stat.st_size)
        if span is None:
            f.close()
            return super().send_head()
        if span == "unsatisfiable":
            f.close()
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{stat.st_size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        start, end = span
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{stat.st_size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
        self.end_headers()
        f.seek(start)
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001 - the stdlib's signature
        if self._remaining is None:
            return super().copyfile(source, outputfile)
        left = self._remaining
        while left > 0:
            chunk = source.read(min(left, 1 << 16))
            if not chunk:
                break
            outputfile.write(chunk)
            left -= len(chunk)


@contextlib.contextmanager
def serve_folder(folder: Path, request_log: list[tuple[str, str, str | None, int]] | None = None) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (an ephemeral port) with byte ranges; yields the base URL.

    A thread of this process runs the server (stdlib ThreadingHTTPServer), so it lives as long as the ``with``.
    ``request_log``, if given, gets (method, path, Range header, status) for each request: a test can see
    that a reader asked for ranges and got 206s.
    """
    handler = partial(RangeRequestHandler, directory=str(Path(folder).resolve()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.request_log = request_log
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="serve_folder")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- a STAC API: rustac serve ------------------------------------------------------------------------------------

def rustac_binary() -> str:
    """The ``rustac`` CLI of this interpreter's environment (the rustac wheel puts it beside python)."""
    beside = Path(sys.executable).with_name("rustac")
    found = str(beside) if beside.exists() else shutil.which("rustac")
    if found is None:
        raise FileNotFoundError("rustac is not installed (pip install rustac): it serves the test STAC API")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api_item(item: pystac.Item, collection_id: str) -> dict[str, Any]:
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    d["collection"] = collection_id
    d["links"] = []
    for key, asset in item.assets.items():
        href = asset.get_absolute_href()
        if href is None or not (href.startswith(("http://", "https://")) or os.path.isabs(href)):
            raise ValueError(f"item {item.id} asset {key}: href {asset.href!r} is not absolute (URL or path)")
        d["assets"][key]["href"] = href
    return d


@contextlib.contextmanager
def stac_api(items: Sequence[pystac.Item], collection: pystac.Collection | str,
             timeout: float = 30.0) -> Iterator[str]:
    """A real STAC API (``rustac serve``, in-memory backend) on 127.0.0.1 with ``items`` in ``collection``.

    The items' asset hrefs must be absolute (file paths, or URLs of a :func:`serve_folder` server: see
    :func:`items_served_at`). The collection and the items are written as collection.json and items.json
    (a FeatureCollection) and handed to ``rustac serve --addr 127.0.0.1:PORT collection.json items.json``.

    What its /search does (rustac 0.9.18, memory backend; measured): bbox, intersects, datetime (instants,
    ranges, "2024-06"), collections, ids and limit with next-page links work. The query extension and CQL2
    ``filter`` are not in its conformance classes and give wrong answers, not errors: any ``query`` returns no
    item; a ``filter`` on ``eo:cloud_cover`` returns none, one on ``id`` returns all. ``sortby`` is ignored.
    So a client filters on cloud cover itself. (The DuckDB backend, for stac-geoparquet, wants to download a
    DuckDB extension on the first search: no use without the internet.) Waits until ``/`` answers (deadline
    ``timeout``), yields the root URL, stops the process at exit.
    """
    if isinstance(collection, str):
        boxes = np.asarray([item.bbox for item in items])
        times = [item.datetime for item in items if item.datetime is not None]
        collection = pystac.Collection(collection, "test items", pystac.Extent(
            pystac.SpatialExtent([[*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]]),
            pystac.TemporalExtent([[min(times), max(times)]])), license="other")
    coll = collection.to_dict(include_self_link=False, transform_hrefs=False)
    coll["links"] = []
    features = {"type": "FeatureCollection", "features": [_api_item(item, coll["id"]) for item in items]}
    with tempfile.TemporaryDirectory(prefix="stac_api") as tmp:
        tmp = Path(tmp)
        (tmp / "collection.json").write_text(json.dumps(coll))
        (tmp / "items.json").write_text(json.dumps(features))
        log = open(tmp / "rustac.log", "wb")  # noqa: SIM115 - closed below
        for _ in range(3):  # a port taken between _free_port and rustac's bind: try another
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen([rustac_binary(), "serve", "--addr", f"127.0.0.1:{port}",
                                     str(tmp / "collection.json"), str(tmp / "items.json")],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{url}/", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(0.05)
            else:
                proc.kill()
                proc.wait()
                continue
            break
        else:
            log.close()
            raise RuntimeError(f"rustac serve did not answer: {(tmp / 'rustac.log').read_text()[-2000:]}")
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


# --- pytest fixtures ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StaticCatalog:
    """A static catalog on disk: its folder, its collection.json, and the items as built (absolute hrefs)."""

    folder: Path
    collection: Path  # collection.json (catalog.json for several collections)
    items: tuple[pystac.Item, ...]

    def item(self, item_id: str) -> pystac.Item:
        return next(item for item in self.items if item.id == item_id)


@dataclass(frozen=True)
class StacApi:
    """A running STAC API and the HTTP server of its assets."""

    url: str  # the API's root
    assets_url: str  # base URL of the served catalog folder
    collection_id: str


_BUILT: dict[tuple[str, str], StaticCatalog] = {}  # written once per session even if several modules import us


def _built(name: str, tmp_path_factory: pytest.TempPathFactory, make) -> StaticCatalog:  # noqa: ANN001
    key = (name, str(tmp_path_factory.getbasetemp()))
    if key not in _BUILT:
        _BUILT[key] = make(tmp_path_factory.mktemp(name))
    return _BUILT[key]


def spacenet_static(folder: Path) -> StaticCatalog:
    """Items A-F (:func:`spacenet_items`) and their catalog, collection ``spacenet``, in ``folder``."""
    items = spacenet_items(folder)
    return StaticCatalog(Path(folder).resolve(), write_static_catalog(items, folder, "spacenet", "CC-BY-SA-4.0",
                                                                      "Derived from the SpaceNet sample"),
                         tuple(items))


def landsat_static(folder: Path) -> StaticCatalog:
    """The four Landsat items (:func:`landsat_items`) and their catalog, collection ``landsat``, in ``folder``."""
    items = landsat_items(folder)
    return StaticCatalog(Path(folder).resolve(), write_static_catalog(items, folder, "landsat", "other",
                                                                      "Derived from the Landsat sample"),
                         tuple(items))


@pytest.fixture(scope="session")
def spacenet_catalog(tmp_path_factory: pytest.TempPathFactory) -> StaticCatalog:
    """SpaceNet items A-F as a static catalog on disk (written once per session)."""
    return _built("spacenet", tmp_path_factory, spacenet_static)


def crops_static(folder: Path) -> StaticCatalog:
    """The exact crops (collection ``crops``) and the decoy (collection ``decoy``) in one catalog.json."""
    items = crop_items(folder)
    crops = [i for i in items if i.id != CROPS_DECOY[0]]
    decoy = [i for i in items if i.id == CROPS_DECOY[0]]
    return StaticCatalog(Path(folder).resolve(), write_static_collections({"crops": crops, "decoy": decoy}, folder),
                         tuple(items))


@pytest.fixture(scope="session")
def crops_catalog(tmp_path_factory: pytest.TempPathFactory) -> StaticCatalog:
    """The exact SpaceNet crops and a decoy in another collection, as a static catalog (written once)."""
    return _built("crops", tmp_path_factory, crops_static)


@pytest.fixture(scope="session")
def landsat_catalog(tmp_path_factory: pytest.TempPathFactory) -> StaticCatalog:
    """The Landsat items (two periods, two zones) as a static catalog on disk (written once per session)."""
    return _built("landsat", tmp_path_factory, landsat_static)


@pytest.fixture(scope="module")
def spacenet_http(spacenet_catalog: StaticCatalog) -> Iterator[str]:
    """URL of the SpaceNet collection.json served over HTTP (ranges) on 127.0.0.1, for the module."""
    with serve_folder(spacenet_catalog.folder) as base:
        yield f"{base}/collection.json"


@pytest.fixture(scope="module")
def spacenet_api(spacenet_catalog: StaticCatalog) -> Iterator[StacApi]:
    """A rustac STAC API holding items A-F (collection ``spacenet``), their assets served over HTTP."""
    with serve_folder(spacenet_catalog.folder) as base:
        items = items_served_at(spacenet_catalog.items, spacenet_catalog.folder, base)
        collection = pystac.Collection.from_file(str(spacenet_catalog.collection))
        with stac_api(items, collection) as url:
            yield StacApi(url, base, collection.id)
