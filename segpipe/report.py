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

from segpipe.grid import TileGrid
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


def build_report(confusions: dict[tuple[int, int], np.ndarray], grid: TileGrid, crs: CRS | None, transform: Affine,
                 class_names: list[str]) -> MetricsReport:
    rows, feats = [], []
    total = None
    for (r, c), cm in sorted(confusions.items()):
        total = cm.copy() if total is None else total + cm
        s = scores(cm)
        core = grid.tile((r, c)).core
        t = grid.tile((r, c)).transform(transform)
        west, south, east, north = array_bounds(core.height, core.width, t)
        row: dict[str, Any] = {"tile": f"{r}_{c}", "row": r, "col": c, "row0": core.row0, "col0": core.col0,
                               "height": core.height, "width": core.width, "pixels": s.pixels,
                               "accuracy": _clean(s.accuracy), "mean_iou": _clean(s.mean_iou)}
        for k, name in enumerate(class_names):
            row[f"iou_{name}"] = _clean(s.iou[k])
            row[f"dice_{name}"] = _clean(s.dice[k])
        rows.append(row)
        ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
        geom = {"type": "Polygon", "coordinates": [ring]}
        if crs is not None:  # RFC 7946 wants WGS 84; slides stay in micrometres
            geom = transform_geom(crs, "EPSG:4326", geom)
        feats.append({"type": "Feature", "geometry": geom,
                      "properties": {**row, "bounds_scene_crs": [west, south, east, north]}})
    g = scores(total) if total is not None else None
    summary = {
        "classes": class_names,
        "tiles": len(rows),
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
    """Write ``tiles.csv``, ``summary.json`` and ``tiles.geojson`` into ``folder``."""
    folder = Path(folder)
    buf = io.StringIO()
    if report.rows:
        writer = csv.DictWriter(buf, fieldnames=list(report.rows[0]))
        writer.writeheader()
        writer.writerows(report.rows)
    paths = {"csv": folder / "tiles.csv", "json": folder / "summary.json", "geojson": folder / "tiles.geojson"}
    write_atomic(paths["csv"], buf.getvalue())
    write_atomic(paths["json"], json.dumps({"summary": report.summary, "tiles": report.rows}, indent=2))
    write_atomic(paths["geojson"], json.dumps({"type": "FeatureCollection", "features": report.footprints}))
    return paths


def format_summary(report: MetricsReport) -> str:
    """Human-readable global and per-tile IoU for the terminal."""
    s = report.summary
    names = s["classes"]
    lines = [f"global accuracy {s['global_accuracy']}, mean IoU {s['global_mean_iou']} over {s['pixels']} px"]
    lines.append("global IoU: " + ", ".join(f"{n}={s['global_iou'][n]}" for n in names))
    header = f"{'tile':>8} {'pixels':>9} " + " ".join(f"{'IoU ' + n:>16}" for n in names)
    lines.append(header)
    for row in report.rows:
        vals = " ".join(f"{'-' if row[f'iou_{n}'] is None else format(row[f'iou_{n}'], '.4f'):>16}"
                        for n in names)
        lines.append(f"{row['tile']:>8} {row['pixels']:>9} {vals}")
    return "\n".join(lines)
