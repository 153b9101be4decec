"""Export ``polygons``: the class map vectorised per class, as GeoParquet 1.1 (or, on request, GeoPackage or
FlatGeobuf), one polygon per 4-connected region of one class, holes kept, with ``class_id``, ``class_name``,
``area`` (CRS units², µm² for a slide), ``pixels`` and ``cut`` (a part of a region too large for one polygon; see
Memory below).

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

Memory: the client holds only the groups touching the open border, plus the bands in flight (at most
``2 × workers`` bands, submitted ahead and released once merged), and writes finished polygons as they finish.
An open group is kept small: its outer rings are unioned at every band (:func:`_compact`), so what stays a
polygon is its outline so far, and its holes (final once traced or closed) are int32 arrays, 8 bytes a corner;
finished regions go from those arrays to WKB without becoming shapely polygons (:func:`wkb_polygons`). What one
region may hold is bounded too: at every ``CUT_ROWS``-th row a region whose part above has more than
``max_vertices`` corners (default ``MAX_VERTICES``) is written as that part, and the rest of it goes on as new
parts, all flagged ``cut``. Without that, a class region with holes all over the scene (the background of a
salt-and-pepper map: tens of millions of corners at 1.6 Gpx) is one polygon of gigabytes, which Parquet's writer
copies two or three times more, and a value of 2 GiB is more than a Parquet page holds. The parts of a cut region
meet edge to edge along the cut rows, so ``dissolve`` by class and ``explode`` give the whole regions back (tested);
``max_vertices: 0`` never cuts. The pixels of the scene are never read into one process; a worker turns GDAL's
rings (Python tuples, 14× the int32 pairs) into arrays every ``TRACE_CHUNK`` corners.

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
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from segpipe.io.exports import ExportRun

FORMATS = {"parquet": "class_polygons.parquet", "gpkg": "class_polygons.gpkg", "fgb": "class_polygons.fgb"}
DRIVERS = {"gpkg": "GPKG", "fgb": "FlatGeobuf"}
LAYER = "class_polygons"
NODATA = 255  # segpipe.io.result.NODATA (a test ties them); not imported so that this module loads no zarr
BATCH = 10_000  # finished polygons per record batch (Parquet row group)
# Column statistics: the bbox covering's are what readers skip row groups by; those of the WKB column are a copy of its
# smallest and largest value, which for a scene-spanning region is hundreds of MB held by the writer for nothing.
STATISTICS = ["class_id", "class_name", "area", "pixels", "cut",
              *(f"bbox.{k}" for k in ("xmin", "ymin", "xmax", "ymax"))]
# A region whose part above a multiple of CUT_ROWS has more than MAX_VERTICES corners is cut there (see
# region_batches): what one polygon may hold, and so the export's memory, stays bounded by a band of CUT_ROWS rows
# plus 2^22 corners (a 64 MiB WKB polygon), whatever the scene's size and class map.
CUT_ROWS = 2048
MAX_VERTICES = 2**22
TRACE_CHUNK = 2**16  # GDAL vertices held as Python tuples at most, per band task


def write(run: ExportRun) -> list[Path]:
    fmt = str(run.settings.get("polygons", {}).get("format", "parquet"))
    dest = run.path(FORMATS[fmt])
    import zarr

    from segpipe.geometry import SceneGeometry

    arr = zarr.open_array(run.result, path="class", mode="r")
    grid = SceneGeometry.of_attrs(arr.shape, dict(zarr.open_group(run.result, mode="r").attrs))
    settings = run.settings.get("polygons", {})
    regions = region_batches(run.result, arr.shape[0], arr.chunks[0], run.client,
                             settings.get("max_vertices", MAX_VERTICES) or None)
    batches = record_batches(regions, grid, run.class_names)
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
    # GeoJSON mapping cost 3x the tracing itself on a noisy map (10^5 regions per 16 Mpx). The rings come as
    # Python tuples (about 110 bytes a vertex, 14x the int32 pair they become), so they are turned into arrays every
    # ``TRACE_CHUNK`` vertices: a 20 Mpx band of a noisy map held 1 GiB of tuples at once.
    chunks: list[np.ndarray] = []
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
        if len(coords) >= TRACE_CHUNK:
            chunks.append(_flat(coords))
            coords = []
    corners = np.concatenate([*chunks, _flat(coords)]) if chunks else _flat(coords)
    del chunks, coords
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


def _flat(coords: list) -> np.ndarray:
    """GDAL's ``(x, y)`` tuples as an ``(n, 2)`` float64 array (fromiter over the flat numbers: a third of
    asarray's time on 10^6 tuples)."""
    return np.fromiter(chain.from_iterable(coords), np.float64, count=2 * len(coords)).reshape(-1, 2)


