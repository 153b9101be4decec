"""Export ``polygons``: the class map vectorised per class, as GeoParquet 1.1 (or, on request, GeoPackage or
FlatGeobuf), one polygon per 4-connected region of one class, holes kept, with ``class_id``, ``class_name``,
``area`` (CRS units², µm² for a slide) and ``pixels``.

Why bands of rows, vectorised on the workers: GDAL's polygonize (``rasterio.features.shapes``, connectivity 4)
traces one band of full-width rows per task, in *pixel* coordinates. There every vertex is an integer, so the
edges two pieces share across a band border are exactly equal, and nothing is decided by floating-point
tolerance; the scene's affine is applied once per finished polygon, at the very end. Full-width bands make the
merge one-dimensional: a piece can only meet pieces of the bands above and below it. A band is one chunk row of
``result.zarr/class`` (each chunk read once; at most 512 rows, so a 100 000-pixel-wide scene's band is 50 MB),
which also makes the tile size change where the borders fall, and the tests compare tile sizes.

Why a streaming merge, on the client: bands are taken in order from top to bottom. A region crossing the
border between band ``k`` and ``k + 1`` shares an edge there between a piece whose bottom lies on the border and
a piece whose top does, of the same class, over at least one pixel: each band's task also returns, per column
of its first and last row, which of its pieces holds that pixel, so "shares an edge" is one comparison of two
rows, never a geometric search (a contact at a corner only, two diagonal pixels, is no contact under
4-connectivity and is never merged; the pixel rows cannot mistake it for one). Pieces joined so, across any
number of bands, form one group (a union-find per border). A group that touches no open border any more is
final: a piece that meets nothing across either border (most of them) is final
as traced and goes straight out; the others are unioned (a coverage union of their outer rings, their holes put
back unchanged, ``shapely.coverage_union_all``, after giving pieces that share a
border the same vertices along it: all integers, so nothing is rounded, and linear in the vertices), the
vertices the band borders left on straight edges are dropped (GDAL writes corners only), and it is written out
at once. Holes need no care: a hole cannot touch a band border (its pixels would lie on the band's
edge, outside the region), and the union keeps the holes of every piece and closes the ones a border cut open,
touching the outer ring at a corner as GDAL writes them (OGC-valid).

Hence the result is the same polygons as one ``shapes`` over the whole scene, for any tile size, band height and
worker count (tested against exactly that, with tile sizes 256 and 1024); only the order of the rows in the file
follows the order in which polygons were finished (bottom edge first), so compare them sorted.

Memory: the client holds only the groups touching the open border (their pieces, as geometries) plus the bands
in flight (at most ``2 × workers`` bands' pieces, submitted ahead and released once merged), and writes finished
polygons in batches of ``BATCH`` rows. The bound is the polygons crossing one border, not the scene: a class
region that touches every band (a sea, a forest spanning the scene) is held whole until its last band, as its
polygon must be, but the pixels of the scene are never read into one process.

Why pyarrow's ``ParquetWriter`` rather than GeoPandas' ``to_parquet``: the latter needs the whole table in one
frame; writing row groups as polygons finish keeps the bound above. The ``geo`` metadata is written as the
GeoParquet 1.1 specification gives it (WKB encoding, ``geometry_types`` ``["Polygon"]``, a ``bbox`` covering
column, so that readers skip row groups by their statistics, the CRS as PROJJSON,
``null`` where the grid has none: a slide's micrometres or an image placed in pixels, since an absent ``crs``
would mean OGC:CRS84). GeoPackage and FlatGeobuf go through pyogrio's ``write_arrow`` from the same stream of
record batches.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.exports import ExportRun

FORMATS = {"parquet": "class_polygons.parquet", "gpkg": "class_polygons.gpkg", "fgb": "class_polygons.fgb"}
DRIVERS = {"gpkg": "GPKG", "fgb": "FlatGeobuf"}
LAYER = "class_polygons"
NODATA = 255  # segpipe.io.result.NODATA (a test ties them); not imported so that this module loads no zarr
BATCH = 10_000  # finished polygons per record batch (Parquet row group)


def write(run: ExportRun) -> list[Path]:
    fmt = str(run.settings.get("polygons", {}).get("format", "parquet"))
    dest = run.path(FORMATS[fmt])
    import zarr

    from segpipe.geometry import SceneGeometry

    arr = zarr.open_array(run.result, path="class", mode="r")
    grid = SceneGeometry.of_attrs(arr.shape, dict(zarr.open_group(run.result, mode="r").attrs))
    batches = record_batches(polygons(run.result, arr.shape[0], arr.chunks[0], run.client), grid, run.class_names)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp{dest.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        if fmt == "parquet":
            _write_parquet(batches, grid, tmp)
        else:
            _write_ogr(batches, grid, tmp, DRIVERS[fmt])
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return [dest]


def vectorise_band(result: str, row0: int, row1: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray],
                                                                np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One band's pieces in pixel coordinates (as shapely's ragged arrays: corner coordinates, ring offsets, piece
    offsets; numbers only, so Dask sends them as three buffers where a list of WKB strings went as one message
    frame per piece, which cost more than the tracing), their classes and pixel counts, and per column of the band's
    first and last row the index of the piece holding that pixel (-1: no data)."""
    import shapely
    import zarr
    from affine import Affine
    from rasterio.features import shapes

    data = np.asarray(zarr.open_array(result, path="class", mode="r")[row0:row1])
    width = data.shape[1]
    top, bottom = np.full(width, -1, np.int64), np.full(width, -1, np.int64)
    # GDAL's rings gathered into one ragged array and made polygons at once: building a shapely polygon per
    # GeoJSON mapping cost 3x the tracing itself on a noisy map (10^5 regions per 16 Mpx).
    coords: list = []
    ring_lengths: list[int] = []
    rings_per: list[int] = []
    classes = []
    for g, v in shapes(data, mask=data != NODATA, connectivity=4, transform=Affine.translation(0, row0)):
        for ring in g["coordinates"]:
            coords.extend(ring)
            ring_lengths.append(len(ring))
        rings_per.append(len(g["coordinates"]))
        classes.append(int(v))
    # fromiter over the flat numbers: a third of asarray's time on 10^6 tuples
    corners = np.fromiter(chain.from_iterable(coords), np.float64, count=2 * len(coords)).reshape(-1, 2)
    offsets = (np.concatenate([[0], np.cumsum(ring_lengths, dtype=np.int64)]),
               np.concatenate([[0], np.cumsum(rings_per, dtype=np.int64)]))
    geoms = (shapely.from_ragged_array(shapely.GeometryType.POLYGON, corners, offsets) if classes
             else np.empty(0, object))
    bounds = shapely.bounds(geoms).reshape(-1, 4)
    for i in np.flatnonzero((bounds[:, 1] == row0) | (bounds[:, 3] == row1)):
        xy = shapely.get_coordinates(shapely.get_exterior_ring(geoms[i]))
        a, b = xy[:-1], xy[1:]
        for line, owner in ((row0, top), (row1, bottom)):
            on = (a[:, 1] == line) & (b[:, 1] == line)
            for x0, x1 in zip(a[on, 0], b[on, 0], strict=True):
                owner[int(min(x0, x1)):int(max(x0, x1))] = i
    pixels = np.rint(shapely.area(geoms)).astype(np.int64)
    rings = (corners.astype(np.int32), *offsets)  # the arrays the pieces were made from; corners are integers
    return rings, np.asarray(classes, np.int64), pixels, top, bottom


