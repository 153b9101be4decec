"""Per-tile and global metric tables: CSV, JSON and GeoJSON of tile footprints.

Every file is written to a temporary name and renamed into place, so a failure never leaves a
half-written report over a good one. GeoJSON is RFC 7946 (WGS 84); each footprint also carries
its bounds in the scene CRS.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import array_bounds
from rasterio.warp import transform_geom

from segpipe.grid import Index, TileGrid
from segpipe.io.store import write_atomic
from segpipe.metrics import scores


@dataclass
class MetricsReport:
    """Per-tile rows and the global summary derived from summed confusion matrices."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    footprints: list[dict[str, Any]]


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def _image_row(grid: TileGrid, index: Index, transform: Affine, crs: CRS | None) -> tuple[dict, dict]:
    """Position columns of one image tile, and its footprint feature (WGS 84 where georeferenced)."""
    r, c = index
    core = grid.tile(index).core
    west, south, east, north = array_bounds(core.height, core.width, grid.tile(index).transform(transform))
    row = {"tile": f"{r}_{c}", "row": r, "col": c, "row0": core.row0, "col0": core.col0,
           "height": core.height, "width": core.width}
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    geom = {"type": "Polygon", "coordinates": [ring]}
    if crs is not None:  # RFC 7946 wants WGS 84; slides stay in micrometres
        geom = transform_geom(crs, "EPSG:4326", geom)
    return row, {"type": "Feature", "geometry": geom, "properties": {"bounds_scene_crs": [west, south, east, north]}}


def _volume_row(grid: TileGrid, index: Index, affine: np.ndarray) -> dict:
    """Position columns of one volume block, with its bounding box in RAS+ millimetres."""
    core = grid.tile(index).core
    corners = np.array([[x, y, z, 1.0] for z in (core.start[0], core.stop[0]) for y in (core.start[1], core.stop[1])
                        for x in (core.start[2], core.stop[2])]) - [0.5, 0.5, 0.5, 0]  # voxel edges, not centres
    world = (affine @ corners.T)[:3]
    return {"block": "_".join(map(str, index)), "z": index[0], "row": index[1], "col": index[2],
            "z0": core.start[0], "row0": core.start[1], "col0": core.start[2],
            "depth": core.shape[0], "height": core.shape[1], "width": core.shape[2],
            "ras_min_mm": [round(float(v), 3) for v in world.min(axis=1)],
            "ras_max_mm": [round(float(v), 3) for v in world.max(axis=1)]}


def build_report(confusions: dict[Index, np.ndarray], grid: TileGrid, crs: CRS | None, transform: Affine,
                 class_names: list[str], affine: list[list[float]] | None = None) -> MetricsReport:
    """Rows per tile (per block for volumes, when ``affine`` is given) and the global summary."""
    rows, feats = [], []
    total = None
    unit = "voxels" if affine is not None else "pixels"
    for index, cm in sorted(confusions.items()):
        total = cm.copy() if total is None else total + cm
        s = scores(cm)
        if affine is not None:
            row, feat = _volume_row(grid, index, np.asarray(affine)), None
        else:
            row, feat = _image_row(grid, index, transform, crs)
        row.update({unit: s.pixels, "accuracy": _clean(s.accuracy), "mean_iou": _clean(s.mean_iou)})
        for k, name in enumerate(class_names):
            row[f"iou_{name}"] = _clean(s.iou[k])
            row[f"dice_{name}"] = _clean(s.dice[k])
        rows.append(row)
        if feat is not None:
            feat["properties"] = {**row, **feat["properties"]}
            feats.append(feat)
    g = scores(total) if total is not None else None
    summary = {
        "classes": class_names,
        "tiles": len(rows),
        "unit": unit,
        "pixels": g.pixels if g else 0,
        "global_accuracy": _clean(g.accuracy) if g else None,
        "global_mean_iou": _clean(g.mean_iou) if g else None,
        "global_iou": {n: _clean(g.iou[k]) for k, n in enumerate(class_names)} if g else {},
        "global_dice": {n: _clean(g.dice[k]) for k, n in enumerate(class_names)} if g else {},
        "confusion_matrix": total.tolist() if total is not None else [],
        "crs": crs.to_string() if crs is not None else None,
    }
    return MetricsReport(rows, summary, feats)


def write_report(report: MetricsReport, folder: str | Path) -> dict[str, Path]:
    """Write ``tiles.csv``, ``summary.json`` and (images only) ``tiles.geojson`` into ``folder``."""
    folder = Path(folder)
    buf = io.StringIO()
    if report.rows:
        writer = csv.DictWriter(buf, fieldnames=list(report.rows[0]))
        writer.writeheader()
        writer.writerows(report.rows)
    paths = {"csv": folder / "tiles.csv", "json": folder / "summary.json"}
    write_atomic(paths["csv"], buf.getvalue())
    write_atomic(paths["json"], json.dumps({"summary": report.summary, "tiles": report.rows}, indent=2))
    if report.footprints:
        paths["geojson"] = folder / "tiles.geojson"
        write_atomic(paths["geojson"], json.dumps({"type": "FeatureCollection", "features": report.footprints}))
    return paths


def format_summary(report: MetricsReport) -> str:
    """Human-readable global and per-tile IoU for the terminal."""
    s = report.summary
    names = s["classes"]
    unit = s.get("unit", "pixels")
    volume = unit == "voxels"
    lines = [f"global accuracy {s['global_accuracy']}, mean IoU {s['global_mean_iou']} over {s['pixels']} {unit}"]
    lines.append("global IoU: " + ", ".join(f"{n}={s['global_iou'][n]}" for n in names))
    if volume:
        lines.append("global Dice: " + ", ".join(f"{n}={s['global_dice'][n]}" for n in names))
    score = "dice" if volume else "iou"
    key = "block" if volume else "tile"
    header = f"{key:>8} {unit:>9} " + " ".join(f"{score.capitalize() + ' ' + n:>16}" for n in names)
    lines.append(header)
    for row in report.rows:
        vals = " ".join(f"{'-' if row[f'{score}_{n}'] is None else format(row[f'{score}_{n}'], '.4f'):>16}"
                        for n in names)
        lines.append(f"{row[key]:>8} {row[unit]:>9} {vals}")
    return "\n".join(lines)
