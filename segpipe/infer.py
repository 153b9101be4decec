"""Segment one batch of tiles on one worker.

Patch models (the U-Net) run over the patches *owned* by each tile of the global patch grid and
write each patch's raw logits to the work store (one chunk per patch, so writes never collide);
:mod:`segpipe.stitch` blends them. The model is loaded once per worker process and cached. Reading
the next batch from Zarr overlaps with the model's forward pass on the current one.
Classical methods run per tile with a halo and write the tile core's class map directly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import zarr
from distributed import get_worker

from segpipe.grid import Box, Index, PatchGrid, TileGrid
from segpipe.io.store import Marks
from segpipe.models.checkpoint import ModelSpec, load_model
from segpipe.models.classical import make_classical
from segpipe.models.unet import UNet
from segpipe.scene import Scene

NODATA_CLASS = 255
INFER_STAGE = "infer"
SEGMENT_STAGE = "segment"
_lock = threading.Lock()


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=4)
def _cached(path: str, device: str) -> tuple[UNet, ModelSpec]:
    try:  # torch's own threads default to every core; a worker should use only its share
        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except ValueError:
        pass  # not inside a Dask worker
    return load_model(path, device)


def worker_model(path: str) -> tuple[UNet, ModelSpec, str]:
    """This process's copy of the model, loaded on first use (one model per worker)."""
    device = device_name()
    with _lock:
        model, spec = _cached(path, device)
    return model, spec, device


def read_patches(scene: Scene, grid: PatchGrid, group: list[Index], spec: ModelSpec) -> np.ndarray:
    """Normalised patches (N, bands, *patch); invalid pixels become 0 (the band mean).

    Patches that differ only in their last index (a run along the columns) are cut from a single
    read of their union, so overlapping patches do not decode the same Zarr chunks again.
    Patches reaching past a short scene's edge are zero-padded.
    """
    lead = (slice(None),) + (None,) * len(grid.shape)
    mean = np.asarray(spec.mean, np.float32)[lead]
    std = np.asarray(spec.std, np.float32)[lead]
    whole = Box.of(scene.shape)
    out = np.zeros((len(group), scene.count, *grid.size), np.float32)
    for run in sorted({idx[:-1] for idx in group}):
        members = [(k, grid.window(idx)) for k, idx in enumerate(group) if idx[:-1] == run]
        union = Box(members[0][1].start[:-1] + (min(w.start[-1] for _, w in members),),
                    members[0][1].stop[:-1] + (max(w.stop[-1] for _, w in members),)).intersect(whole)
        img, valid = scene.read(union)
        x = np.where(valid[None], (img - mean) / std, 0.0)
        for k, w in members:
            part = x[(slice(None), *w.intersect(whole).relative_to(union))]
            out[(k, slice(None), *(slice(0, n) for n in part.shape[1:]))] = part
    return out


def with_valid_pixels(scene: Scene, grid: PatchGrid, patches: list[Index]) -> list[Index]:
    """The patches that hold at least one valid pixel, from one read of their union's validity.

    A patch with no valid pixel only covers pixels that end as nodata, so it is never computed.
    """
    if not patches:
        return []
    whole = Box.of(scene.shape)
    wins = [grid.window(idx).intersect(whole) for idx in patches]
    span = Box(tuple(min(c) for c in zip(*(w.start for w in wins), strict=True)),
               tuple(max(c) for c in zip(*(w.stop for w in wins), strict=True)))
    valid = np.asarray(scene.valid[span.slices]) > 0
    return [idx for idx, w in zip(patches, wins, strict=True) if valid[w.relative_to(span)].any()]


def _batches(items: list, size: int) -> Iterator[list]:
    for k in range(0, len(items), size):
        yield items[k:k + size]


def forward(model: UNet, batch: np.ndarray, device: str, batch_size: int) -> np.ndarray:
    """Logits for a batch, padded to a fixed ``batch_size`` so every call has the same shape."""
    n = batch.shape[0]
    if n < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
    with torch.inference_mode():
        x = torch.from_numpy(batch).to(device, non_blocking=True)
        if device == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                y = model(x)
        else:
            y = model(x)
        return y.float().cpu().numpy()[:n]


def infer_tiles(scene_path: str, work_path: str, model_path: str, patch: int | Index, overlap: float,
                batch_size: int, tile_size: int, tiles: list[Index]) -> int:
    """Compute and store the logits of every patch owned by ``tiles``; returns patches computed."""
    model, spec, device = worker_model(model_path)
    scene = Scene(scene_path)
    grid = PatchGrid(scene.shape, patch, overlap)
    tgrid = TileGrid(scene.shape, tile_size)
    logits = zarr.open_array(work_path, path="logits", mode="r+")
    marks = Marks(work_path, INFER_STAGE)
    count = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for index in tiles:
            tile = tgrid.tile(index)
            owned = with_valid_pixels(scene, grid, grid.owned_by(tile))
            groups = list(_batches(owned, batch_size))

            def load(group: list[Index]) -> np.ndarray:
                return read_patches(scene, grid, group, spec)

            pending = pool.submit(load, groups[0]) if groups else None
            for k, group in enumerate(groups):
                batch = pending.result()
                if k + 1 < len(groups):
                    pending = pool.submit(load, groups[k + 1])
                out = forward(model, batch, device, batch_size).astype(np.float16)
                for idx, y in zip(group, out, strict=True):
                    logits[idx] = y
                count += len(group)
            marks.mark(tile.key)
    return count


def segment_classical_tiles(scene_path: str, result_path: str, method: str, params: dict[str, Any],
                            state: dict[str, Any], tile_size: int, tiles: list[Index]) -> int:
    """Classical method on each tile (read with its halo), core written to the result store."""
    m = make_classical(method, params)
    scene = Scene(scene_path)
    tgrid = TileGrid(scene.shape, tile_size)
    out = zarr.open_array(result_path, path="class", mode="r+")
    marks = Marks(result_path, SEGMENT_STAGE)
    for index in tiles:
        tile = tgrid.tile(index)
        outer = tile.core.grow(m.halo, scene.shape)
        img, valid = scene.read(outer)
        cls = m.predict(img, valid, state)[tile.core.relative_to(outer)]
        cls = np.where(valid[tile.core.relative_to(outer)], cls, NODATA_CLASS).astype(np.uint8)
        out[tile.core.slices] = cls
        marks.mark(tile.key)
    return len(tiles)
