"""The change product between two periods: transition codes, transition matrices in pixels and area.

Each period of a periodic run leaves a result store (``period=YYYY-MM/result.zarr``). Comparing two of them
gives, per pixel, the transition code ``from * n + to`` (n classes; no data where either period has none) and,
per pair of classes, how many pixels and how much ground went from one to the other.

Why it is built the way it is:

* Everything is checked before anything is written: two periods on different grids or with other classes
  cannot be compared pixel by pixel, and a half-written product over a good one helps nobody.
* One Dask task per tile reads only that tile's chunks of both periods, writes the tile's codes and returns
  its counts; the totals are sums of integer tile counts, so they do not depend on the tile size. Tiles
  write whole chunks of ``change.zarr`` (the tile size is a multiple of the chunk), so no two tasks share one.
* Area comes from the grid, not from a nominal resolution: a projected pixel has one area everywhere, but a
  degree cell shrinks towards the poles, so geographic grids weigh each row by its own geodesic cell area.
* ``change.json`` is written last and records the inputs (each store's fingerprint and completion marks): a
  rerun finding it with the same inputs returns it and recomputes nothing. There is no per-tile resume:
  the whole product costs one read of two uint8 maps, less than keeping tile counts would.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import zarr
from affine import Affine
from distributed import Client
from rasterio.crs import CRS

from segpipe import progress
from segpipe.errors import InputError
from segpipe.geometry import SceneGeometry
from segpipe.io.layout import RESULT_STORE, result_path
from segpipe.io.result import NODATA, SEGMENT_STAGE
from segpipe.io.store import (
    Marks,
    consolidate,
    ensure_array,
    open_or_create,
    remove_store,
    store_changes,
    write_atomic,
)
from segpipe.tiling.grid import TileTask

CHANGE_STORE = "change.zarr"
FILES = {"zarr": CHANGE_STORE, "cog": "transitions.tif", "csv": "transitions.csv",
         "area_csv": "transitions_area.csv", "markdown": "change.md", "json": "change.json"}
UNCHANGED_COLOUR = (210, 210, 210)  # transitions.tif: unchanged pixels grey, changes in the new class's colour
COORDS = ("spatial_ref", "x", "y")  # coordinate arrays copied from the periods' store, so rioxarray reads the grid


@dataclass(frozen=True)
class Period:
    """One period's result store as read before anything is computed: its grid, classes and completion state."""

    path: str
    label: str
    grid: SceneGeometry
    chunks: tuple[int, int]
    class_names: list[str]
    state: dict[str, Any]  # what a rerun compares: the store's fingerprint and its completion marks

    shape = property(lambda self: self.grid.shape)
    crs = property(lambda self: self.grid.crs)
    transform = property(lambda self: self.grid.transform)


@dataclass(frozen=True)
class PixelArea:
    """How pixel counts become square metres: one area per pixel (projected CRS), one per row (geographic
    CRS, cells shrink with latitude) or none (a grid placed in pixels only)."""

    method: str  # "projected", "geodesic" or "pixels"
    pixel_m2: float | None = None
    row_m2: np.ndarray | None = field(default=None, compare=False)

    def rows(self, row0: int, row1: int) -> np.ndarray | None:
        """The cell areas of rows ``row0:row1`` a tile task weighs its counts by (geodesic grids only)."""
        return None if self.row_m2 is None else self.row_m2[row0:row1]


@dataclass
class TileChange:
    """One tile's counts: the transition matrix, pixels valid in one period only, and (geodesic) their areas."""

    index: tuple[int, ...]
    pixels: np.ndarray  # (n, n) int64, rows = before class, columns = after class
    only: np.ndarray  # (2,) int64: valid only before, valid only after
    area_m2: np.ndarray | None = None  # (n, n) float64, geodesic grids only
    only_m2: np.ndarray | None = None  # (2,) float64