class Regions(NamedTuple):
    """Finished class regions as one ragged array in pixel coordinates (shapely's layout for polygons):
    ``xy[ring_offsets[r]:ring_offsets[r + 1]]`` is ring ``r``, ``poly_offsets[p]:poly_offsets[p + 1]`` the rings of
    region ``p``, its outer ring first."""

    classes: np.ndarray  # (P,) int64
    pixels: np.ndarray  # (P,) int64
    cut: np.ndarray  # (P,) bool: a part of a larger region, cut along a row (see region_batches)
    xy: np.ndarray  # (V, 2) int32: every vertex is a pixel corner
    ring_offsets: np.ndarray  # (R + 1,) int64
    poly_offsets: np.ndarray  # (P + 1,) int64


class _Group:
    """One class region's pieces still touching the open border: their outer rings as polygons (what the merge
    unions) and their holes as int32 ragged arrays, which the merge never touches (see :func:`_finish`) and
    of which a scene-spanning region of a noisy map has millions: 8 bytes a vertex and 4 a ring, where shapely's
    polygons took about 24 a vertex and 250 a ring."""

    __slots__ = ("cls", "cut", "holes", "pixels", "shells")

    def __init__(self, cls: int, shells: list, holes: list[tuple[np.ndarray, np.ndarray]], pixels: int,
                 cut: bool) -> None:
        self.cls, self.shells, self.holes, self.pixels, self.cut = cls, shells, holes, pixels, cut

    def absorb(self, other: _Group) -> None:
        self.shells.extend(other.shells)
        self.holes.extend(other.holes)
        self.pixels += other.pixels
        self.cut |= other.cut

    def vertices(self) -> int:
        """Corners held: the same count for any band height (outlines and holes are corners only)."""
        import shapely

        return int(shapely.get_num_coordinates(self.shells).sum()) + sum(int(n.sum()) for _, n in self.holes)


def _bands(result: str, height: int, rows: int, client: Any, cut_rows: int = CUT_ROWS) -> Iterator[tuple]:
    """Each band's vectorisation, in order; with a client, at most ``2 × workers`` bands in flight. Bands are
    ``rows`` high, and also end at every ``cut_rows``-th row, where large regions may be cut."""
    ends = sorted({*range(rows, height, rows), *range(cut_rows, height, cut_rows), height})
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
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


def _take(xy: np.ndarray, ring_offsets: np.ndarray, poly_offsets: np.ndarray, idx: np.ndarray,
          rings: str = "all") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polygons ``idx`` of a ragged array as a ragged array of their own (coordinates, ring lengths, rings per
    polygon): ``rings`` ``"all"`` of theirs, only the ``"outer"`` one, or only the ``"holes"``. Vectorised: a band
    has 10^5 pieces."""
    first = poly_offsets[idx] + (1 if rings == "holes" else 0)
    rings_per = np.ones(len(idx), np.int64) if rings == "outer" else poly_offsets[idx + 1] - first
    ring_ids = np.repeat(first - np.concatenate([[0], np.cumsum(rings_per)[:-1]]), rings_per) + np.arange(
        int(rings_per.sum()))
    starts, lengths = ring_offsets[ring_ids], ring_offsets[ring_ids + 1] - ring_offsets[ring_ids]
    firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    take = np.repeat(starts - firsts, lengths) + np.arange(int(lengths.sum()))
    return xy[take], lengths, rings_per


def _offsets(lengths: np.ndarray, rings_per: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ring and polygon offsets of a ragged array from its ring lengths and rings per polygon."""
    return (np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
            np.concatenate([[0], np.cumsum(rings_per, dtype=np.int64)]))


