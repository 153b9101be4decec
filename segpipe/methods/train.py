"""Train the built-in U-Net on Zarr tiles and labels.

The image is ingested into a Zarr scene store and the labels burned onto the same grid (the very
code paths inference uses), then random patches are drawn from the store. Half of the patches are
centred on foreground pixels so that rare classes (buildings are ~10% of a scene) are learned.
``train_cols`` keeps the right-hand part of the scene out of training, so that part of the demo's
report measures generalisation rather than memory.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from distributed import Client
from torch import nn

from segpipe.config import JobSpec, MethodSpec, TruthSpec
from segpipe.errors import InputError
from segpipe.geometry import Box
from segpipe.io.result import NODATA
from segpipe.io.scene import Scene
from segpipe.io.store import ensure_array
from segpipe.io.truth import check_truth
from segpipe.models.checkpoint import ModelSpec, save_checkpoint
from segpipe.runtime.cluster import LOOPBACK
from segpipe.tiling.grid import TileGrid
from segpipe.tiling.ingest import ingest, source_info
from segpipe.tiling.resample import Axis, resample


@dataclass
class TrainSpec:
    """Training hyper-parameters."""

    epochs: int = 40
    steps_per_epoch: int = 20
    patch_size: int = 128
    batch_size: int = 16
    base: int = 16
    depth: int = 4
    lr: float = 2e-3
    seed: int = 0
    train_cols: int | None = None
    foreground_fraction: float = 0.5
    # Half the patches seen as by a sensor up to this many times coarser, resampled back to the training
    # pixel size as inference does (1 = off): a model that meets only its own pixel size falls apart on a
    # coarser scene resampled to it (demo U-Net on the 1.0 m scene: building IoU 0.07 without, see README).
    resolution_jitter: float = 1.0


def prepare_store(image: str | Path, labels: str | Path, folder: str | Path, bands: list[int] | None,
                  client: Client, n_classes: int = 2, binarize: bool = False,
                  remap: dict[int, int] | None = None) -> Scene:
    """Ingest ``image`` into ``folder/scene.zarr`` and burn ``labels`` into its ``truth`` array.

    The labels are checked as a job's truth is (:func:`segpipe.io.truth.check_truth`): a 0/255 mask, or any
    value beyond the ``n_classes``, is refused unless ``binarize`` or ``remap`` reads it, never trained on as
    "ignore"."""
    job = JobSpec(input=str(image), output=Path(folder), bands=bands, method=MethodSpec(name="otsu"),
                  truth=TruthSpec(path=Path(labels), binarize=binarize, remap=remap or {}))
    info = source_info(str(image))
    truth = check_truth(job.truth, info, n_classes=n_classes)
    scene = ingest(job, info, client)
    arr = ensure_array(zarr.open_group(scene.path, mode="r+"), "truth", (scene.height, scene.width),
                       (scene.chunk, scene.chunk), "uint8", NODATA, ("y", "x"))
    for tile in TileGrid(scene.shape, scene.chunk):
        arr[tile.core.slices] = truth.read(tile.core, scene.transform)
    return scene


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(4))
    x, y = np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))
    if rng.random() < 0.5:
        x, y = x[..., ::-1], y[..., ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def coarser(x: np.ndarray, factor: float) -> np.ndarray:
    """Band-first pixels as a sensor ``factor`` times coarser sees them, resampled back to their own pixel size
    by :mod:`segpipe.tiling.resample` (the path a coarser scene takes to a model's resolution)."""
    shape = x.shape[1:]
    whole = Box.of(shape)
    down = [Axis(n, factor) for n in shape]
    small = Box.of(tuple(a.n_out for a in down))
    values, _ = resample(x, np.ones(shape, bool), down, small, whole)
    back, _ = resample(values, np.ones(small.shape, bool), [Axis(a.n_out, 1 / factor) for a in down], whole, small)
    return back


def train_on_store(scene: Scene, out: str | Path, spec: TrainSpec, class_names: list[str]) -> dict[str, Any]:
    """Train on patches of the scene store and save a safe checkpoint to ``out``."""
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    img = np.asarray(scene.image[:], dtype=np.float32)
    valid = scene.valid_in((slice(None),) * len(scene.shape))
    truth = np.asarray(zarr.open_array(scene.path, path="truth", mode="r")[:])
    cols = scene.width if spec.train_cols is None else min(spec.train_cols, scene.width)
    p = spec.patch_size
    if scene.height < p or cols < p:
        raise InputError(f"training area {cols}x{scene.height} is smaller than patch_size {p}")
    region = np.zeros_like(valid)
    region[:, :cols] = True
    use = valid & region
    mean = [float(img[b][use].mean()) for b in range(scene.count)]
    std = [float(max(img[b][use].std(), 1e-6)) for b in range(scene.count)]
    x_all = np.where(valid[None], (img - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None], 0)
    y_all = np.where(use, truth, NODATA).astype(np.int64)
    n_classes = len(class_names)
    fg = np.argwhere((truth > 0) & (truth < n_classes) & use)
    model_spec = ModelSpec(in_channels=scene.count, n_classes=n_classes, base=spec.base, depth=spec.depth,
                           mean=mean, std=std, class_names=class_names)
    model = model_spec.build()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * spec.steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(ignore_index=NODATA)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(spec.epochs * spec.steps_per_epoch):
        xs, ys = [], []
        for _ in range(spec.batch_size):
            if len(fg) and rng.random() < spec.foreground_fraction:
                cy, cx = fg[rng.integers(len(fg))]
                r0 = int(np.clip(cy - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, scene.height - p))
                c0 = int(np.clip(cx - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, cols - p))
            else:
                r0, c0 = int(rng.integers(scene.height - p + 1)), int(rng.integers(cols - p + 1))
            x, y = _augment(x_all[:, r0:r0 + p, c0:c0 + p], y_all[r0:r0 + p, c0:c0 + p], rng)
            if spec.resolution_jitter > 1 and rng.random() < 0.5:
                x = coarser(x, float(rng.uniform(1.0, spec.resolution_jitter)))
            xs.append(x)
            ys.append(y)
        xb = torch.from_numpy(np.stack(xs).astype(np.float32))
        yb = torch.from_numpy(np.stack(ys))
        logits = model(xb)
        loss = loss_fn(logits, yb) + _soft_dice_loss(logits, yb, n_classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    model_spec.info = {"trained_on": str(scene.group.attrs.get("source")), "train_cols": cols,
                       **({"resolution": [abs(scene.transform.e), abs(scene.transform.a)]}  # resampled to it later
                          if scene.crs is not None else {}),
                       "steps": len(losses), "patch_size": p,
                       **({"resolution_jitter": spec.resolution_jitter} if spec.resolution_jitter > 1 else {}),
                       "seconds": round(time.perf_counter() - t0, 1)}
    save_checkpoint(out, model, model_spec)
    return {"parameters": sum(v.numel() for v in model.parameters()),
            "final_loss": float(np.mean(losses[-spec.steps_per_epoch:])), "losses": losses}


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Soft Dice over foreground classes, ignoring pixels labelled NODATA."""
    ok = (target != NODATA).unsqueeze(1)
    prob = torch.softmax(logits, dim=1) * ok
    onehot = nn.functional.one_hot(target.clamp(max=n_classes - 1), n_classes).permute(0, 3, 1, 2) * ok
    inter = (prob * onehot).sum(dim=(0, 2, 3))[1:]
    denom = (prob + onehot).sum(dim=(0, 2, 3))[1:]
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


def train_from_files(image: str | Path, labels: str | Path, out: str | Path, spec: TrainSpec,
                     bands: list[int] | None = None, class_names: list[str] | None = None,
                     workdir: str | Path | None = None, binarize: bool = False,
                     remap: dict[int, int] | None = None) -> dict[str, Any]:
    """Ingest image + labels into Zarr (in ``workdir`` or a temporary folder) and train."""
    names = class_names or ["background", "foreground"]
    with tempfile.TemporaryDirectory() as tmp, Client(processes=False, n_workers=1, threads_per_worker=2,
                                                      dashboard_address=LOOPBACK) as client:
        scene = prepare_store(image, labels, Path(workdir or tmp) / "train", bands, client, len(names), binarize,
                              remap)
        return train_on_store(scene, out, spec, names)