@dataclass
class ChangeReport:
    """The change between two periods: matrices, totals, the grid and where the files are."""

    before: str
    after: str
    class_names: list[str]
    pixels: np.ndarray  # (n, n) int64, rows = before class, columns = after class
    only_before: int  # pixels valid before only (no data after)
    only_after: int
    area_m2: np.ndarray | None  # (n, n) float64; None for a grid placed in pixels only
    only_before_m2: float | None
    only_after_m2: float | None
    grid: dict[str, Any]
    inputs: dict[str, Any]
    files: dict[str, Path]
    resumed: bool = False  # True when change.json already recorded these inputs and nothing was recomputed

    @property
    def legend(self) -> dict[int, str]:
        return legend(self.class_names)

    @property
    def valid_pixels(self) -> int:
        """Pixels valid in both periods: the ones the matrix counts."""
        return int(self.pixels.sum())

    @property
    def changed_pixels(self) -> int:
        return self.valid_pixels - int(np.trace(self.pixels))

    @property
    def changed_fraction(self) -> float | None:
        """Share of the pixels valid in both periods whose class changed (None when no pixel is valid in both)."""
        return self.changed_pixels / self.valid_pixels if self.valid_pixels else None

    def describe(self) -> str:
        """One line for logs: how much changed."""
        frac = self.changed_fraction
        return (f"{self.changed_pixels} of {self.valid_pixels} pixels valid in both periods changed class"
                + ("" if frac is None else f" ({100 * frac:.2f} %)"))

    def table(self) -> list[dict[str, Any]]:
        """One row per from/to pair with pixels (and hectares): a Prefect table artifact, a DataFrame."""
        rows = []
        for i, a in enumerate(self.class_names):
            for j, b in enumerate(self.class_names):
                row: dict[str, Any] = {"from": a, "to": b, "pixels": int(self.pixels[i, j])}
                if self.area_m2 is not None:
                    row["hectares"] = float(self.area_m2[i, j] / 1e4)
                rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """Everything change.json holds."""
        names = self.class_names
        area = None
        if self.area_m2 is not None:
            m2 = self.area_m2
            area = {"unit": "m2", "method": self.grid["area_method"], "m2": m2.tolist(),
                    "hectares": (m2 / 1e4).tolist(),
                    "totals_m2": _totals(m2, self.only_before_m2, self.only_after_m2, names)}
        return {
            "before": {"label": self.before, "path": self.inputs["before"]["path"]},
            "after": {"label": self.after, "path": self.inputs["after"]["path"]},
            "class_names": names,
            "legend": {str(k): v for k, v in self.legend.items()},
            "nodata": transition_nodata(len(names)),
            "pixels": self.pixels.tolist(),
            "totals_pixels": _totals(self.pixels, self.only_before, self.only_after, names),
            "changed_fraction": self.changed_fraction,
            "area": area,
            "grid": self.grid,
            "files": {k: p.name for k, p in self.files.items()},
            "inputs": self.inputs,
        }

    @classmethod
    def from_summary(cls, data: dict[str, Any], dest: Path, resumed: bool = True) -> ChangeReport:
        """The report a finished product's change.json describes (inverse of :meth:`summary`)."""
        area = data.get("area")
        tp, ta = data["totals_pixels"], (area or {}).get("totals_m2") or {}
        return cls(data["before"]["label"], data["after"]["label"], list(data["class_names"]),
                   np.asarray(data["pixels"], dtype=np.int64).reshape(len(data["class_names"]), -1),
                   int(tp["only_before"]), int(tp["only_after"]),
                   None if area is None else np.asarray(area["m2"], dtype=np.float64),
                   ta.get("only_before"), ta.get("only_after"), data["grid"], data["inputs"],
                   {k: dest / name for k, name in data["files"].items()}, resumed)


def _totals(matrix: np.ndarray, only_before: Any, only_after: Any, names: list[str]) -> dict[str, Any]:
    """Totals of one matrix (pixels or m²): valid in both, unchanged, changed, per class before/after/net."""
    cast = int if np.issubdtype(matrix.dtype, np.integer) else float
    before, after = matrix.sum(axis=1), matrix.sum(axis=0)
    return {"valid_in_both": cast(matrix.sum()), "unchanged": cast(np.trace(matrix)),
            "changed": cast(matrix.sum() - np.trace(matrix)), "only_before": only_before, "only_after": only_after,
            "per_class": {n: {"before": cast(before[k]), "after": cast(after[k]), "net": cast(after[k] - before[k])}
                          for k, n in enumerate(names)}}


def legend(class_names: list[str]) -> dict[int, str]:
    """``{code: "from->to"}`` for every pair of classes, code ``from * n + to``."""
    n = len(class_names)
    return {i * n + j: f"{a}->{b}" for i, a in enumerate(class_names) for j, b in enumerate(class_names)}


def transition_dtype(n_classes: int) -> np.dtype:
    """uint8 while every code and the no-data value fit (n² <= 255), else uint16."""
    return np.dtype(np.uint8 if n_classes * n_classes <= NODATA else np.uint16)


