"""Many scenes onto one output grid: a STAC search (API or static catalog) or a list/glob of rasters, loaded
with odc-stac and composited per pixel.

Why everything is resolved on the client, before anything is written: the items, which of their assets open,
and the output grid decide what the scene store holds. :func:`resolve_mosaic` fixes them once at check time
(an item whose asset is missing or unreadable is left out and reported, the run goes on); the scene store's
fingerprint records the items, so a rerun with the same items resumes and a period that gained an item is
recomputed. Workers never search: they load the fixed items for their blocks.

Why fixed blocks: odc-stac (GDAL's warper) computes a window's pixels from the window's own geometry, so a
sub-window differs from the same pixels of a larger load (measured on a UTM-zone change: 433 of 810,000 pixels
with nearest, nearly all with bilinear). Every pixel is therefore computed inside one fixed block of
:data:`BLOCK` pixels aligned to the output grid, whatever the tile or chunk size asks for: the mosaic is
bit-identical for any tiling and worker count. With chunks smaller than a block, a block is loaded once per
chunk row that needs it.

Why odc-stac and not stackstac: measured side by side (benchmarks/bench_stac_loaders.py, figures in
benchmarks/RESULTS.md); stackstac also pins pandas < 3, which this environment's xarray stack is past.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from segpipe.errors import InputError, first_line
from segpipe.geometry import SceneGeometry
from segpipe.io.paths import is_remote
from segpipe.io.raster import open_raster, quiet_not_georeferenced

if TYPE_CHECKING:
    import pystac

    from segpipe.config import MosaicSpec

class NoItems(InputError):
    """The search found no item: an error for a job, "nothing to do" for a scheduled period."""


BLOCK = 512  # the fixed unit of computation of a mosaic (see the module's note); chunk sizes up to it divide it
RASTER_ORDER = "segpipe:order"  # property of an item made from a plain raster: its place in the list
CHECK_THREADS = 16  # items checked at once (headers and one tile per band: mostly waiting on storage)


@dataclass(frozen=True)
class MosaicItem:
    """One item that goes into the mosaic: as STAC JSON with absolute asset hrefs (what a worker loads)."""

    id: str
    datetime: str | None
    cloud: float | None
    stac: dict[str, Any]
    bounds: tuple[float, float, float, float]  # footprint of its first band in the output CRS
    stamp: str  # identity of its metadata and (local) files: changes when the item or its files change


@dataclass(frozen=True)
class Mosaic:
    """A resolved mosaic: its items in compositing order, the items left out (and why), and the output grid."""

    source: str
    items: tuple[MosaicItem, ...]
    skipped: tuple[tuple[str, str], ...]
    bands: tuple[str, ...]
    crs_wkt: str
    transform: tuple[float, ...]
    shape: tuple[int, int]
    dtype: str
    nodata: float
    composite: str
    resampling: str
    quality_asset: str | None = None
    quality_invalid: tuple[float, ...] = ()
    quality_prefer: str | None = None
    aoi: dict[str, Any] | None = None  # polygon(s) as GeoJSON in the output CRS: pixels outside are nodata
    anchor: str = "edge"  # how the grid was placed: native (an item's own grid), edge, center or [fx, fy]
    resampled: tuple[tuple[str, str], ...] = ()  # items whose pixels are not on the grid, and why

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])

    @property
    def grid(self) -> SceneGeometry:
        """The output grid (kept as plain fields above: they are the scene's fingerprint)."""
        return SceneGeometry("raster", tuple(self.shape), self.affine, self.crs)

    def fingerprint(self) -> dict[str, Any]:
        """What the pixels depend on (the scene store's fingerprint holds it): items, grid and compositing."""
        return {"items": [[i.id, i.stamp] for i in self.items], "bands": list(self.bands), "crs": self.crs_wkt,
                "transform": list(self.transform[:6]), "shape": list(self.shape), "composite": self.composite,
                "resampling": self.resampling, "quality": [self.quality_asset, list(self.quality_invalid),
                                                          self.quality_prefer],
                "aoi": hashlib.sha256(json.dumps(self.aoi, sort_keys=True).encode()).hexdigest() if self.aoi else None}

    def record(self) -> dict[str, Any]:
        """What went in, for people: ``mosaic.json`` beside the results."""
        return {"source": self.source, "bands": list(self.bands), "crs": self.crs.to_string(),
                "transform": list(self.transform[:6]), "shape": list(self.shape), "composite": self.composite,
                "items": [{"id": i.id, "datetime": i.datetime, "cloud_cover": i.cloud} for i in self.items],
                "skipped": [{"id": k, "reason": why} for k, why in self.skipped], "anchor": self.anchor,
                "resampled": [{"id": k, "reason": why} for k, why in self.resampled]}


# --- finding the items -------------------------------------------------------------------------------------

def parse_datetime_range(text: str) -> tuple[datetime | None, datetime | None]:
    """An RFC 3339 instant or ``start/end`` range as half-open bounds ``[start, end)``; ``..`` is open.

    A date or month stands for all of it: ``2024-06`` is June, ``2024-06-01/2024-06-30`` ends after the 30th.
    """
    parts = text.split("/")
    if len(parts) > 2 or not text.strip():
        raise InputError(f"datetime {text!r} is not an instant or a start/end range")
    if len(parts) == 1:
        return _span(parts[0], text)
    start = None if parts[0] in ("", "..") else _span(parts[0], text)[0]
    end = None if parts[1] in ("", "..") else _span(parts[1], text)[1]
    if start is not None and end is not None and end <= start:
        raise InputError(f"datetime range {text!r} ends before it starts")
    return start, end


def _span(value: str, whole: str) -> tuple[datetime, datetime]:
    """The interval a date, month, year or instant covers."""
    v = value.strip()
    try:
        if len(v) == 4:
            start = datetime(int(v), 1, 1, tzinfo=UTC)
            return start, start.replace(year=start.year + 1)
        if len(v) == 7:
            start = datetime.strptime(v, "%Y-%m").replace(tzinfo=UTC)
            return start, month_after(start)
        if len(v) == 10:
            start = datetime.strptime(v, "%Y-%m-%d").replace(tzinfo=UTC)
            return start, start + timedelta(days=1)
        instant = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"datetime {whole!r}: {value!r} is not a date (YYYY, YYYY-MM, YYYY-MM-DD or RFC 3339)"
                         ) from None
    instant = instant if instant.tzinfo else instant.replace(tzinfo=UTC)
    return instant, instant + timedelta(microseconds=1)


