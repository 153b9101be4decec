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
import pandas as pd
from rasterio.transform import array_bounds
from rasterio.warp import transform_geom

from segpipe.geometry import Index, SceneGeometry
from segpipe.io.store import write_atomic
from segpipe.objects.measure import ObjectReport
from segpipe.report.metrics import scores
from segpipe.tiling.grid import TileGrid


@dataclass
class MetricsReport:
    """Per-tile rows and the global summary derived from summed confusion matrices."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    footprints: list[dict[str, Any]]
    geometry: SceneGeometry  # the scene's grid: decides tile/block, pixels/voxels, IoU/Dice in what is shown


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def _image_row(grid: TileGrid, index: Index, geometry: SceneGeometry) -> tuple[dict, dict]:
    """Position columns of one image tile, and its footprint feature (WGS 84 where georeferenced)."""
    transform, crs = geometry.transform, geometry.crs
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


def _volume_row(grid: TileGrid, index: Index, geometry: SceneGeometry) -> dict:
    """Position columns of one volume block, with its bounding box in RAS+ millimetres."""
    core = grid.tile(index).core
    corners = np.array([[x, y, z, 1.0] for z in (core.start[0], core.stop[0]) for y in (core.start[1], core.stop[1])
                        for x in (core.start[2], core.stop[2])]) - [0.5, 0.5, 0.5, 0]  # voxel edges, not centres
    world = (geometry.affine @ corners.T)[:3]
    return {"block": "_".join(map(str, index)), "z": index[0], "row": index[1], "col": index[2],
            "z0": core.start[0], "row0": core.start[1], "col0": core.start[2],
            "depth": core.shape[0], "height": core.shape[1], "width": core.shape[2],
            "ras_min_mm": [round(float(v), 3) for v in world.min(axis=1)],
            "ras_max_mm": [round(float(v), 3) for v in world.max(axis=1)]}


def build_report(confusions: dict[Index, np.ndarray], grid: TileGrid, geometry: SceneGeometry,
                 class_names: list[str]) -> MetricsReport:
    """Rows per tile (per block for volumes) and the global summary."""
    rows, feats = [], []
    total = None
    unit = geometry.pixel_word
    for index, cm in sorted(confusions.items()):
        total = cm.copy() if total is None else total + cm
        s = scores(cm)
        if geometry.is_volume:
            row, feat = _volume_row(grid, index, geometry), None
        else:
            row, feat = _image_row(grid, index, geometry)
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
        "crs": geometry.crs.to_string() if geometry.crs is not None else None,
    }
    return MetricsReport(rows, summary, feats, geometry)


def summary_document(report: MetricsReport) -> dict[str, Any]:
    """The scores' part of ``summary.json``: global figures and one row per tile (the run adds its stage times
    and writes the file once, at its end: :func:`segpipe.pipeline.write_summary`)."""
    return {"summary": report.summary, "tiles": report.rows}


def write_report(report: MetricsReport, folder: str | Path) -> dict[str, Path]:
    """Write ``tiles.csv`` and (images only) ``tiles.geojson`` into ``folder``."""
    folder = Path(folder)
    buf = io.StringIO()
    if report.rows:
        writer = csv.DictWriter(buf, fieldnames=list(report.rows[0]))
        writer.writeheader()
        writer.writerows(report.rows)
    paths = {"csv": folder / "tiles.csv"}
    write_atomic(paths["csv"], buf.getvalue())
    if report.footprints:
        paths["geojson"] = folder / "tiles.geojson"
        write_atomic(paths["geojson"], json.dumps({"type": "FeatureCollection", "features": report.footprints}))
    return paths


def format_summary(report: MetricsReport) -> str:
    """Human-readable global and per-tile IoU for the terminal."""
    s = report.summary
    names = s["classes"]
    unit, volume = report.geometry.pixel_word, report.geometry.is_volume
    lines = [f"global accuracy {s['global_accuracy']}, mean IoU {s['global_mean_iou']} over {s['pixels']} {unit}"]
    lines.append("global IoU: " + ", ".join(f"{n}={s['global_iou'][n]}" for n in names))
    if "objects" in s:
        o = s["objects"]
        lines.append(f"objects: {o['objects']} predicted, {o.get('truth_objects')} true, {o.get('matched')} matched "
                     f"(IoU > {o.get('match_iou')}), F1 {o.get('f1')}, PQ {o.get('panoptic_quality')}, "
                     f"mean matched IoU {o.get('mean_matched_iou')}, AP {o.get('ap')} (AP50 {o.get('ap50')}, "
                     f"AP75 {o.get('ap75')}; COCO, ranked by {o.get('ap_score')})")
    if volume:
        lines.append("global Dice: " + ", ".join(f"{n}={s['global_dice'][n]}" for n in names))
    score, key = report.geometry.score, report.geometry.tile_word
    header = f"{key:>8} {unit:>9} " + " ".join(f"{('Dice ' if volume else 'IoU ') + n:>16}" for n in names)
    lines.append(header)
    for row in report.rows:
        vals = " ".join(f"{'-' if row[f'{score}_{n}'] is None else format(row[f'{score}_{n}'], '.4f'):>16}"
                        for n in names)
        lines.append(f"{row[key]:>8} {row[unit]:>9} {vals}")
    return "\n".join(lines)


def _clean_values(d: dict[str, Any]) -> dict[str, Any]:
    """Floats rounded (NaN -> None) for CSV/JSON, also in nested dicts (AP per class); other values as they are."""
    return {k: (_clean(v) if isinstance(v, float) else _clean_values(v) if isinstance(v, dict) else v)
            for k, v in d.items()}


def add_object_columns(report: MetricsReport, objects: ObjectReport) -> None:
    """Per-tile object counts and matched-object IoU beside the pixel scores, and the object summary."""
    key = report.geometry.tile_word
    for row in report.rows:
        row.update(_clean_values(objects.per_tile[row[key]]))
    for feat, row in zip(report.footprints, report.rows, strict=False):  # images only: volumes have none
        feat["properties"].update({k: row[k] for k in objects.per_tile[row[key]]})
    report.summary["objects"] = _clean_values(objects.summary)


def _world_centroids(df: pd.DataFrame, geometry: SceneGeometry) -> pd.DataFrame:
    """Centroids from pixel (row, col) / voxel (z, y, x) indices to scene CRS or RAS+ millimetres."""
    names = ("x_mm", "y_mm", "z_mm") if geometry.is_volume else ("centroid_x", "centroid_y")
    world = geometry.world(np.stack([df[f"c{k}"].to_numpy() for k in range(geometry.ndim)]))
    return pd.DataFrame(dict(zip(names, world, strict=True)), index=df.index)


def write_object_report(objects: ObjectReport, folder: str | Path, geometry: SceneGeometry) -> dict[str, Path]:
    """``objects.csv`` (one row per predicted object), ``truth_objects.csv`` and ``objects.json``."""
    folder = Path(folder)
    paths = {"objects": folder / "objects.csv", "json": folder / "objects.json"}

    def table(df: pd.DataFrame, key: str, match: str, match_name: str) -> str:
        cols = pd.concat([df[["pixels"]], _world_centroids(df, geometry),
                          df[[c for c in ("class", "tile", match, "iou", "score") if c in df]]], axis=1)
        cols = cols.rename(columns={match: match_name})
        cols.insert(0, key, df.index.to_numpy())
        return cols.to_csv(index=False, float_format="%.12g")

    write_atomic(paths["objects"], table(objects.objects, "id", "truth_id", "truth_id"))
    if objects.truth is not None:
        paths["truth"] = folder / "truth_objects.csv"
        write_atomic(paths["truth"], table(objects.truth, "truth_id", "id", "matched_id"))
    tiles = {t: _clean_values(row) for t, row in objects.per_tile.items()}
    write_atomic(paths["json"], json.dumps({"summary": _clean_values(objects.summary), "tiles": tiles}, indent=2))
    return paths