def transition_nodata(n_classes: int) -> int:
    """255 for uint8 codes, 65535 for uint16: the largest value, never a code."""
    return int(np.iinfo(transition_dtype(n_classes)).max)


def transition_codes(before: np.ndarray, after: np.ndarray, n_classes: int) -> np.ndarray:
    """``before * n + after`` where both are a class (0..n-1), the no-data value elsewhere."""
    both = (before < n_classes) & (after < n_classes)
    dtype = transition_dtype(n_classes)
    codes = before.astype(dtype) * dtype.type(n_classes) + after.astype(dtype)
    return np.where(both, codes, dtype.type(transition_nodata(n_classes))).astype(dtype)


def label_of(path: str) -> str:
    """``2024-05`` for ``.../period=2024-05/result.zarr``; otherwise the folder holding the store, or its name."""
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    name = parts[-2] if len(parts) > 1 and parts[-1] == RESULT_STORE else parts[-1]
    return name.split("=", 1)[1] if "=" in name else name


def pixel_area(grid: SceneGeometry) -> PixelArea:
    """Area of the grid's pixels in m²: |det| of the transform times the CRS's linear unit squared for a
    projected CRS; per row, as the geodesic area of one cell on the CRS's ellipsoid, for a geographic one."""
    crs, transform, height = grid.crs, grid.transform, grid.shape[0]
    if crs is None:
        return PixelArea("pixels")
    proj = pyproj.CRS.from_user_input(crs.to_wkt())
    horizontal = proj.sub_crs_list[0] if proj.is_compound else proj
    if horizontal.is_geographic:
        if transform.b or transform.d:
            raise InputError("the periods' geographic grid is rotated: per-row cell areas need a north-up transform")
        return PixelArea("geodesic", row_m2=_row_areas(horizontal.get_geod(), transform, height))
    if not horizontal.axis_info:
        return PixelArea("pixels")
    unit = horizontal.axis_info[0].unit_conversion_factor
    return PixelArea("projected", pixel_m2=abs(transform.a * transform.e - transform.b * transform.d) * unit * unit)


def _row_areas(geod: pyproj.Geod, transform: Affine, height: int) -> np.ndarray:
    """Geodesic area (m²) of one cell of each row of a north-up grid in degrees: cells of a row are alike."""
    lon0, lon1 = transform.c, transform.c + transform.a
    out = np.empty(height, dtype=np.float64)
    for r in range(height):
        lat0, lat1 = transform.f + transform.e * r, transform.f + transform.e * (r + 1)
        area, _ = geod.polygon_area_perimeter([lon0, lon1, lon1, lon0], [lat0, lat0, lat1, lat1])
        out[r] = abs(area)
    return out


def read_period(path: str | Path, label: str | None = None) -> Period:
    """A period's result store, checked to hold a 2-D ``class`` map with class names; nothing is written."""
    path = _store_path(str(path))
    label = label or label_of(path)
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001 - whatever the reason, it is not a result store we can read
        raise InputError(f"period {label}: no result store at {path}") from None
    if "class" not in group:
        raise InputError(f"period {label}: {path} has no 'class' array; is it a segpipe result.zarr?")
    arr = group["class"]
    if arr.ndim != 2:
        raise InputError(f"period {label}: the change product compares 2-D class maps, {path} holds {arr.ndim}-D")
    attrs = dict(group.attrs)
    names = list(attrs.get("class_names") or [])
    if not names:
        raise InputError(f"period {label}: {path} records no class_names")
    grid = SceneGeometry.of_attrs(tuple(int(n) for n in arr.shape), attrs)
    return Period(path, label, grid, tuple(int(n) for n in arr.chunks), names, _state(path, group))


def _store_path(path: str) -> str:
    """A period's folder (``period=2024-05``) stands for the result.zarr inside it."""
    p = Path(path)
    if "://" not in path and p.is_dir() and not (p / "zarr.json").exists() and (p / RESULT_STORE).is_dir():
        return result_path(path)
    return path


def _state(path: str, group: zarr.Group) -> dict[str, Any]:
    """What says the store is the one the product was made from: its fingerprint and which tiles are done.

    A period rerun with other settings gets another fingerprint; one resumed or extended gets other marks.
    """
    marks = sorted(Marks(path, SEGMENT_STAGE).keys())
    return {"path": path, "fingerprint": group.attrs.get("segpipe_fingerprint"), "segment_tiles": len(marks),
            "marks_sha256": hashlib.sha256("\n".join(marks).encode()).hexdigest(),
            "finished": group.metadata.consolidated_metadata is not None}