class _Group:
    """Pieces of one class region still touching the open border."""

    __slots__ = ("cls", "pieces", "pixels")

    def __init__(self, cls: int, pieces: list, pixels: int) -> None:
        self.cls, self.pieces, self.pixels = cls, pieces, pixels


def _bands(result: str, height: int, rows: int, client: Any) -> Iterator[tuple]:
    """Each band's vectorisation, in order; with a client, at most ``2 × workers`` bands in flight."""
    spans = [(r, min(r + rows, height)) for r in range(0, height, rows)]
    if client is None:
        for r0, r1 in spans:
            yield r0, r1, vectorise_band(result, r0, r1)
        return
    ahead = max(2, 2 * sum(client.nthreads().values()))
    queue: deque = deque()
    todo = iter(spans)
    for r0, r1 in todo:
        queue.append((r0, r1, client.submit(vectorise_band, result, r0, r1, pure=False)))
        if len(queue) >= ahead:
            break
    while queue:
        r0, r1, future = queue.popleft()
        out = future.result()
        del future
        nxt = next(todo, None)
        if nxt is not None:
            queue.append((*nxt, client.submit(vectorise_band, result, *nxt, pure=False)))
        yield r0, r1, out


def polygons(result: str, height: int, rows: int, client: Any = None) -> Iterator[tuple[int, Any, int]]:
    """Every class region of the map as ``(class_id, polygon in pixel coordinates, pixels)``, merged across band
    borders by the streaming merge the module's docstring describes."""
    import shapely

    open_groups: dict[int, _Group] = {}
    border = None  # per column of the open border: the open group above it (-1: none)
    next_id = 0
    for _, r1, ((xy, ring_offsets, piece_offsets), classes, pixels, top, bottom) in _bands(result, height, rows,
                                                                                           client):
        pieces = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy.astype(np.float64),
                                           (ring_offsets, piece_offsets)) if len(classes) else []
        n = len(pieces)
        parent = list(range(n))  # union-find over this band's pieces
        find = _finder(parent)
        joined: dict[int, int] = {}  # an open group -> a piece of this band it meets
        if border is not None and n:
            both = (border >= 0) & (top >= 0)
            for gid, piece in set(zip(border[both].tolist(), top[both].tolist(), strict=True)):
                if open_groups[gid].cls != classes[piece]:
                    continue
                if gid in joined:  # one group meeting several pieces: they are one region
                    a, b = find(joined[gid]), find(piece)
                    if a != b:
                        parent[b] = a
                else:
                    joined[gid] = piece
        groups_of: dict[int, list[int]] = {}
        for gid, piece in joined.items():
            groups_of.setdefault(find(piece), []).append(gid)
        for gid in set(open_groups) - set(joined):  # met nothing below: final
            g = open_groups.pop(gid)
            yield g.cls, _finish(g.pieces), g.pixels
        last = r1 >= height
        at_bottom = set() if last else set(bottom[bottom >= 0].tolist())
        at_top = set(joined.values())
        members: dict[int, list[int]] = {}
        for i in range(n):
            if i in at_bottom or i in at_top or parent[i] != i:
                members.setdefault(find(i), []).append(i)
            else:  # inside the band, or on a border with nothing across it: final as traced (most pieces)
                yield int(classes[i]), pieces[i], int(pixels[i])
        gid_of = np.full(n + 1, -1, np.int64)  # a piece -> its open group (index -1, no piece, stays -1)
        for root, idx in members.items():
            group = _Group(int(classes[root]), [pieces[i] for i in idx], int(pixels[idx].sum()))
            for gid in groups_of.get(root, ()):
                old = open_groups.pop(gid)
                group.pieces.extend(old.pieces)
                group.pixels += old.pixels
            if at_bottom.isdisjoint(idx):
                yield group.cls, _finish(group.pieces), group.pixels
            else:
                open_groups[next_id] = group
                gid_of[idx] = next_id
                next_id += 1
        border = gid_of[bottom]
    for g in open_groups.values():  # a scene whose last band left groups open (none: the last band closes all)
        yield g.cls, _finish(g.pieces), g.pixels


