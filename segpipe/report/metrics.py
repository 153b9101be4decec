"""Per-tile confusion matrices on tile cores; IoU, Dice and accuracy.

Works alike on image tiles and volume blocks. Global scores come from the *summed* confusion
matrix, never from averaging tile scores (a tile with 10 building pixels must not weigh as much
as one with 10,000). Counting on tile cores only means each pixel is counted exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from segpipe.geometry import Index
from segpipe.io.result import NODATA
from segpipe.io.scene import Scene
from segpipe.io.truth import Truth
from segpipe.tiling.grid import TileRun


def confusion(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix (rows = truth, columns = prediction) over pixels valid in both."""
    ok = (pred != NODATA) & (truth < n_classes)
    idx = truth[ok].astype(np.int64) * n_classes + pred[ok].astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


@dataclass
class Scores:
    """Scores of one confusion matrix; NaN where a class is absent from truth and prediction."""

    iou: np.ndarray
    dice: np.ndarray
    accuracy: float
    pixels: int

    @property
    def mean_iou(self) -> float:
        return float(np.nanmean(self.iou)) if np.isfinite(self.iou).any() else float("nan")


def scores(cm: np.ndarray) -> Scores:
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
        total = cm.sum()
        acc = float(tp.sum() / total) if total else float("nan")
    return Scores(iou, dice, acc, int(cm.sum()))


def tile_confusions(run: TileRun, *, truth: Truth, n_classes: int) -> list[tuple[Index, np.ndarray]]:
    """Burn/read truth for each tile (block) core, store it, and count the tile's confusion matrix."""
    scene = Scene(run.scene)
    pred_arr = zarr.open_array(run.result, path="class", mode="r")
    truth_arr = zarr.open_array(run.result, path="truth", mode="r+")
    out = []
    for index, tile in zip(run.indices, run.tiles(), strict=True):
        core = tile.core
        t = truth.read(core, scene.transform)
        t = np.where(scene.valid_in(core.slices), t, NODATA).astype(np.uint8)
        truth_arr[core.slices] = t
        out.append((tuple(index), confusion(np.asarray(pred_arr[core.slices]), t, n_classes)))
    return out