def check_pair(before: Period, after: Period, tile_size: int) -> None:
    """Refuse two periods that cannot be compared pixel by pixel, naming what differs (one line)."""
    grid = _grid_differences(before, after)
    if grid:
        raise InputError(f"periods {before.label} and {after.label} lie on different grids ({'; '.join(grid)}); "
                         "fix crs/resolution/bounds in the job so every period shares one grid")
    if before.class_names != after.class_names:
        raise InputError(f"periods {before.label} and {after.label} have different classes ({before.class_names} vs "
                         f"{after.class_names}); segment every period with the same method and class_names")
    bad = [c for c in before.chunks if tile_size < 1 or tile_size % c]
    if bad:
        raise InputError(f"tile_size {tile_size} must be a multiple of the class map's chunk {bad[0]} so that every "
                         "tile writes whole chunks of change.zarr")


def _grid_differences(a: Period, b: Period) -> list[str]:
    """What differs between two periods' grids: size, CRS, resolution, origin, rotation."""
    out = []
    if a.shape != b.shape:
        out.append(f"size {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]} px")
    if (a.crs is None) != (b.crs is None) or (a.crs is not None and a.crs != b.crs):
        out.append(f"crs {_crs_name(a.crs)} vs {_crs_name(b.crs)}")
    ta, tb = a.transform, b.transform
    tol = 1e-6 * min(abs(ta.a) or 1.0, abs(ta.e) or 1.0)  # a millionth of a pixel: the same grid, rounding aside

    def differ(*attrs: str) -> bool:
        return any(abs(getattr(ta, k) - getattr(tb, k)) > tol for k in attrs)

    if differ("a", "e"):
        out.append(f"resolution {abs(ta.a):g}x{abs(ta.e):g} vs {abs(tb.a):g}x{abs(tb.e):g}")
    if differ("c", "f"):
        out.append(f"origin ({ta.c:.10g}, {ta.f:.10g}) vs ({tb.c:.10g}, {tb.f:.10g})")
    if differ("b", "d"):
        out.append(f"rotation ({ta.b:g}, {ta.d:g}) vs ({tb.b:g}, {tb.d:g})")
    return out


def _crs_name(crs: CRS | None) -> str:
    return "none" if crs is None else crs.to_string()


def tile_change(task: TileTask, before: str, after: str, n_classes: int,
                row_m2: np.ndarray | None = None) -> TileChange:
    """Codes of one tile written to change.zarr (``task.result``) and the tile's counts (and geodesic areas).

    Reads only this tile's window of both class maps. ``row_m2``: the cell area of each of the tile's rows,
    for geographic grids; the areas of projected grids are exact multiples of the counts, made on the client.
    """
    core = task.core
    b = np.asarray(zarr.open_array(before, path="class", mode="r")[core.slices])
    a = np.asarray(zarr.open_array(after, path="class", mode="r")[core.slices])
    codes = transition_codes(b, a, n_classes)
    zarr.open_array(task.result, path="transition", mode="r+")[core.slices] = codes
    vb, va = b < n_classes, a < n_classes
    both = vb & va
    only = [vb & ~va, va & ~vb]
    pixels, area = counts_and_areas(codes, both, n_classes * n_classes, row_m2)
    out = TileChange(tuple(task.index), pixels.reshape(n_classes, n_classes),
                     np.array([int(m.sum()) for m in only], np.int64))
    if area is not None:
        out.area_m2 = area.reshape(n_classes, n_classes)
        weights = np.broadcast_to(np.asarray(row_m2, np.float64)[:, None], b.shape)
        out.only_m2 = np.array([float(weights[m].sum()) for m in only])
    return out