def month_after(d: datetime) -> datetime:
    """The first instant of the month after ``d``'s month."""
    return d.replace(year=d.year + d.month // 12, month=d.month % 12 + 1, day=1, hour=0, minute=0, second=0,
                     microsecond=0)


def find_items(spec: MosaicSpec) -> tuple[str, list[pystac.Item]]:
    """The items the spec asks for (description of the source, items), filtered as the spec says."""
    if spec.rasters is not None:
        return _raster_items(spec.rasters)
    url = str(spec.stac)
    root = _read_json(url)
    if _is_api(root):
        items = _search_api(url, spec)
    else:
        items = _static_items(url, root)
    return f"STAC {url}", _filtered(items, spec)


def _read_json(url: str) -> dict[str, Any]:
    import pystac

    try:
        data = pystac.StacIO.default().read_json(url)
    except Exception as exc:  # noqa: BLE001 - file, HTTP and JSON errors alike are one line
        raise InputError(f"STAC source is not readable ({first_line(exc)})"
                         f": {url}") from None
    if not isinstance(data, dict) or "type" not in data:
        raise InputError(f"STAC source is not a STAC catalog, collection or item collection: {url}")
    return data


def _is_api(root: dict[str, Any]) -> bool:
    """A STAC API root (it offers item search) rather than a static catalog."""
    conforms = root.get("conformsTo") or []
    return any("item-search" in c for c in conforms) or any(ln.get("rel") == "search" for ln in root.get("links", []))