def region_batches(result: str, height: int, rows: int, client: Any = None, max_vertices: int | None = MAX_VERTICES,
                   cut_rows: int = CUT_ROWS) -> Iterator[Regions]:
    """Every class region of the map, merged across band borders by the streaming merge the module's docstring
    describes, in batches: per band, the pieces final as traced, and the regions that band finished.

    Only the outer rings of pieces that touch a band border become shapely polygons (for the union); everything
    else goes from the worker's arrays to the file without one.

    Cut: at every ``cut_rows``-th row, a region whose part above that row has more than ``max_vertices`` corners
    is written as that part, and what lies below goes on as a new part (all flagged ``cut``). The count is of
    the part's own corners, the same for any tile size, band height and worker count, so the cuts are too."""
    open_groups: dict[int, _Group] = {}
    border = None  # per column of the open border: the open group above it (-1: none)
    next_id = 0
    for r0, r1, ((xy, ring_offsets, piece_offsets), classes, pixels, top, bottom) in _bands(result, height, rows,
                                                                                            client, cut_rows):
        n = len(classes)
        piece_cut = np.zeros(n, bool)
        if border is not None and max_vertices is not None and r0 % cut_rows == 0:
            cut = [gid for gid, g in open_groups.items() if g.vertices() > max_vertices]
            if cut:
                parts = [open_groups.pop(gid) for gid in cut]
                for g in parts:
                    g.cut = True
                yield _finished(parts)
                cls_above = np.full(len(border), -1, np.int64)
                for gid, g in zip(cut, parts, strict=True):
                    cls_above[border == gid] = g.cls
                below = (top >= 0) & (cls_above >= 0)
                below[below] = classes[top[below]] == cls_above[below]
                piece_cut[top[below]] = True  # a piece the cut part would have joined: the rest of that region
                border = np.where(cls_above >= 0, -1, border)
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
        finished = [open_groups.pop(gid) for gid in set(open_groups) - set(joined)]  # met nothing below: final
        at_bottom = np.zeros(n, bool)
        if r1 < height:
            at_bottom[bottom[bottom >= 0]] = True
        grouped = at_bottom.copy()
        grouped[list(joined.values())] = True
        grouped[[i for i in range(n) if parent[i] != i]] = True
        final = np.flatnonzero(~grouped)  # inside the band, or on a border with nothing across it: most pieces
        if len(final):
            part, lengths, rings_per = _take(xy, ring_offsets, piece_offsets, final)
            yield Regions(classes[final], pixels[final], piece_cut[final], part, *_offsets(lengths, rings_per))
        members: dict[int, list[int]] = {}
        for i in np.flatnonzero(grouped).tolist():
            members.setdefault(find(i), []).append(i)
        shells = _shells(xy, ring_offsets, piece_offsets, np.flatnonzero(grouped))
        gid_of = np.full(n + 1, -1, np.int64)  # a piece -> its open group (index -1, no piece, stays -1)
        for root, idx in members.items():
            ids = np.asarray(idx)
            hole_xy, hole_lengths, _ = _take(xy, ring_offsets, piece_offsets, ids, "holes")
            group = _Group(int(classes[root]), [shells[i] for i in idx],
                           [(hole_xy, hole_lengths.astype(np.int32))] if len(hole_lengths) else [],
                           int(pixels[ids].sum()), bool(piece_cut[ids].any()))
            for gid in groups_of.get(root, ()):
                group.absorb(open_groups.pop(gid))
            if at_bottom[ids].any():
                _compact(group)
                open_groups[next_id] = group
                gid_of[ids] = next_id
                next_id += 1
            else:
                finished.append(group)
        if finished:
            yield _finished(finished)
        border = gid_of[bottom]
    if open_groups:  # a scene whose last band left groups open (none: the last band closes all)
        yield _finished(list(open_groups.values()))


def polygons(result: str, height: int, rows: int, client: Any = None) -> Iterator[tuple[int, Any, int]]:
    """Every class region of the map as ``(class_id, shapely polygon in pixel coordinates, pixels)``."""
    import shapely

    for batch in region_batches(result, height, rows, client):
        geoms = shapely.from_ragged_array(shapely.GeometryType.POLYGON, batch.xy.astype(np.float64),
                                          (batch.ring_offsets, batch.poly_offsets))
        yield from zip(batch.classes.tolist(), geoms, batch.pixels.tolist(), strict=True)


def _shells(xy: np.ndarray, ring_offsets: np.ndarray, piece_offsets: np.ndarray, idx: np.ndarray) -> dict[int, Any]:
    """The outer rings of pieces ``idx`` as shapely polygons, by piece."""
    import shapely

    if not len(idx):
        return {}
    part, lengths, rings_per = _take(xy, ring_offsets, piece_offsets, idx, "outer")
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, part.astype(np.float64),
                                      _offsets(lengths, rings_per))
    return dict(zip(idx.tolist(), polys, strict=True))