def counts_and_areas(values: np.ndarray, where: np.ndarray, n_bins: int,
                     row_m2: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixel counts of each value ``0..n_bins-1`` over the ``where`` pixels of a tile and, on a geographic grid
    (``row_m2``: the cell area of each of the tile's rows), their areas in m² (else None: exact from counts)."""
    counts = np.bincount(values[where], minlength=n_bins).astype(np.int64)
    if row_m2 is None:
        return counts, None
    weights = np.broadcast_to(np.asarray(row_m2, np.float64)[:, None], values.shape)
    return counts, np.bincount(values[where], weights=weights[where], minlength=n_bins)


def change_product(before: str | Path, after: str | Path, dest: str | Path, client: Client, tile_size: int = 512,
                   before_label: str | None = None, after_label: str | None = None) -> ChangeReport:
    """The change from period ``before`` to period ``after`` (result.zarr paths or URLs, or period folders),
    computed tile by tile on ``client`` and written into ``dest``.

    Writes ``change.zarr`` (array ``transition``: code ``from * n + to``, uint8 or uint16 for 16 classes and
    more, nodata 255 / 65535), ``transitions.tif`` (its COG), ``transitions.csv`` (pixels, rows = from class,
    columns = to class), ``transitions_area.csv`` (hectares; not for grids in pixels only), ``change.md`` and
    ``change.json`` (all of it). Labels default to the period folders' names (``period=2024-05`` -> ``2024-05``).
    Raises :class:`InputError` before anything is written when the periods differ in grid or classes. A rerun
    whose change.json records the same inputs returns that report (``resumed``) and recomputes nothing.
    """
    pb, pa = read_period(before, before_label), read_period(after, after_label)
    check_pair(pb, pa, tile_size)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InputError(f"change product destination exists and is not a folder: {dest}")
    area = pixel_area(pb.grid)
    inputs = json.loads(json.dumps({"before": pb.state, "after": pa.state, "labels": [pb.label, pa.label]},
                                   default=str))
    done = _finished(dest, inputs)
    if done is not None:
        progress.say(f"change {pb.label} -> {pa.label}: already made from these periods, nothing recomputed")
        return done
    (dest / FILES["json"]).unlink(missing_ok=True)  # change.json is the product's commit: gone until it is redone
    store = _create_store(dest / CHANGE_STORE, pb, pa, inputs)
    tiles = _run_tiles(client, store, pb, pa, tile_size, area)
    report = _report(tiles, pb, pa, area, inputs, dest)
    _write_outputs(report, store)
    return report


def _finished(dest: Path, inputs: dict[str, Any]) -> ChangeReport | None:
    """The product already in ``dest`` when its change.json records exactly these inputs and its files exist."""
    path = dest / FILES["json"]
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("inputs") != inputs:
        return None
    report = ChangeReport.from_summary(data, dest)
    return report if all(p.exists() for p in report.files.values()) else None


def _create_store(path: Path, before: Period, after: Period, inputs: dict[str, Any]) -> str:
    """change.zarr for these inputs: resumed when made from them, replaced when made from other periods' runs
    (it is derived data, and its inputs changed), refused when it is not a segpipe store."""
    p = str(path)
    if store_changes(p, inputs, "change store"):
        remove_store(p)
    group = open_or_create(p, inputs, "change store")
    n, codes = len(before.class_names), legend(before.class_names)
    nodata = transition_nodata(n)
    group.update_attributes({**before.grid.attrs(), "product": "change",
                        "class_names": before.class_names, "legend": {str(k): v for k, v in codes.items()},
                        "before": before.label, "after": after.label, "nodata": nodata})
    _copy_coords(zarr.open_group(before.path, mode="r"), group)
    attrs = {"nodata": nodata, "long_name": "transition code from * n + to", "flag_values": list(codes),
             "flag_meanings": " ".join(v.replace(" ", "_") for v in codes.values())}
    if "spatial_ref" in group:
        attrs.update(grid_mapping="spatial_ref", coordinates="spatial_ref")
    ensure_array(group, "transition", before.shape, before.chunks, transition_dtype(n), nodata, ("y", "x"), attrs)
    return p


def _copy_coords(src: zarr.Group, dst: zarr.Group) -> None:
    """The periods' coordinate arrays (x, y, spatial_ref), so xarray and rioxarray place change.zarr as they
    place result.zarr (the grids were checked to be the same)."""
    for name in COORDS:
        if name in src and name not in dst:
            a = src[name]
            b = dst.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.chunks, fill_value=a.fill_value,
                                 dimension_names=a.metadata.dimension_names)
            b[...] = a[...]
            b.update_attributes(dict(a.attrs))


def _run_tiles(client: Client, store: str, before: Period, after: Period, tile_size: int,
               area: PixelArea) -> list[TileChange]:
    """One task per tile on the cluster; the tiles' counts in grid order (so sums do not depend on timing)."""
    n = len(before.class_names)
    tasks = TileTask.each(before.shape, tile_size, result=store)
    futures = [client.submit(tile_change, t, before.path, after.path, n, area.rows(t.core.row0, t.core.row1),
                             pure=False) for t in tasks]
    return progress.counted(client, "change", futures)


def _report(tiles: list[TileChange], before: Period, after: Period, area: PixelArea, inputs: dict[str, Any],
            dest: Path) -> ChangeReport:
    """Sum the tiles' counts (in grid order) into the report; areas from counts (projected) or tile sums."""
    n = len(before.class_names)
    pixels = np.zeros((n, n), np.int64)
    only = np.zeros(2, np.int64)
    for t in tiles:
        pixels += t.pixels
        only += t.only
    area_m2, only_m2 = None, None
    if area.method == "projected":
        area_m2, only_m2 = pixels * area.pixel_m2, only * area.pixel_m2
    elif area.method == "geodesic":
        area_m2 = np.sum([t.area_m2 for t in tiles], axis=0) if tiles else np.zeros((n, n))
        only_m2 = np.sum([t.only_m2 for t in tiles], axis=0) if tiles else np.zeros(2)
    grid = {"shape": list(before.shape), "chunks": list(before.chunks), "crs": _crs_name(before.crs),
            "crs_wkt": before.crs.to_wkt() if before.crs is not None else None,
            "transform": [before.transform.a, before.transform.b, before.transform.c, before.transform.d,
                          before.transform.e, before.transform.f],
            "area_method": area.method, "pixel_m2": area.pixel_m2}
    files = {k: dest / name for k, name in FILES.items() if k != "area_csv" or area_m2 is not None}
    return ChangeReport(before.label, after.label, before.class_names, pixels, int(only[0]), int(only[1]), area_m2,
                        None if only_m2 is None else float(only_m2[0]), None if only_m2 is None else float(only_m2[1]),
                        grid, inputs, files)


def _write_outputs(report: ChangeReport, store: str) -> None:
    """The COG, the CSVs and the Markdown, each renamed into place, then change.json, the product's commit."""
    from segpipe.io.cog import PALETTE, export_cog

    consolidate(store)
    n = len(report.class_names)
    colours = None
    if transition_dtype(n) == np.uint8:
        colours = [UNCHANGED_COLOUR if i == j else PALETTE[j % len(PALETTE)] for i in range(n) for j in range(n)]
    export_cog(store, report.files["cog"], array="transition", names=list(report.legend.values()),
               nodata=transition_nodata(n), colors=colours)
    write_atomic(report.files["csv"], matrix_csv(report.pixels, report.class_names, "pixels"))
    if report.area_m2 is not None:
        write_atomic(report.files["area_csv"], matrix_csv(report.area_m2 / 1e4, report.class_names, "ha"))
    write_atomic(report.files["markdown"], format_markdown(report))
    write_atomic(report.files["json"], json.dumps(report.summary(), indent=2))


def matrix_csv(matrix: np.ndarray, class_names: list[str], unit: str) -> str:
    """The matrix as CSV: a header ``from\\to [unit]`` then the classes; one row per from class."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f"from\\to [{unit}]", *class_names])
    for name, row in zip(class_names, matrix, strict=True):
        writer.writerow([name, *(int(v) if np.issubdtype(matrix.dtype, np.integer) else f"{v:.10g}" for v in row)])
    return buf.getvalue()


def format_markdown(report: ChangeReport) -> str:
    """A Markdown snippet for a run's notes or a pull request: the matrix (hectares, else pixels) and totals."""
    hectares = report.area_m2 is not None
    matrix = report.area_m2 / 1e4 if hectares else report.pixels
    unit = "ha" if hectares else "pixels"
    names = report.class_names
    lines = [f"### Land-cover change {report.before} -> {report.after}", "",
             f"| from \\ to [{unit}] | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, matrix, strict=True):
        lines.append(f"| {name} | " + " | ".join(_number(v) for v in row) + " |")
    frac = report.changed_fraction
    lines += ["", f"- changed: {report.changed_pixels} of {report.valid_pixels} pixels valid in both periods"
              + ("" if frac is None else f" ({100 * frac:.2f} %)"),
              f"- valid in {report.before} only: {report.only_before} pixels; in {report.after} only: "
              f"{report.only_after} pixels"]
    return "\n".join(lines) + "\n"


def _number(v: Any) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{float(v):.4f}"