def _finder(parent: list[int]) -> Any:
    """``find`` of a union-find over ``parent`` (with path halving)."""

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    return find


def _finish(pieces: list) -> Any:
    """One region's pieces as one polygon: their outer rings unioned exactly on the integer grid (straight-edge
    vertices dropped), then the pieces' holes put back as they are.

    Why the holes are left out of the union: a hole of a piece never touches its band's borders (see the module
    docstring), so no other piece reaches into it and the union leaves it exactly as it was; the union's own
    holes are the ones closed across a border. Taking the holes out makes the union's work the outlines only:
    a noisy class map's scene-spanning region has 10^5 holes, which took the union 20x longer to carry through
    than the outlines alone, and building them back from one array of rings costs no Python per hole."""
    import shapely

    if len(pieces) == 1:  # as GDAL traced it: corners only
        return pieces[0]
    shells = shapely.polygons(shapely.get_exterior_ring(np.asarray(pieces, dtype=object)))
    geom = shapely.coverage_union_all(_noded(list(shells)))
    if geom.geom_type != "Polygon":
        raise RuntimeError(f"class region merged into a {geom.geom_type}, not one polygon")
    rings = [_corners(geom.exterior), *(_corners(r) for r in geom.interiors)]
    # Every ring of every piece as one ragged array (shapely's): all but each piece's first (outer) ring are kept.
    _, coords, (ring_ends, piece_rings) = shapely.to_ragged_array(np.asarray(pieces, dtype=object))
    hole = np.ones(len(ring_ends) - 1, bool)
    hole[piece_rings[:-1]] = False
    starts, ends = ring_ends[:-1][hole], ring_ends[1:][hole]
    lengths = np.concatenate([[len(r) for r in rings], ends - starts])
    firsts = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])  # where each kept ring starts among the kept
    take = np.arange(int((ends - starts).sum())) + np.repeat(starts - firsts, ends - starts)
    all_coords = np.concatenate([*rings, coords[take]])
    offsets = (np.concatenate([[0], np.cumsum(lengths)]), np.asarray([0, len(lengths)]))
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, all_coords, offsets)[0]


