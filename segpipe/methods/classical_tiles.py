"""Classical methods on one worker: each tile read with its halo, its core's class map written directly.

Kept apart from the model code so that workers of a classical job never import torch (start-up and
memory of every worker process).

An image's class map is stored in Zarr v3 shards of a band of tile rows (:func:`class_shards`), and its tiles are
marked done one shard at a time: with small tiles a chunk and a mark per tile made most of a run's objects
(3 per 64-px tile) and S3 requests. Every shard is written by one task only (the segment stage hands out whole
shards, :func:`shard_groups`), so shards need no lock; a task killed in a shard leaves it unmarked, and the
rerun writes all of its tiles again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.geometry import Box, Index
from segpipe.io.result import NODATA, SEGMENT_STAGE, class_outputs
from segpipe.io.scene import Scene
from segpipe.io.store import Marks
from segpipe.methods.classical import make_classical
from segpipe.tiling.grid import BAND_PIXELS, TileGrid, TileRun, band_rows

if TYPE_CHECKING:
    import zarr

# Pixels (tile cores) read and written at once: enough to amortise a read and a Zarr write over many small
# tiles, little enough that a run's float32 bands stay in tens of MB on any tile size.
RUN_PIXELS = 2**20


# Pixels of one shard of a classical result's class map at most (uint8: as many bytes): a band of whole tile rows
# on scenes up to 16 Mpx / tile size wide, so that shards stay few without one task's writes growing with the scene.
SHARD_PIXELS = 2**24


def class_shards(shape: Index, tile_size: int, chunk: int | None = None) -> tuple[int, int] | None:
    """Shards of an image's class map for a classical method: a band of tile rows
    (:func:`segpipe.tiling.grid.band_rows`), as many tiles across as fit :data:`SHARD_PIXELS`; None for volumes,
    and where tiles are not whole ``chunk``s (a 900-px tile on 512-px chunks): a shard holds whole chunks, and it
    would then hold parts of other units' tiles (``chunk`` None: the tile is taken to be whole chunks)."""
    if len(shape) != 2 or (chunk is not None and tile_size % chunk):
        return None
    across = min(-(-shape[1] // tile_size), max(1, SHARD_PIXELS // tile_size**2))
    rows = band_rows(-(-shape[0] // tile_size), tile_size * shape[1],
                     most=max(1, SHARD_PIXELS // (tile_size * across * tile_size)))
    return (rows * tile_size, across * tile_size)


def shard_of(tgrid: TileGrid, shards: tuple[int, ...] | None) -> Callable[[Index], tuple[int, ...]] | None:
    """The shard of the class map that a tile's core lies in, as a key; None where the map has no shards."""
    if shards is None:
        return None
    return lambda index: tuple(a // s for a, s in zip(tgrid.tile(index).core.start, shards, strict=True))


def shard_groups(tgrid: TileGrid, tiles: list[Index], shards: tuple[int, ...] | None) -> list[list[Index]]:
    """``tiles`` (in grid order) cut where their shard changes: the groups a unit of work must take whole, so no
    two tasks ever write one shard. Without shards, each tile is its own group."""
    key = shard_of(tgrid, shards)
    groups: list[list[Index]] = []
    for index in tiles:
        if key is not None and groups and key(groups[-1][-1]) == key(index):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def tile_runs(tgrid: TileGrid, tiles: list[Index], max_pixels: int = RUN_PIXELS,
              shard: Callable[[Index], tuple[int, ...]] | None = None) -> list[list[Index]]:
    """Consecutive tiles of one tile row (columns adjacent) in runs of at most ``max_pixels`` of core, each
    within one shard (``shard``: a tile's shard key, :func:`shard_of`)."""
    runs: list[list[Index]] = []
    area = 0
    for index in tiles:
        last = runs[-1][-1] if runs else None
        size = tgrid.tile(index).core.shape
        pixels = int(np.prod(size))
        joins = (last is not None and last[:-1] == index[:-1] and last[-1] + 1 == index[-1]
                 and area + pixels <= max_pixels and (shard is None or shard(last) == shard(index)))
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
    those of a tile read alone. The tiles are marked done together when their shard is written (a class map
    without shards: when their run is), in one batch mark (:meth:`segpipe.io.store.Marks.mark_all`).
    """
    m = make_classical(method, params)
    scene = Scene(run_of.scene)
    tgrid = run_of.grid
    out, prob = class_outputs(run_of.result)
    marks = Marks(run_of.result, SEGMENT_STAGE)
    shard = shard_of(tgrid, out.shards)
    runs = tile_runs(tgrid, list(run_of.indices), shard=shard)
    finished: list[str] = []
    held: list[tuple[Box, np.ndarray]] = []  # the current shard's class pixels, written once it is complete
    band: tuple[Box, np.ndarray, np.ndarray] | None = None  # the current shard's scene pixels, where read at once
    for k, run in enumerate(runs):
        first, last = tgrid.tile(run[0]).core, tgrid.tile(run[-1]).core
        core = Box(first.start, last.stop)
        span = core.grow(m.halo, scene.shape)
        if shard is not None and (k == 0 or shard(runs[k - 1][0]) != shard(run[0])):
            band = _band_read(scene, tgrid, [r for r in runs[k:] if shard(r[0]) == shard(run[0])], m.halo)
        if band is not None:
            where = span.relative_to(band[0])
            img, valid = band[1][(slice(None), *where)], band[2][where]
        else:
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
        if prob_run is not None:
            prob[(slice(None), *core.slices)] = prob_run
        held.append((core, cls_run))
        finished += [tgrid.tile(index).key for index in run]
        last_of_shard = shard is None or k + 1 == len(runs) or shard(runs[k + 1][0]) != shard(run[0])
        if last_of_shard:
            _write_class(out, held)
            held = []
            marks.mark_all(finished)
            finished = []
    return len(run_of.indices)


# Scene pixels read at once for one shard's runs at most: a band of tile rows (about BAND_PIXELS, up to twice that).
BAND_READ_PIXELS = 2 * BAND_PIXELS


def _band_read(scene: Scene, tgrid: TileGrid, runs: list[list[Index]], halo: int
               ) -> tuple[Box, np.ndarray, np.ndarray] | None:
    """The scene's pixels (as stored) and validity under all of one shard's ``runs`` with their halo, read in one
    call; None where that is more than :data:`BAND_READ_PIXELS` (each run is then read alone).

    Why: the scene is sharded in bands of rows too (:func:`segpipe.tiling.ingest.image_shards`), and a read of
    part of a shard fetches its chunks one by one (measured: a 64-row read of a 384-row shard costs 2.9x its
    share of a whole-shard read), so one read per band is what keeps bands of rows as cheap to read as rows."""
    cores = [tgrid.tile(i).core for r in runs for i in (r[0], r[-1])]
    whole = Box(tuple(int(v) for v in np.min([c.start for c in cores], axis=0)),
                tuple(int(v) for v in np.max([c.stop for c in cores], axis=0))).grow(halo, scene.shape)
    if int(np.prod(whole.shape)) > BAND_READ_PIXELS:
        return None
    img, valid = scene.read(whole, dtype=None)
    return whole, img, valid


def _write_class(out: zarr.Array, runs: list[tuple[Box, np.ndarray]]) -> None:
    """Write one shard's runs of class pixels: in one call where they fill a rectangle (a whole band of a shard,
    the usual case), since each write into a Zarr shard re-reads and re-encodes the shard; else run by run (a
    resumed shard with only some tiles to redo, whose other tiles must stay as they are)."""
    if len(runs) > 1:
        whole = Box(tuple(int(v) for v in np.min([c.start for c, _ in runs], axis=0)),
                    tuple(int(v) for v in np.max([c.stop for c, _ in runs], axis=0)))
        if sum(int(np.prod(c.shape)) for c, _ in runs) == int(np.prod(whole.shape)):
            block = np.empty(whole.shape, np.uint8)
            for core, values in runs:
                block[core.relative_to(whole)] = values
            out[whole.slices] = block
            return
    for core, values in runs:
        out[core.slices] = values
