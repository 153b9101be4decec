"""COCO-style instance average precision (AP over IoU 0.50:0.05:0.95, AP50, AP75) from summed statistics.

Why from sums: objects cross tiles, so no tile can rank or match them. Every input here is a sum
(or a minimum) the tiles report and the client adds up exactly (integer pixel counts per object
and per (predicted, true) pair, integer-scaled probability sums, first pixels), so every IoU and
score is the same float as on the whole image and the AP is bit-identical for any tile size.

The evaluation follows pycocotools' ``COCOeval`` (``evaluate`` + ``accumulate``) for one image
(the scene) with segmentation IoU, area range "all", no crowd and no ignore regions (segpipe has
none to give), and no ``maxDets`` cap (a scene holds thousands of objects, not 100):

* Per category, predictions are taken in descending score; ties are broken by the object's first
  pixel in scene raster order. Not by segpipe's object ID: IDs are numbered in tile order, so they
  change with the tile size; the first pixel does not (it is the order whole-image labelling numbers in).
* At each IoU threshold ``t`` a prediction matches the unmatched true object of its category with the
  highest IoU, at least ``t``; equal IoUs go to the later true object in ID order (COCO's loop keeps
  the last of equal candidates). Matching is greedy in score order, as in COCO.
* Precision is made monotone (the running maximum from the right) and read at 101 recall points
  0, 0.01, ..., 1 (``searchsorted``, left side; 0 beyond the last recall reached).
* AP of a category is the mean over thresholds and recall points; the scene's AP is the mean over
  categories with ground truth (categories with predictions only are left out, as in COCO; a category
  with ground truth and no predictions scores 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# The arrays pycocotools builds (np.linspace with these counts), so thresholds compare bit for bit.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
PROBABILITY_SCALE = 2**24  # float16 values in [0, 1] are whole multiples of 2**-24: scaled, they sum exactly


@dataclass
class Category:
    """One category of the evaluation: a class id (or the pooled category) and its name in the report."""

    key: int
    name: str


def _precision(ranked_hits: list[tuple[int, list[tuple[int, float]]]], nd: int, n_truth: int) -> np.ndarray:
    """COCO's interpolated precision (thresholds x recall points) of one category with ``nd`` predictions.

    ``ranked_hits`` holds, in rank order, (rank, candidates) for the predictions that have candidates: true
    objects at IoU >= 0.5 as (true ID, IoU), ascending ID. The others are false positives at every threshold,
    so the Python loop runs over matches only, not over every prediction of a large scene.
    """
    out = np.zeros((len(IOU_THRESHOLDS), len(RECALL_POINTS)))
    for ti, t in enumerate(IOU_THRESHOLDS):
        matched: set[int] = set()
        tps = np.zeros(nd, bool)
        for r, hits in ranked_hits:
            best, thr = -1, min(t, 1 - 1e-10)
            for g, iou in hits:
                if g in matched or iou < thr:
                    continue
                best, thr = g, iou
            if best >= 0:
                matched.add(best)
                tps[r] = True
        tp = np.cumsum(tps).astype(float)
        fp = np.cumsum(~tps).astype(float)
        rc = tp / n_truth
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr
        idx = np.searchsorted(rc, RECALL_POINTS, side="left")
        ok = idx < nd
        out[ti, ok] = pr[idx[ok]]
    return out


def average_precision(preds: pd.DataFrame, truth: pd.DataFrame, pairs: pd.DataFrame,
                      categories: list[Category]) -> dict[str, Any]:
    """AP, AP50, AP75, AP per category and per IoU threshold.

    ``preds``: index object ID; columns ``category`` (key), ``score``, ``first`` (first pixel, flat scene
    index). ``truth``: index true object ID; column ``category``. ``pairs``: ``id``, ``truth_id``, ``iou``
    of overlapping objects. Returns ``None`` for the AP figures where no category has ground truth.
    """
    strong = pairs[pairs["iou"] >= IOU_THRESHOLDS[0]].sort_values(["id", "truth_id"]) if len(pairs) else pairs
    hits: dict[int, list[tuple[int, float]]] = {}
    for i, g, iou in zip(strong["id"].to_numpy(), strong["truth_id"].to_numpy(), strong["iou"].to_numpy(),
                         strict=True):
        hits.setdefault(int(i), []).append((int(g), float(iou)))
    blocks, per_class = [], {}
    for cat in categories:
        mine = preds[preds["category"] == cat.key]
        true_ids = set(truth.index[truth["category"] == cat.key].tolist())
        if not true_ids:
            per_class[cat.name] = None
            continue
        order = mine.index.to_numpy()[np.lexsort((mine["first"].to_numpy(), -mine["score"].to_numpy(float)))]
        ranked = [(r, [(g, iou) for g, iou in hits[int(order[r])] if g in true_ids])
                  for r in np.flatnonzero(np.isin(order, np.fromiter(hits, np.int64, len(hits))))]
        p = _precision(ranked, len(order), len(true_ids))
        per_class[cat.name] = float(np.mean(p.reshape(-1)))
        blocks.append(p)
    if not blocks:
        return {"ap": None, "ap50": None, "ap75": None, "ap_per_class": per_class, "ap_per_iou": None}
    prec = np.stack(blocks, axis=-1)  # thresholds x recall points x categories, as COCO's precision[..., 0, -1]
    at = {round(float(t), 2): k for k, t in enumerate(IOU_THRESHOLDS)}

    def mean(a: np.ndarray) -> float:
        return float(np.mean(a.reshape(-1)))  # flat, in COCO's (threshold, recall, category) order

    return {"ap": mean(prec), "ap50": mean(prec[at[0.5]]), "ap75": mean(prec[at[0.75]]), "ap_per_class": per_class,
            "ap_per_iou": {f"{t:.2f}": mean(prec[k]) for k, t in enumerate(IOU_THRESHOLDS)}}