def _noded(pieces: list) -> list:
    """Outer rings (as polygons) of one region's pieces with a vertex wherever another piece's vertex lies on the
    band border they share, so that their shared edges are equal edge for edge: what a coverage union needs
    (linear in the vertices, where an overlay of a scene-spanning region's 150 pieces and 300 000 vertices took 4
    to 10 s). A piece meets others only along its top and bottom lines (its band's borders)."""
    import shapely

    rings = [shapely.get_coordinates(p.exterior) for p in pieces]
    lines: dict[float, set[float]] = {}
    for xy in rings:
        for y in (xy[:, 1].min(), xy[:, 1].max()):
            lines.setdefault(float(y), set()).update(xy[xy[:, 1] == y, 0].tolist())
    xs = {y: np.asarray(sorted(v)) for y, v in lines.items()}
    out = []
    for p, xy in zip(pieces, rings, strict=True):
        a, b = xy[:-1], xy[1:]
        cut = np.flatnonzero((a[:, 1] == b[:, 1]) & np.isin(a[:, 1], (xy[:, 1].min(), xy[:, 1].max())))
        if not len(cut):
            out.append(p)
            continue
        parts, start = [], 0
        for i in cut:
            x0, x1, y = a[i, 0], b[i, 0], a[i, 1]
            line = xs[float(y)]
            inner = line[(line > min(x0, x1)) & (line < max(x0, x1))]
            parts.append(xy[start:i + 1])
            if len(inner):
                parts.append(np.column_stack([inner if x1 > x0 else inner[::-1], np.full(len(inner), y)]))
            start = i + 1
        parts.append(xy[start:])
        out.append(shapely.Polygon(np.vstack(parts)))
    return out


