"""Object-level results: per-object statistics, matching against true objects, per-tile counts, polygons.

Objects cross tiles, so nothing is decided per tile: each tile reports partial sums (pixel counts,
coordinate sums, intersection counts with true objects) for the objects it holds, and the client
adds them up. A predicted and a true object match when their IoU, from the summed counts, exceeds
``match_iou`` (above 0.5 a match is unique, so no assignment problem arises). Each object is
counted in the tile holding its centroid, so per-tile counts add up to the global count.
Average precision (:mod:`segpipe.objects.ap`) is ranked and matched from the same sums: each object's
score (its mean class probability as an exact integer-scaled sum, or its pixel count) and its first
pixel in scene order (the tie-break) are sums and minima too, so AP is the same for any tile size.
Polygons are traced per tile in the scene CRS and dissolved per object ID on the client.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes

from segpipe.io.result import NODATA
from segpipe.io.scene import Scene
from segpipe.io.truth import Truth
from segpipe.objects.ap import PROBABILITY_SCALE, Category, average_precision
from segpipe.objects.instances import INSTANCES
from segpipe.tiling.grid import TileGrid, TileTask


def _merge(df: pd.DataFrame, as_index: bool = True) -> pd.DataFrame:
    """Partial statistics merged per ID: sums, except ``first`` (a minimum); both exact in any order."""
    return df.groupby("id", as_index=as_index).agg({c: "min" if c == "first" else "sum" for c in df.columns
                                                    if c != "id"})


def _sums(ids: np.ndarray, origin: tuple[int, ...], shape: tuple[int, ...],
          extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Pixel count, coordinate sums, first pixel (flat index in the scene: the tile-invariant tie-break of
    AP ranking) and sums of the ``extra`` per-pixel integers per nonzero ID of one tile (scene pixels)."""
    extra = extra or {}
    ok = ids > 0
    if not ok.any():
        return pd.DataFrame(columns=["id", "pixels", *[f"s{d}" for d in range(ids.ndim)], "first", *extra])
    coords = np.nonzero(ok)
    df = pd.DataFrame({"id": ids[ok].astype(np.int64), "pixels": 1})
    for d, c in enumerate(coords):
        df[f"s{d}"] = c.astype(np.float64) + origin[d]
    df["first"] = np.ravel_multi_index(tuple(c.astype(np.int64) + o for c, o in zip(coords, origin, strict=True)),
                                       shape)
    for k, v in extra.items():
        df[k] = v[ok]
    return _merge(df, as_index=False)


def _probability_sums(task: TileTask, pred: np.ndarray) -> dict[str, np.ndarray] | None:
    """Per pixel, the probability of its own class as an integer (x 2**24, exact for float16) and whether it
    has one; ``None`` where the run stored no probabilities.

    Integers, because a float sum depends on the order of its terms, which follows the tiles. An instance's
    pixels all hold its class, so the pixel's own class is the object's.
    """
    group = zarr.open_group(task.result, mode="r")
    if "probability" not in group:
        return None
    core = task.core
    prob = np.asarray(group["probability"][(slice(None), *core.slices)])
    cls = np.clip(np.asarray(group["class"][core.slices]).astype(np.intp), 0, prob.shape[0] - 1)
    mine = np.take_along_axis(prob, cls[None], axis=0)[0].astype(np.float64)
    ok = (pred > 0) & np.isfinite(mine)
    return {"prob_sum": np.where(ok, mine * PROBABILITY_SCALE, 0).astype(np.int64), "prob_n": ok.astype(np.int64)}


@dataclass
class TileObjects:
    """Partial sums of one tile."""

    pred: pd.DataFrame
    truth: pd.DataFrame | None
    overlap: pd.DataFrame | None


def tile_objects(task: TileTask, *, truth: Truth | None) -> TileObjects:
    """Per-object sums of one tile core (pixels, centroid sums, class) and, with true objects, the overlaps."""
    scene = Scene(task.scene)
    core = task.core
    pred = np.asarray(zarr.open_array(task.result, path=INSTANCES, mode="r")[core.slices])
    p = _sums(pred, core.start, task.shape, _probability_sums(task, pred))
    if truth is None or not truth.has_ids():
        return TileObjects(p, None, None)
    valid = scene.valid_in(core.slices)
    t_ids = np.where(valid, truth.read_ids(core, scene.transform), 0)
    both = (pred > 0) & (t_ids > 0)
    overlap = pd.DataFrame({"id": pred[both].astype(np.int64), "truth_id": t_ids[both].astype(np.int64),
                            "pixels": 1}).groupby(["id", "truth_id"], as_index=False).sum()
    return TileObjects(p, _sums(t_ids, core.start, task.shape), overlap)


def _table(parts: list[pd.DataFrame], nd: int) -> pd.DataFrame:
    df = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else None
    if df is None:
        sums = {"id", "pixels", *[f"s{d}" for d in range(nd)]}
        extra = [c for c in parts[0].columns if c not in sums] if parts else ["first"]
        return pd.DataFrame(columns=["id", "pixels", *[f"c{d}" for d in range(nd)], *extra]).set_index("id")
    df = _merge(df)
    for d in range(nd):
        df[f"c{d}"] = df[f"s{d}"] / df["pixels"]  # centroid in scene pixel coordinates
    return df.drop(columns=[f"s{d}" for d in range(nd)])