def _finished(groups: list[_Group]) -> Regions:
    """Finished groups as one batch of regions."""
    made = [_finish(g) for g in groups]
    lengths = np.concatenate([lengths for _, lengths in made])
    rings_per = np.asarray([len(lengths) for _, lengths in made], np.int64)
    return Regions(np.asarray([g.cls for g in groups], np.int64), np.asarray([g.pixels for g in groups], np.int64),
                   np.asarray([g.cut for g in groups], bool), np.concatenate([xy for xy, _ in made]),
                   *_offsets(lengths, rings_per))


def _finder(parent: list[int]) -> Any:
    """``find`` of a union-find over ``parent`` (with path halving)."""

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    return find


def _compact(group: _Group) -> None:
    """An open region's outer rings so far unioned into one, the holes that union closed moved to its hole arrays.

    Why at every band rather than once at the end: a piece's outer ring takes in every hole that touches its band's
    borders, so a scene-spanning region of a noisy map held that many rings' worth of outlines (as shapely
    polygons) until its last band, growing with the scene. Unioned band by band, what stays a polygon is the
    outline of the region so far: its edge along the scene's sides and along the open border; whatever the union
    has closed is a hole for good (pieces still to come lie below the open border and cannot reach into it), so
    it joins the other holes as numbers. The same rings as one union at the end: unions of unions."""
    import shapely

    if len(group.shells) == 1:
        return
    geom = _union(group.shells)
    group.shells = [shapely.Polygon(_corners(geom.exterior))]
    closed = [_corners(r) for r in geom.interiors]
    if closed:
        group.holes.append((np.concatenate(closed).astype(np.int32), np.asarray([len(c) for c in closed], np.int32)))


def _union(shells: list) -> Any:
    """The union of one region's outer rings (as polygons), exact on the integer grid: one polygon."""
    import shapely

    geom = shapely.coverage_union_all(_noded(shells))
    if geom.geom_type != "Polygon":
        raise RuntimeError(f"class region merged into a {geom.geom_type}, not one polygon")
    return geom


def _finish(group: _Group) -> tuple[np.ndarray, np.ndarray]:
    """One region's pieces as one polygon's rings (int32 coordinates and ring lengths, outer ring first): their
    outer rings unioned exactly on the integer grid (straight-edge vertices dropped), then the pieces' holes put
    back as they are.

    Why the holes are left out of the union: a hole of a piece never touches its band's borders (see the module
    docstring), so no other piece reaches into it and the union leaves it exactly as it was; the union's own
    holes are the ones closed across a border. Taking the holes out makes the union's work the outlines only:
    a noisy class map's scene-spanning region has 10^5 holes, which took the union 20x longer to carry through
    than the outlines alone."""
    import shapely

    if len(group.shells) == 1:  # as GDAL traced it: corners only
        outer = [shapely.get_coordinates(group.shells[0])]
    else:
        geom = _union(group.shells)
        outer = [_corners(geom.exterior), *(_corners(r) for r in geom.interiors)]
    xy = np.concatenate([*(o.astype(np.int32) for o in outer), *(h for h, _ in group.holes)])
    lengths = np.concatenate([np.asarray([len(o) for o in outer], np.int64), *(n for _, n in group.holes)])
    group.holes.clear()  # the region's one copy from here on is the one returned
    return xy, lengths


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
                      ("pixels", pa.int64()), ("cut", pa.bool_()), ("geometry", pa.binary()), ("bbox", box)])


def _concat(parts: list[Regions]) -> Regions:
    """Several batches of regions as one."""
    if len(parts) == 1:
        return parts[0]
    ring_ends = np.cumsum([len(p.xy) for p in parts])[:-1]
    poly_ends = np.cumsum([len(p.ring_offsets) - 1 for p in parts])[:-1]
    return Regions(np.concatenate([p.classes for p in parts]), np.concatenate([p.pixels for p in parts]),
                   np.concatenate([p.cut for p in parts]), np.concatenate([p.xy for p in parts]),
                   np.concatenate([parts[0].ring_offsets, *(p.ring_offsets[1:] + e
                                                            for p, e in zip(parts[1:], ring_ends, strict=True))]),
                   np.concatenate([parts[0].poly_offsets, *(p.poly_offsets[1:] + e
                                                            for p, e in zip(parts[1:], poly_ends, strict=True))]))