def _corners(ring: Any) -> np.ndarray:
    """A closed axis-parallel ring's coordinates without repeated points and vertices in the middle of a straight
    edge (where a band border cut it)."""
    import shapely

    pts = shapely.get_coordinates(ring)[:-1]
    keep = np.empty(len(pts), bool)
    keep[0] = np.any(pts[0] != pts[-1])
    keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
    pts = pts[keep]
    prev = np.concatenate([pts[-1:], pts[:-1]])
    nxt = np.concatenate([pts[1:], pts[:1]])
    straight = ((prev[:, 0] == pts[:, 0]) & (pts[:, 0] == nxt[:, 0])) | ((prev[:, 1] == pts[:, 1])
                                                                          & (pts[:, 1] == nxt[:, 1]))
    pts = pts[~straight]
    return np.vstack([pts, pts[:1]])


def _schema(grid: Any) -> Any:
    import pyarrow as pa

    box = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])
    return pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area", pa.float64()),
                      ("pixels", pa.int64()), ("geometry", pa.binary()), ("bbox", box)])


def record_batches(regions: Iterator[tuple[int, Any, int]], grid: Any, class_names: list[str]) -> Iterator[Any]:
    """Finished polygons in CRS coordinates (the grid's affine applied), ``BATCH`` rows per record batch."""
    import pyarrow as pa
    import shapely

    t = grid.transform
    pixel_area = abs(t.a * t.e - t.b * t.d)
    schema = _schema(grid)

    def to_world(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])

    def batch(rows: list[tuple[int, Any, int]]) -> Any:
        geoms = shapely.transform(np.asarray([g for _, g, _ in rows], dtype=object), to_world)
        px = np.asarray([p for _, _, p in rows], np.int64)
        return pa.record_batch([
            pa.array([c for c, _, _ in rows], pa.int32()),
            pa.array([class_names[c] if c < len(class_names) else str(c) for c, _, _ in rows], pa.string()),
            pa.array(px * pixel_area, pa.float64()), pa.array(px, pa.int64()),
            pa.array(shapely.to_wkb(geoms), pa.binary()),
            pa.StructArray.from_arrays([pa.array(c) for c in shapely.bounds(geoms).T],
                                       names=["xmin", "ymin", "xmax", "ymax"])], schema=schema)

    rows: list[tuple[int, Any, int]] = []
    for region in regions:
        rows.append(region)
        if len(rows) >= BATCH:
            yield batch(rows)
            rows = []
    if rows:
        yield batch(rows)


def geo_metadata(grid: Any) -> dict[str, Any]:
    """The GeoParquet 1.1 ``geo`` file metadata of the ``geometry`` column."""
    crs = None
    if grid.crs is not None:
        from pyproj import CRS

        crs = CRS.from_wkt(grid.crs.to_wkt()).to_json_dict()
    return {"version": "1.1.0", "primary_column": "geometry",
            "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs, "covering": {
                "bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}}}


def _write_parquet(batches: Iterator[Any], grid: Any, dest: Path) -> None:
    import pyarrow.parquet as pq

    schema = _schema(grid).with_metadata({b"geo": json.dumps(geo_metadata(grid)).encode()})
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        for b in batches:
            writer.write_batch(b, row_group_size=BATCH)


def _write_ogr(batches: Iterator[Any], grid: Any, dest: Path, driver: str) -> None:
    import pyarrow as pa
    from pyogrio.raw import write_arrow

    schema = _schema(grid).with_metadata(None)
    schema = schema.remove(schema.get_field_index("bbox"))  # a Parquet covering; OGR formats index themselves
    schema = schema.set(schema.get_field_index("geometry"),
                        pa.field("geometry", pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb"}))
    stream = pa.RecordBatchReader.from_batches(schema, (b.drop_columns(["bbox"]).cast(schema) for b in batches))
    write_arrow(stream, str(dest), layer=LAYER, driver=driver, geometry_name="geometry", geometry_type="Polygon",
                crs=grid.crs.to_wkt() if grid.crs is not None else None)