def _search_api(url: str, spec: MosaicSpec) -> list[pystac.Item]:
    """Item search on a STAC API; the cloud filter is applied here too (not every API has the query extension)."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    bbox = _search_bbox(spec)
    try:
        search = Client.open(url).search(collections=spec.collections, bbox=bbox, datetime=spec.datetime,
                                         max_items=spec.max_items + 1)
        return list(search.items())
    except (APIError, OSError, ValueError) as exc:
        raise InputError(f"STAC search failed ({first_line(exc)}): "
                         f"{url}") from None


def _static_items(url: str, root: dict[str, Any]) -> list[pystac.Item]:
    import pystac

    try:
        if root["type"] == "FeatureCollection":
            return list(pystac.ItemCollection.from_dict(root).items)
        if root["type"] == "Feature":
            return [pystac.Item.from_file(url)]
        obj = pystac.read_file(url)
        return list(obj.get_items(recursive=True))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pystac raises many types for broken catalogs
        raise InputError(f"STAC catalog is not readable ({first_line(exc)})"
                         f": {url}") from None


def _search_bbox(spec: MosaicSpec) -> tuple[float, float, float, float] | None:
    if spec.bbox is not None:
        return tuple(spec.bbox)
    if spec.aoi is not None:
        import shapely

        geom, crs = _aoi_geometry(spec.aoi)
        return _bounds_in(shapely.bounds(geom).tolist(), crs, CRS.from_epsg(4326))
    return None


def _item_time(item: pystac.Item) -> tuple[datetime | None, datetime | None]:
    start = item.datetime or item.common_metadata.start_datetime
    end = item.datetime or item.common_metadata.end_datetime
    return _utc(start), _utc(end)


def _utc(d: datetime | None) -> datetime | None:
    """A naive STAC datetime is UTC (STAC requires UTC; some catalogs leave the zone out)."""
    return d if d is None or d.tzinfo else d.replace(tzinfo=UTC)


def _filtered(items: Iterable[pystac.Item], spec: MosaicSpec) -> list[pystac.Item]:
    """Collection, area, time and cloud filters (again, after an API search: cheap, and the same rules)."""
    start, end = parse_datetime_range(spec.datetime) if spec.datetime else (None, None)
    bbox = _search_bbox(spec)
    kept = []
    for item in items:
        if spec.collections and item.collection_id not in spec.collections:
            continue
        t0, t1 = _item_time(item)
        if (start is not None and (t1 is None or t1 < start)) or (end is not None and (t0 is None or t0 >= end)):
            continue
        if bbox is not None and item.bbox is not None and not _overlaps(item.bbox, bbox):
            continue
        cloud = item.properties.get("eo:cloud_cover")
        if spec.max_cloud is not None and cloud is not None and cloud > spec.max_cloud:
            continue
        kept.append(item)
    if len(kept) > spec.max_items:
        raise InputError(f"the search finds more than max_items={spec.max_items} items; narrow bbox, datetime or "
                         "collections, or raise max_items")
    return kept


def _overlaps(a: Iterable[float], b: Iterable[float]) -> bool:
    """Whether two bounding boxes (west, south, east, north; a STAC 3-D bbox too) share any area or edge."""
    a0, a1, a2, a3 = _flat_bbox(a)
    b0, b1, b2, b3 = _flat_bbox(b)
    return a0 <= b2 and b0 <= a2 and a1 <= b3 and b1 <= a3


def _flat_bbox(a: Iterable[float]) -> tuple[float, float, float, float]:
    v = list(a)  # a 3-D bbox is west, south, min z, east, north, max z
    return (v[0], v[1], v[3], v[4]) if len(v) == 6 else (v[0], v[1], v[2], v[3])


def _raster_items(rasters: list[str] | str) -> tuple[str, list[pystac.Item]]:
    """Plain rasters as items with one asset, ``image``, in the order given (a glob: sorted by name)."""
    if isinstance(rasters, str):
        paths = [rasters] if is_remote(rasters) else sorted(glob.glob(rasters, recursive=True))
        what = f"rasters {rasters}"
        if not paths:
            raise InputError(f"no rasters match {rasters}")
    else:
        paths, what = list(rasters), f"{len(rasters)} raster(s)"
        if not paths:
            raise InputError("mosaic rasters: the list is empty")
    import pystac

    items = []
    seen: dict[str, int] = {}
    for k, p in enumerate(paths):
        stem = Path(p.split("?")[0]).name.split(".")[0] or f"raster{k}"
        seen[stem] = seen.get(stem, 0) + 1
        item_id = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        # pystac wants a datetime; a raster has none of its own (_iso reports None), and rasters keep list order
        item = pystac.Item(item_id, None, None, datetime(1970, 1, 1, tzinfo=UTC), {RASTER_ORDER: k})
        item.add_asset("image", pystac.Asset(p if is_remote(p) else str(Path(p).resolve())))
        items.append(item)
    return what, items


# --- checking the items and fixing the grid -----------------------------------------------------------------

@dataclass(frozen=True)
class _Opened:
    """An item whose band assets all opened, with what the grid needs from its first band."""

    item: pystac.Item
    crs: CRS
    transform: Affine
    shape: tuple[int, int]
    dtypes: tuple[str, ...]
    nodata: float | None
    stamp: str


def _open_item(item: pystac.Item, bands: list[str], quality: str | None) -> _Opened | str:
    """Open every band asset (and the quality asset, when the item has one) and decode its last stored tile;
    the reason if one does not.

    Why decode a tile and not only the header: a truncated file (an interrupted upload or copy) opens, since
    its header sits at the start, and fails only when a worker reads its pixels, which would stop the run.
    """
    import rasterio

    headers = []
    for name in bands + ([quality] if quality and quality in item.assets else []):
        if name not in item.assets:
            return f"has no asset {name!r} (assets: {sorted(item.assets)})"
        href = item.assets[name].get_absolute_href() or item.assets[name].href
        try:
            with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), open_raster(href) as ds:
                headers.append((href, ds.crs, ds.transform, ds.shape, ds.dtypes[0], ds.nodata, ds.count))
                _read_last_tile(href, ds)
        except Exception as exc:  # noqa: BLE001 - missing, unreachable, truncated and corrupt assets alike
            return f"asset {name!r} is not readable ({_cause(exc)})"
    href, crs, transform, shape, _, nodata, _ = headers[0]
    if crs is None:
        return f"asset {bands[0]!r} has no CRS"
    stamp = hashlib.sha256(json.dumps(_without_links(item.to_dict(include_self_link=False)), sort_keys=True,
                                      default=str).encode())
    for h in headers:
        if not is_remote(h[0]) and os.path.exists(h[0]):
            st = os.stat(h[0])
            stamp.update(f"{h[0]}:{st.st_size}:{st.st_mtime_ns};".encode())
    return _Opened(item, crs, transform, tuple(shape), tuple(h[4] for h in headers[:len(bands)]), nodata,
                   stamp.hexdigest())


def _read_last_tile(href: str, ds: Any) -> None:
    """Decode, for each band, the internal tile stored last in the file (any resolution level): it fails when
    the file is cut short, whatever tiles a block will read later, for one tile's bytes per band.

    A TIFF says where each tile is (GDAL's ``BLOCK_OFFSET_x_y`` items); another format's last full-resolution
    block is read instead. Corruption that keeps the file's length (bytes changed inside a tile) is not found
    here: only decoding every tile would find it, which costs as much as the run's own read.
    """
    import rasterio

    for bidx in range(1, ds.count + 1):
        level, row, col = _last_stored_block(ds, bidx)
        if level is None:
            _read_block(ds, bidx, row, col)
            continue
        with rasterio.open(href, overview_level=level) as ovr:
            _read_block(ovr, bidx, row, col)


def _last_stored_block(ds: Any, bidx: int) -> tuple[int | None, int, int]:
    """The level (None: full resolution) and block row and column of the band's tile whose bytes end last."""
    rows, cols = _block_count(ds.shape, ds.block_shapes[bidx - 1])
    end, best = -1, (None, rows - 1, cols - 1)  # no TIFF offsets: the last full-resolution block
    h, w = ds.shape
    for k, factor in enumerate([1, *ds.overviews(bidx)]):
        level = None if k == 0 else k - 1
        rows, cols = _block_count((-(-h // factor), -(-w // factor)), ds.block_shapes[bidx - 1])
        for r in range(rows):
            for c in range(cols):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=bidx, ovr=level)
                size = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=bidx, ovr=level)
                if offset and size and int(offset) + int(size) > end:  # a sparse tile (no bytes) is skipped
                    end, best = int(offset) + int(size), (level, r, c)
    return best


def _block_count(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _read_block(ds: Any, bidx: int, row: int, col: int) -> None:
    """Decode one block of a band (clipped at the raster's edge)."""
    from rasterio.windows import Window

    bh, bw = ds.block_shapes[bidx - 1]
    r0, c0 = min(row * bh, ds.height - 1), min(col * bw, ds.width - 1)
    ds.read(bidx, window=Window(c0, r0, min(bw, ds.width - c0), min(bh, ds.height - r0)))


def _cause(exc: BaseException) -> str:
    """The first line of GDAL's own message: rasterio's read error only says to look at the one before it."""
    inner = exc.__cause__ or exc.__context__
    return first_line(inner) if inner is not None and "previous exception" in str(exc) else first_line(exc)


def _without_links(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "links"}


def _order(opened: list[_Opened], order: str, rasters: bool) -> list[_Opened]:
    """Compositing order: given order for rasters; newest, oldest or least cloud first for STAC items."""
    if rasters:
        return opened
    def when(o: _Opened) -> float:
        t = _item_time(o.item)[0]
        return t.timestamp() if t is not None else -math.inf
    ids = sorted(opened, key=lambda o: o.item.id)
    if order == "oldest":
        return sorted(ids, key=when)
    by_time = sorted(ids, key=when, reverse=True)
    if order == "least-cloud":
        return sorted(by_time, key=lambda o: o.item.properties.get("eo:cloud_cover", math.inf))
    return by_time


def resolve_mosaic(spec: MosaicSpec, nodata: float | None = None) -> Mosaic:
    """Find the items, check that their assets read (:func:`_open_item`), fix the output grid: nothing written.

    ``nodata`` is the job's nodata (the bands' value for "no data"); default the first asset's, else 0.
    """
    source, items = find_items(spec)
    if not items:
        raise NoItems(f"no items found in {source} for {_criteria(spec)}")
    rasters = spec.rasters is not None
    bands = list(spec.assets) if spec.assets else ["image"]
    quality = spec.quality.asset if spec.quality else None
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        results = list(pool.map(lambda it: _open_item(it, bands, quality), items))
    skipped = [(it.id, r) for it, r in zip(items, results, strict=True) if isinstance(r, str)]
    opened = _order([r for r in results if not isinstance(r, str)], spec.order, rasters)
    if not opened:
        first = skipped[0]
        raise InputError(f"no item of {source} is readable ({len(skipped)} left out; {first[0]}: {first[1]})")
    first = opened[0]
    if rasters and not spec.assets:
        bands = _raster_bands(first)
    crs = CRS.from_user_input(spec.crs) if spec.crs else first.crs
    if spec.resolution is None and crs != first.crs:
        raise InputError(f"mosaic crs {crs.to_string()} differs from the first item's ({first.crs.to_string()}): "
                         "give resolution too")
    res = spec.resolution if spec.resolution is not None else abs(first.transform.a)
    aoi = None
    if spec.aoi is not None:
        import shapely

        geom, aoi_crs = _aoi_geometry(spec.aoi)
        geom = _to_crs(geom, aoi_crs, crs)
        aoi, bounds = shapely.geometry.mapping(geom), shapely.bounds(geom).tolist()
    elif spec.bbox is not None:
        bounds = _bounds_in(spec.bbox, CRS.from_epsg(4326), crs)
    else:
        fps = [_footprint(o, crs) for o in opened]
        bounds = [min(f[0] for f in fps), min(f[1] for f in fps), max(f[2] for f in fps), max(f[3] for f in fps)]
    anchor, through, placed = _anchor(spec.anchor, first, crs, res)
    grid = SceneGeometry.snapped(bounds, res, crs, anchor, through)
    transform, shape, grid_box = grid.transform, grid.shape, grid.bounds
    kept = [o for o in opened if _overlaps(_footprint(o, crs), grid_box)]
    resampled = tuple((o.item.id, why) for o in kept if (why := off_grid(o.crs, o.transform, grid)))
    if not kept:
        raise InputError(f"no readable item of {source} overlaps the output area {tuple(round(b, 6) for b in bounds)}")
    dtype = str(np.result_type(*[np.dtype(d) for d in first.dtypes]))
    if rasters:
        kept = [_describe_raster(o, len(bands)) for o in kept]
    nd = nodata if nodata is not None else (first.nodata if first.nodata is not None else 0.0)
    return Mosaic(source, tuple(MosaicItem(o.item.id, _iso(o.item), o.item.properties.get("eo:cloud_cover"),
                                           _absolute(o.item), _footprint(o, crs), o.stamp) for o in kept),
                  tuple(skipped), tuple(bands), crs.to_wkt(), tuple(transform)[:6], shape, dtype, float(nd),
                  spec.composite, spec.resampling, quality,
                  tuple(spec.quality.invalid) if spec.quality else (),
                  spec.quality.prefer if spec.quality else None, aoi, placed, resampled)


# Named anchors, as odc-geo and odc-stac name them: fractions of a pixel past multiples of the resolution.
ANCHORS = {"edge": (0.0, 0.0), "center": (0.5, 0.5)}
# Two grids whose pixel edges are this close (in pixels) are one grid: odc-geo pastes (reads without resampling)
# within a tolerance of this order, and rounding in headers stays far below it.
SAME_PHASE = 0.01


def _anchor(anchor: str | tuple[float, float], first: _Opened, crs: CRS,
            res: float) -> tuple[tuple[float, float], tuple[float, float] | None, str]:
    """Where the grid's pixel edges go: (fraction anchor, exact corner to pass through or None, its name).

    ``native`` passes through the first item's own pixel corner when the grid has its CRS and pixel size, so
    its pixels (and those of every item on the same grid) are copied rather than resampled; a grid of another
    CRS or resolution has no native lattice and falls back to ``edge``.
    """
    if isinstance(anchor, tuple):
        return (float(anchor[0]), float(anchor[1])), None, f"[{anchor[0]:g}, {anchor[1]:g}]"
    if anchor != "native":
        return ANCHORS[anchor], None, anchor
    t = first.transform
    if first.crs == crs and _same_size(t, res) and not (t.b or t.d):
        return (0.0, 0.0), (t.c, t.f), "native"
    return ANCHORS["edge"], None, "edge (the grid's CRS or pixel size is not the first item's)"


def _same_size(t: Affine, res: float) -> bool:
    return abs(abs(t.a) - res) <= 1e-9 * res and abs(abs(t.e) - res) <= 1e-9 * res


def off_grid(crs: CRS, transform: Affine, grid: SceneGeometry) -> str | None:
    """Why a raster's pixels are not the grid's, so that loading resamples them; None when they are (same CRS,
    pixel size and pixel edges within :data:`SAME_PHASE` of a pixel)."""
    if crs != grid.crs:
        return f"its CRS {crs.to_string()} is not the grid's {grid.crs.to_string()}"
    g = grid.transform
    if not _same_size(transform, abs(g.a)) or transform.b or transform.d:
        return f"its pixel size {abs(transform.a):g} x {abs(transform.e):g} is not the grid's {abs(g.a):g}"
    dx, dy = (transform.c - g.c) / g.a, (transform.f - g.f) / g.e
    off = [d - round(d) for d in (dx, dy)]
    if any(abs(d) > SAME_PHASE for d in off):
        return f"its pixel edges lie {off[0]:+.3f}, {off[1]:+.3f} px off the grid's"
    return None


def _criteria(spec: MosaicSpec) -> str:
    parts = [f"{k} {v}" for k, v in (("collections", spec.collections), ("bbox", spec.bbox), ("datetime",
             spec.datetime), ("max_cloud", spec.max_cloud)) if v is not None]
    return ", ".join(parts) or "any item"


def _raster_bands(first: _Opened) -> list[str]:
    """A raster list's bands: every band of the first raster, named as odc-stac names a multi-band asset's."""

    href = first.item.assets["image"].href
    with open_raster(href) as ds:
        n = ds.count
    return ["image"] if n == 1 else [f"image.{b}" for b in range(1, n + 1)]


def _describe_raster(o: _Opened, n_bands: int) -> _Opened:
    """A plain raster's item given what a STAC item would carry: its footprint, projection and band count, so
    odc-stac reads only the part of it a block needs and names a multi-band raster's bands ``image.N``."""
    from rasterio.transform import array_bounds
    from shapely.geometry import box, mapping

    west, south, east, north = _bounds_in(array_bounds(*o.shape, o.transform), o.crs, CRS.from_epsg(4326))
    o.item.geometry, o.item.bbox = mapping(box(west, south, east, north)), [west, south, east, north]
    asset = o.item.assets["image"]
    epsg = o.crs.to_epsg()
    asset.extra_fields.update({**({"proj:code": f"EPSG:{epsg}"} if epsg else {"proj:wkt2": o.crs.to_wkt()}),
                               "proj:shape": list(o.shape), "proj:transform": list(o.transform)[:6]})
    if n_bands > 1:
        asset.extra_fields["raster:bands"] = [{"data_type": o.dtypes[0]} for _ in range(n_bands)]
    return o


def _iso(item: pystac.Item) -> str | None:
    if RASTER_ORDER in item.properties:  # a plain raster has no date of its own
        return None
    t = _item_time(item)[0]
    return t.isoformat() if t is not None else None


def _absolute(item: pystac.Item) -> dict[str, Any]:
    """The item as JSON with absolute asset hrefs: a worker loads it without the catalog around it."""
    d = _without_links(item.to_dict(include_self_link=False, transform_hrefs=False))
    for name, asset in item.assets.items():
        d["assets"][name]["href"] = asset.get_absolute_href() or asset.href
    return d


def _footprint(o: _Opened, crs: CRS) -> tuple[float, float, float, float]:
    """The item's first band's bounds in ``crs`` (densified: a reprojected rectangle bulges)."""
    from rasterio.transform import array_bounds

    h, w = o.shape
    west, south, east, north = array_bounds(h, w, o.transform)
    return _bounds_in((west, south, east, north), o.crs, crs)


def _bounds_in(bounds: Iterable[float], src: CRS, dst: CRS) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    b = list(bounds)
    return tuple(b) if src == dst else tuple(transform_bounds(src, dst, *b, densify_pts=21))


def _aoi_geometry(path: Path) -> tuple[Any, CRS]:
    """The union of an AOI file's polygons and its CRS (EPSG:4326 when the file names none, as GeoJSON says)."""
    import shapely

    from segpipe.io.vector import read_features

    features = read_features(path, what="aoi")
    geoms = [shapely.geometry.shape(g) for g in features.geometries if g is not None]
    polygons = [g for g in geoms if g.geom_type in ("Polygon", "MultiPolygon")]
    if not polygons:
        raise InputError(f"aoi has no polygon: {path}")
    return shapely.union_all(polygons), features.crs or CRS.from_epsg(4326)


def _to_crs(geom: Any, src: CRS, dst: CRS) -> Any:
    import shapely
    from rasterio.warp import transform_geom

    if src == dst:
        return geom
    return shapely.geometry.shape(transform_geom(src, dst, shapely.geometry.mapping(geom)))


# --- loading and compositing a block --------------------------------------------------------------------------

def block_of(m: Mosaic, r0: int, c0: int) -> tuple[int, int, int, int]:
    """The fixed block holding pixel (r0, c0): its row, column, height and width (clipped at the grid edge)."""
    br, bc = (r0 // BLOCK) * BLOCK, (c0 // BLOCK) * BLOCK
    return br, bc, min(BLOCK, m.shape[0] - br), min(BLOCK, m.shape[1] - bc)


def load_block(m: Mosaic, r0: int, c0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(band, h, w)`` and validity of one fixed block, composited from the items that overlap it."""
    transform = m.affine * Affine.translation(c0, r0)
    data = np.full((len(m.bands), h, w), m.nodata, dtype=m.dtype)
    ok = np.zeros((h, w), bool)
    box = SceneGeometry("raster", (h, w), transform).bounds
    items = [i for i in m.items if _overlaps(i.bounds, box)]
    if not items:
        return data, ok
    stack, valid, quality = _load_items(m, items, transform, (h, w))
    if m.composite == "median":
        data, ok = _median(stack, valid, m)
    else:
        if m.composite == "best":
            pick = _best(valid, quality, m.quality_prefer)
        else:
            pick = np.argmax(valid, axis=0)  # the first valid item
        ok = valid.any(axis=0)
        data = np.take_along_axis(stack, pick[None, None], axis=0)[0]
        data[:, ~ok] = m.nodata
    if m.aoi is not None:
        from rasterio.features import geometry_mask

        inside = geometry_mask([m.aoi], out_shape=(h, w), transform=transform, invert=True)
        ok &= inside
        data[:, ~inside] = m.nodata
    return data, ok


def _best(valid: np.ndarray, quality: np.ndarray, prefer: str | None) -> np.ndarray:
    """Per pixel, the index of the item to take for ``best``: valid and rated items by quality (``prefer``
    low or high), then valid items without a quality value, then the rest; ties go to the first in item order.

    Why a key of its own for "no quality value" rather than a sentinel quality: any sentinel (inf) flips to
    the front when the order flips for ``high``.
    """
    unrated = np.isnan(quality)
    tier = np.where(valid, np.where(unrated, 1, 0), 2)
    score = np.where(unrated, 0.0, quality if prefer == "low" else -quality)
    order = np.lexsort((np.broadcast_to(np.arange(len(valid))[:, None, None], valid.shape), score, tier), axis=0)
    return order[0]


def _load_items(m: Mosaic, items: list[MosaicItem], transform: Affine,
                shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The items' bands on the block's grid ``(item, band, y, x)``, their validity ``(item, y, x)`` and quality
    values ``(item, y, x)`` (NaN for items without a quality band and where it has no value: :func:`_best`).

    The bands are loaded in the mosaic's dtype with its nodata as fill (outside an item, and where an asset's
    own nodata says so); the quality band apart, as float with NaN fill, so no quality value is taken for fill.
    """
    from odc.geo.geobox import GeoBox

    geobox = GeoBox(shape, transform, m.crs_wkt)
    ds = _odc_load(items, list(m.bands), geobox, m.resampling, m.dtype, m.nodata)
    stack = np.stack([ds[b].values for b in m.bands], axis=1)
    valid = ~np.any(np.isnan(stack) if np.isnan(m.nodata) else stack == m.nodata, axis=1)
    if np.issubdtype(stack.dtype, np.floating):
        valid &= np.all(np.isfinite(stack), axis=1)
    quality = np.full(valid.shape, np.nan)
    rated = [k for k, i in enumerate(items) if m.quality_asset and m.quality_asset in i.stac["assets"]]
    if rated:
        q = _odc_load([items[k] for k in rated], [m.quality_asset], geobox, "nearest", "float64", np.nan)
        values = q[m.quality_asset].values
        quality[rated] = values
        if m.quality_invalid:
            valid[rated] &= ~np.isin(values, m.quality_invalid)
    return stack, valid, quality


def _odc_load(items: list[MosaicItem], bands: list[str], geobox: Any, resampling: str, dtype: str,
              nodata: float) -> Any:
    """odc-stac's load of one block, one time slice per item in the given order, computed at once (no dask)."""
    import odc.stac
    import pystac

    quiet_not_georeferenced()
    ds = odc.stac.load([pystac.Item.from_dict(i.stac) for i in items], bands=bands, geobox=geobox,
                       groupby="id", preserve_original_order=True, resampling=resampling, dtype=dtype,
                       nodata=nodata, chunks=None, fail_on_error=True)
    if ds.sizes.get("time") != len(items):
        raise RuntimeError(f"odc-stac grouped {len(items)} items into {ds.sizes.get('time')} slices")
    return ds


def _median(stack: np.ndarray, valid: np.ndarray, m: Mosaic) -> tuple[np.ndarray, np.ndarray]:
    """Per band median of the valid pixels; integers rounded half to even, so the dtype stays the source's."""
    import warnings

    values = np.where(valid[:, None], stack.astype(np.float64), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN where no item is valid
        med = np.nanmedian(values, axis=0)
    ok = valid.any(axis=0)
    if np.issubdtype(np.dtype(m.dtype), np.integer):
        med = np.rint(med)
    med[:, ~ok] = m.nodata
    return med.astype(m.dtype), ok
