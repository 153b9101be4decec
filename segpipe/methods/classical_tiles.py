"""Classical methods on one worker: each tile read with its halo, its core's class map written directly.

Kept apart from the model code so that workers of a classical job never import torch (start-up and
memory of every worker process).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segpipe.geometry import Box, Index
from segpipe.io.result import NODATA, SEGMENT_STAGE, class_outputs
from segpipe.io.scene import Scene
from segpipe.io.store import Marks
from segpipe.methods.classical import make_classical
from segpipe.tiling.grid import TileGrid, TileRun

# Pixels (tile cores) read and written at once: enough to amortise a read and a Zarr write over many small
# tiles, little enough that a run's float32 bands stay in tens of MB on any tile size.
RUN_PIXELS = 2**20


def tile_runs(tgrid: TileGrid, tiles: list[Index], max_pixels: int = RUN_PIXELS) -> list[list[Index]]:
    """Consecutive tiles of one tile row (columns adjacent) in runs of at most ``max_pixels`` of core."""
    runs: list[list[Index]] = []
    area = 0
    for index in tiles:
        last = runs[-1][-1] if runs else None
        size = tgrid.tile(index).core.shape
        pixels = int(np.prod(size))
        joins = (last is not None and last[:-1] == index[:-1] and last[-1] + 1 == index[-1]
                 and area + pixels <= max_pixels)
        if joins:
            runs[-1].append(index)
            area += pixels
        else:
            runs.append([index])
            area = pixels
    return runs


def segment_classical_tiles(run_of: TileRun, *, method: str, params: dict[str, Any], state: dict[str, Any]) -> int:
    """Classical method on each tile (read with its halo), core written to the result store.

    Adjacent tiles of a row are read, and their cores written, in one call per run (:func:`tile_runs`):
    on small tiles the per-call cost of a read and a Zarr write was more than the method's own. Each tile
    still gets exactly the pixels of its own halo window, as a contiguous array, so its classes are
    those of a tile read alone.
    """
    m = make_classical(method, params)
    scene = Scene(run_of.scene)
    tgrid = run_of.grid
    out, prob = class_outputs(run_of.result)
    marks = Marks(run_of.result, SEGMENT_STAGE)
    for run in tile_runs(tgrid, list(run_of.indices)):
        first, last = tgrid.tile(run[0]).core, tgrid.tile(run[-1]).core
        core = Box(first.start, last.stop)
        span = core.grow(m.halo, scene.shape)
        img, valid = scene.read(span, dtype=None)  # as stored; each tile is made float32 on its own
        cls_run = np.empty(core.shape, np.uint8)
        prob_run = None if prob is None else np.empty((m.n_classes, *core.shape), np.float16)
        for index in run:
            tile = tgrid.tile(index)
            outer = tile.core.grow(m.halo, scene.shape)
            part = outer.relative_to(span)
            t_img = np.ascontiguousarray(img[(slice(None), *part)], dtype=np.float32)
            t_valid = np.ascontiguousarray(valid[part])
            inner = tile.core.relative_to(outer)
            where, ok = tile.core.relative_to(core), t_valid[inner]
            if prob_run is None:
                cls = m.predict(t_img, t_valid, state)[inner]
            else:  # memberships as probabilities; the class is their arg-max, as predict gives it
                u = m.memberships(t_img, t_valid, state)[(slice(None), *inner)]
                cls = np.argmax(u, axis=0).astype(np.uint8)
                prob_run[(slice(None), *where)] = np.where(ok[None], u, np.nan)
            cls_run[where] = np.where(ok, cls, NODATA)
        out[core.slices] = cls_run
        if prob_run is not None:
            prob[(slice(None), *core.slices)] = prob_run
        marks.mark_all([tgrid.tile(index).key for index in run])
    return len(run_of.indices)
