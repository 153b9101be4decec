"""Model inference on one worker: fixed batches of patches of the global patch grid.

The patches that hold a valid pixel are listed once, in global (row-major) order, and cut into batches
of ``batch_size``: a batch's content depends on the scene and the batch size only, never on the tile
size or the worker count, so its logits are the same however the work is split, and only the scene's
very last batch is padded. Batches span tile boundaries; consecutive patches of a row are cut from one
read of their union. Each batch writes its patches' logits (relative to class 0) to the work store
(one chunk per patch, so writes never collide) and leaves a completion mark; :mod:`segpipe.tiling.stitch`
blends them.
The model is loaded once per worker process and cached; :mod:`segpipe.methods.device_loop` feeds it (reading
ahead on CPU threads, pinned non-blocking copies, writes off the device's path on a GPU).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from distributed import get_worker

from segpipe.geometry import Box, Index
from segpipe.io.scene import Scene
from segpipe.io.store import Marks
from segpipe.methods.device_loop import READERS, BatchForward
from segpipe.models.checkpoint import ModelSpec
from segpipe.models.load import load_any
from segpipe.models.unet import UNet
from segpipe.tiling.grid import PatchGrid
from segpipe.tiling.patches import normalised
from segpipe.tiling.resample import ResampledScene, open_scene

if TYPE_CHECKING:
    from segpipe.methods.sliding_window import SlidingWindow

INFER_STAGE = "infer"
_lock = threading.Lock()


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=4)
def _cached(path: str, device: str) -> tuple[UNet, ModelSpec]:
    try:  # torch's own threads default to every core; a worker should use only its share
        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except ValueError:
        pass  # not inside a Dask worker
    # Denormal activations are slow on x86 CPUs; flushing them to zero changed no class here and made the
    # demo U-Net's forward pass on real patches about 6 % faster.
    torch.set_flush_denormal(True)
    return load_any(path, device)


def worker_model(path: str) -> tuple[UNet, ModelSpec, str]:
    """This process's copy of the model, loaded on first use (one model per worker)."""
    device = device_name()
    with _lock:
        model, spec = _cached(path, device)
    return model, spec, device


def read_patches(scene: Scene | ResampledScene, grid: PatchGrid, group: list[Index],
                 norm: dict[str, Any]) -> np.ndarray:
    """Normalised patches (N, bands, *patch); invalid pixels become 0 (the band mean).

    ``norm``: per band ``mean`` and ``std``, and ``clip`` ([low, high] per band, or None) applied first, as
    the client resolved them for the whole scene (:func:`segpipe.methods.segment.normalisation`).

    Patches that differ only in their last index (a run along the columns) are cut from a single
    read of their union, so overlapping patches do not decode the same Zarr chunks again.
    Patches reaching past a short scene's edge are zero-padded.
    """
    whole = Box.of(scene.shape)
    out = np.zeros((len(group), scene.count, *grid.size), np.float32)
    for run in sorted({idx[:-1] for idx in group}):
        members = [(k, grid.window(idx)) for k, idx in enumerate(group) if idx[:-1] == run]
        union = Box(members[0][1].start[:-1] + (min(w.start[-1] for _, w in members),),
                    members[0][1].stop[:-1] + (max(w.stop[-1] for _, w in members),)).intersect(whole)
        img, valid = scene.read(union)
        x = normalised(img, valid, norm)
        for k, w in members:
            part = x[(slice(None), *w.intersect(whole).relative_to(union))]
            out[(k, slice(None), *(slice(0, n) for n in part.shape[1:]))] = part
    return out


def batch_key(batch_size: int, k: int) -> str:
    """Completion-mark name of batch ``k``: batches of another size are other batches."""
    return f"b{batch_size}-{k}"


def infer_batches(window: SlidingWindow, scene_path: str, work_path: str,
                  batches: list[tuple[int, list[Index]]]) -> tuple[int, int]:
    """Compute, store and mark the logits of each ``(k, patches)`` batch.

    Returns the patches computed and the largest sub-batch that fitted on the device (``batch_size`` unless
    the device ran out of memory). Readers stay :data:`READERS` batches ahead of the device; on a GPU the
    writes go to a writer thread, and a batch's mark is left only after its logits are written. With
    ``window.scale`` the patches are read from the scene resampled to the model grid (:mod:`segpipe.tiling.resample`).
    """
    model, _, device = worker_model(window.model)
    scene = open_scene(scene_path, window.scale)
    grid = PatchGrid(scene.shape, window.patch, window.overlap)
    batch_size, norm = window.batch_size, window.norm
    logits = zarr.open_array(work_path, path="logits", mode="r+")
    marks = Marks(work_path, INFER_STAGE)
    done = marks.keys()  # a unit Dask reruns after a lost worker skips the batches already final
    batches = [(k, group) for k, group in batches if batch_key(batch_size, k) not in done]
    run = BatchForward(model, device, batch_size, len(grid.shape), window.mirror)
    ahead = READERS[run.kind]

    def load(group: list[Index]) -> tuple:
        return run.stage(read_patches(scene, grid, group, norm))

    def store(k: int, group: list[Index], out: np.ndarray) -> None:
        for idx, y in zip(group, out, strict=True):
            logits[idx] = y
        marks.mark(batch_key(batch_size, k))

    with ThreadPoolExecutor(max_workers=ahead) as readers, ThreadPoolExecutor(max_workers=1) as writer:
        staged = deque(readers.submit(load, group) for _, group in batches[:ahead])
        writes = []
        for n, (k, group) in enumerate(batches):
            batch = staged.popleft().result()
            if n + ahead < len(batches):
                staged.append(readers.submit(load, batches[n + ahead][1]))
            out = run(batch)
            if run.cuda:
                writes.append(writer.submit(store, k, group, out))
            else:
                store(k, group, out)
        for w in writes:
            w.result()
    return sum(len(group) for _, group in batches), run.micro