def wkb_polygons(xy: np.ndarray, ring_offsets: np.ndarray, poly_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of a ragged array (float64 ``xy``) as little-endian 2-D WKB: the bytes of all of them and each
    one's byte offsets, as a binary Arrow array holds them.

    Why not shapely's ``to_wkb``: that needs a GEOS polygon first, about 24 bytes a vertex and 250 a ring beside the
    arrays the regions already are; a scene-spanning region of a noisy map has millions of holes. Here the
    coordinates' bytes are the WKB's, with each ring's header (its point count, and before a polygon's first ring
    the byte order, type 3 and ring count) inserted in front of it: the same bytes shapely writes (tested)."""
    n_rings = len(ring_offsets) - 1
    rings_per = np.diff(poly_offsets)
    first = np.zeros(n_rings, bool)
    first[poly_offsets[:-1][rings_per > 0]] = True
    head = np.where(first, 13, 4)  # [order, type, rings] + [points] before a polygon's first ring, else [points]
    at = np.concatenate([[0], np.cumsum(head)[:-1]])
    header = np.empty(int(head.sum()), np.uint8)

    def put(pos: np.ndarray, values: np.ndarray) -> None:
        header[pos[:, None] + np.arange(4)] = values.astype("<u4").view(np.uint8).reshape(-1, 4)

    put(at + np.where(first, 9, 0), np.diff(ring_offsets))
    starts = at[first]
    header[starts] = 1  # little endian
    put(starts + 1, np.full(len(starts), 3))  # wkbPolygon
    put(starts + 5, rings_per[rings_per > 0])
    data = np.insert(np.ascontiguousarray(xy, "<f8").view(np.uint8).ravel(), np.repeat(16 * ring_offsets[:-1], head),
                     header)
    points_per = np.diff(ring_offsets[poly_offsets])
    offsets = np.concatenate([[0], np.cumsum(9 + 4 * rings_per + 16 * points_per)])
    return data, offsets


def record_batches(batches: Iterable[Regions], grid: Any, class_names: list[str]) -> Iterator[Any]:
    """Finished regions in CRS coordinates (the grid's affine applied) as record batches of at least ``BATCH``
    rows where there are that many (the writer cuts row groups of ``BATCH``), a batch as large as one band's
    pieces kept whole."""
    pending: list[Regions] = []
    count = 0
    for b in batches:
        if pending and count + len(b.classes) > BATCH:
            yield _record_batch(_concat(pending), grid, class_names)
            pending, count = [], 0
        pending.append(b)
        count += len(b.classes)
        if count >= BATCH:
            yield _record_batch(_concat(pending), grid, class_names)
            pending, count = [], 0
    if pending:
        yield _record_batch(_concat(pending), grid, class_names)


def _record_batch(regions: Regions, grid: Any, class_names: list[str]) -> Any:
    import pyarrow as pa

    t = grid.transform
    x, y = regions.xy[:, 0].astype(np.float64), regions.xy[:, 1].astype(np.float64)
    world = np.empty((len(x), 2))
    world[:, 0] = t.a * x + t.b * y + t.c
    world[:, 1] = t.d * x + t.e * y + t.f
    del x, y
    data, offsets = wkb_polygons(world, regions.ring_offsets, regions.poly_offsets)
    if offsets[-1] >= 2**31:
        raise RuntimeError(f"class polygons: {offsets[-1]} bytes of WKB in one batch, more than a Parquet column "
                           "chunk holds")
    starts = regions.ring_offsets[regions.poly_offsets[:-1]]  # a polygon's vertices run from its outer ring's start
    box = [np.minimum.reduceat(world[:, 0], starts), np.minimum.reduceat(world[:, 1], starts),
           np.maximum.reduceat(world[:, 0], starts), np.maximum.reduceat(world[:, 1], starts)]
    del world
    n = len(regions.classes)
    geometry = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)),
                                                      pa.py_buffer(data)])
    pixel_area = abs(t.a * t.e - t.b * t.d)
    names = [class_names[c] if c < len(class_names) else str(c) for c in regions.classes.tolist()]
    return pa.record_batch([
        pa.array(regions.classes, pa.int32()), pa.array(names, pa.string()),
        pa.array(regions.pixels * pixel_area, pa.float64()), pa.array(regions.pixels, pa.int64()),
        pa.array(regions.cut, pa.bool_()), geometry,
        pa.StructArray.from_arrays([pa.array(c) for c in box], names=["xmin", "ymin", "xmax", "ymax"])],
        schema=_schema(grid))


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
    with pq.ParquetWriter(dest, schema, compression="zstd", write_statistics=STATISTICS) as writer:
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