@dataclass
class ObjectReport:
    """Objects, their matches, and per-tile counts."""

    objects: pd.DataFrame  # index id: pixels, centroid c0.., first (pixel), score, tile, class, truth_id, iou
    truth: pd.DataFrame | None
    summary: dict[str, Any]
    per_tile: dict[str, dict[str, Any]]


def _tile_key(df: pd.DataFrame, grid: TileGrid) -> pd.Series:
    cols = [np.clip((df[f"c{d}"].to_numpy() // n).astype(int), 0, k - 1)
            for d, (n, k) in enumerate(zip(grid.size, grid.counts, strict=True))]
    return pd.Series(["_".join(map(str, t)) for t in zip(*cols, strict=True)], index=df.index, dtype=object)


def truth_classes(truth: Truth | None) -> np.ndarray | None:
    """Class id of each true object (index = true ID) where the truth has them: vector features carry their
    class (``NODATA`` when ignored); an ID raster or volume carries none (``None``)."""
    if truth is None or truth.kind != "vector":
        return None
    return np.asarray([NODATA, *(v for _, v in truth.shapes)], np.int64)


def _scores(objects: pd.DataFrame) -> str:
    """Each object's AP ranking score into ``objects["score"]``; returns what it is.

    The mean probability of the object's class where the run stored probabilities; else the object's pixel
    count. COCO needs a ranking, and with one constant score pycocotools ranks in the order the predictions
    happen to be listed, so AP would rest on an arbitrary order; size is deterministic, exact from tile sums,
    and ranks the specks a threshold leaves behind last.
    """
    if "prob_n" in objects:
        n = objects.pop("prob_n").to_numpy(np.int64)
        total = objects.pop("prob_sum").to_numpy(np.int64) / PROBABILITY_SCALE  # exact: a power-of-two scale
        objects["score"] = np.where(n > 0, total / np.maximum(n, 1), 0.0)
        return "probability"
    objects["score"] = objects["pixels"].to_numpy(np.float64)
    return "area"


def _ap(objects: pd.DataFrame, truth: pd.DataFrame, pairs: pd.DataFrame, instance_classes: np.ndarray,
        class_names: list[str], truth_class: np.ndarray | None, ap_classes: list[int] | None) -> dict[str, Any]:
    """Categories for :func:`segpipe.objects.ap.average_precision`: the instance classes, each predicted and
    true object in its class. Truth without classes (ID rasters) is of the one instance class, or, with
    several, every object is pooled in one category ``objects`` (class-agnostic, like F1 and PQ)."""
    keys = sorted(set(ap_classes if ap_classes is not None else (int(c) for c in instance_classes[1:])))
    preds = pd.DataFrame({"score": objects["score"].to_numpy(np.float64),
                          "first": objects["first"].to_numpy(np.int64)}, index=objects.index)
    gts = pd.DataFrame(index=truth.index)
    if truth_class is None and len(keys) != 1:
        categories = [Category(-1, "objects")]
        preds["category"], gts["category"] = -1, -1
    else:
        categories = [Category(k, class_names[k]) for k in keys]
        preds["category"] = instance_classes[objects.index.to_numpy(np.int64)].astype(np.int64)
        gts["category"] = truth_class[truth.index.to_numpy(np.int64)] if truth_class is not None else keys[0]
    return average_precision(preds, gts, pairs, categories)


def object_report(parts: list[TileObjects], grid: TileGrid, instance_classes: np.ndarray, match_iou: float,
                  class_names: list[str], truth_class: np.ndarray | None = None,
                  ap_classes: list[int] | None = None) -> ObjectReport:
    """Objects, matches and per-tile counts from the tiles' partial sums; with truth, F1, PQ and COCO AP.

    ``truth_class`` (:func:`truth_classes`) gives true objects their class for per-class AP; ``ap_classes``
    are the instance classes evaluated (default: those of the predicted objects).
    """
    nd = len(grid.shape)
    objects = _table([p.pred for p in parts], nd)
    score = _scores(objects)
    objects["class"] = [class_names[int(instance_classes[i])] for i in objects.index]
    objects["tile"] = _tile_key(objects, grid) if len(objects) else pd.Series(dtype=object)
    objects["truth_id"] = 0
    objects["iou"] = np.nan
    truth = None
    summary: dict[str, Any] = {"objects": int(len(objects))}
    if parts and parts[0].truth is not None:
        truth = _table([p.truth for p in parts], nd)
        truth["tile"] = _tile_key(truth, grid) if len(truth) else pd.Series(dtype=object)
        truth["id"] = 0
        truth["iou"] = np.nan
        ov = pd.concat([p.overlap for p in parts if len(p.overlap)], ignore_index=True) \
            if any(len(p.overlap) for p in parts) else pd.DataFrame(columns=["id", "truth_id", "pixels", "iou"])
        if len(ov):
            ov = ov.groupby(["id", "truth_id"], as_index=False).sum()
            ov["iou"] = ov["pixels"] / (objects.loc[ov["id"], "pixels"].to_numpy()
                                        + truth.loc[ov["truth_id"], "pixels"].to_numpy() - ov["pixels"])
            m = ov[ov["iou"] > match_iou]
            objects.loc[m["id"], "truth_id"] = m["truth_id"].to_numpy()
            objects.loc[m["id"], "iou"] = m["iou"].to_numpy()
            truth.loc[m["truth_id"], "id"] = m["id"].to_numpy()
            truth.loc[m["truth_id"], "iou"] = m["iou"].to_numpy()
        tp = int((objects["truth_id"] > 0).sum())
        fp, fn = len(objects) - tp, len(truth) - tp
        # Summed exactly (fsum): the table's order follows the tiles, and a float sum in another order may
        # differ in the last bit, so the scores would depend on the tile size.
        matched = math.fsum(objects.loc[objects["truth_id"] > 0, "iou"])
        summary.update({
            "truth_objects": int(len(truth)), "matched": tp, "false_positives": fp, "false_negatives": fn,
            "precision": tp / len(objects) if len(objects) else None,
            "recall": tp / len(truth) if len(truth) else None,
            "f1": 2 * tp / (len(objects) + len(truth)) if len(objects) + len(truth) else None,
            "mean_matched_iou": matched / tp if tp else None,
            # panoptic quality (Kirillov et al.): matched IoU sum over TP + FP/2 + FN/2
            "panoptic_quality": matched / (tp + fp / 2 + fn / 2) if tp + fp + fn else None,
            "match_iou": match_iou,
            # COCO AP (IoU >= t, greedy in score order: not the > match_iou matching above)
            **_ap(objects, truth, ov, instance_classes, class_names, truth_class, ap_classes),
            "ap_score": score,
        })
    per_tile: dict[str, dict[str, Any]] = {}
    for t in grid:
        row: dict[str, Any] = {"objects": int((objects["tile"] == t.key).sum())}
        if truth is not None:
            mine = objects[(objects["tile"] == t.key) & (objects["truth_id"] > 0)]
            row.update({"truth_objects": int((truth["tile"] == t.key).sum()), "matched_objects": int(len(mine)),
                        "mean_matched_iou": math.fsum(mine["iou"]) / len(mine) if len(mine) else None})
        per_tile[t.key] = row
    return ObjectReport(objects, truth, summary, per_tile)


def tile_polygons(task: TileTask, *, transform: Affine, connectivity: int) -> list[tuple[int, dict]]:
    """GeoJSON-like polygons of the objects in one tile core (pixel edges, in scene coordinates)."""
    tile = task.tile
    ids = np.asarray(zarr.open_array(task.result, path=INSTANCES, mode="r")[tile.core.slices]).astype(np.int32)
    return [(int(v), geom) for geom, v in shapes(ids, mask=ids > 0, connectivity=8 if connectivity == 2 else 4,
                                                 transform=tile.transform(transform))]


def _valid(geom: Any) -> Any:
    """One object's polygon as a valid MultiPolygon (see :func:`write_polygons`)."""
    import shapely

    if not shapely.is_valid(geom):
        geom = shapely.make_valid(geom, method="structure", keep_collapsed=False)
    return shapely.multipolygons(shapely.get_parts(geom))


def write_polygons(pieces: list[tuple[int, dict]], objects: pd.DataFrame, crs: CRS | None, dest: Path) -> Path:
    """Dissolve pieces per object ID and write a GeoPackage layer ``objects`` (atomically).

    Made valid where they are not: GDAL traces an 8-connected object's outline through the corner two diagonal
    pixels share, a ring touching itself there, which simple features call invalid (on the real slide, 1,091 of
    8,906 objects) and which GEOS, JTS (QGIS', QuPath's geometry) measure and test containment on only after
    repair. Repaired by structure: the same pixels stay covered (the same area), as parts meeting at that
    corner."""
    import shapely
    from pyogrio.raw import write

    by_id: dict[int, list] = {}
    for i, g in pieces:
        by_id.setdefault(i, []).append(shapely.geometry.shape(g))
    ids = sorted(by_id)
    geoms = [_valid(shapely.union_all(by_id[i])) for i in ids]
    obj = objects.loc[ids] if ids else objects
    fields = [np.asarray(ids, np.int64), obj["class"].astype(str).to_numpy(dtype=object),
              obj["pixels"].to_numpy(np.int64), np.asarray([g.area for g in geoms], np.float64),
              obj["truth_id"].to_numpy(np.int64), obj["iou"].to_numpy(np.float64)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp.gpkg")
    if tmp.exists():
        tmp.unlink()
    try:
        with warnings.catch_warnings():  # no CRS is deliberate (a slide's micrometres): pyogrio warns of it
            warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
            write(str(tmp), np.array([shapely.to_wkb(g) for g in geoms], dtype=object), fields,
                  ["id", "class", "pixels", "area", "truth_id", "iou"], geometry_type="MultiPolygon",
                  crs=crs.to_wkt() if crs is not None else None, driver="GPKG", layer="objects")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
