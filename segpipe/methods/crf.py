"""CRF refinement of a model's blended logits: truncated dense-CRF mean field, exact per tile within its halo.

The model of Kraehenbuehl & Koltun (2011): unary = the model's -log softmax, pairwise = Potts compatibility
weighted by a bilateral kernel (position and image intensity) plus a spatial (smoothness) kernel, solved by
mean-field iterations. The fully connected CRF is not local: one pixel's answer depends on the whole scene,
so no tiling could reproduce it. Here the kernel is truncated to a disc of ``radius`` pixels; after ``T``
iterations a pixel depends only on unaries and image within ``T * radius``. Each tile is refined from a window
of its core grown by that halo (clipped at the scene's edge), and its core is what the same truncated mean
field over the whole scene gives.

Bit-identical, not only close: every value of a pixel is made by the same element-wise float32 operations,
in the same order, from the same inputs, whatever window holds it. Messages are summed offset by offset with
shifted array views (never ``sum`` over a spatial axis, whose pairwise summation depends on the length);
numpy's element-wise ``exp`` gives the same bits at any position of an array. Window pixels nearer the edge
than the halo are wrong in the tile's computation and are thrown away; neighbours outside the scene or
invalid have no weight in either computation.

Memory: one tile window (``(tile + 2 halo)^2``) of C - 1 logits, the image and a few work arrays; message
passing loops over the ``~pi radius^2 / 2`` offset pairs (each pair's weight serves both directions), so no
``(2r+1)^2`` kernel tensor is made. The pair weights of a window are kept across iterations when they fit in
:data:`WEIGHT_CACHE_BYTES`, else recomputed each iteration (the same bits either way).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

from segpipe.config import CRFSpec
from segpipe.geometry import Box, Index
from segpipe.io.scene import Scene
from segpipe.tiling.grid import TileGrid, TileRun
from segpipe.tiling.patches import normalised
from segpipe.tiling.resample import ResampledScene, span_box
from segpipe.tiling.stitch import GRID_LOGITS, finish_scene_tiles, window_logits

# Pair weights of a window are kept across iterations up to this size (a 512 tile with the default 30 px halo
# needs 73 MB); kept, they save about a third of the pass.
WEIGHT_CACHE_BYTES = 256 * 2**20

Pair = tuple[tuple[slice, slice], tuple[slice, slice], float, float]


def half_offsets(radius: int) -> list[tuple[int, int]]:
    """One offset ``(dy, dx)`` of each opposite pair in the disc ``dy^2 + dx^2 <= radius^2``, in a fixed order."""
    return [(dy, dx) for dy in range(radius + 1) for dx in range(-radius, radius + 1)
            if (dy > 0 or dx > 0) and dy * dy + dx * dx <= radius * radius]


def _pairs(shape: tuple[int, int], spec: CRFSpec) -> list[Pair]:
    """Per offset pair: the views of pixels ``i`` and ``j = i + d`` inside a window, and the kernel constants."""
    h, w = shape
    out = []
    for dy, dx in half_offsets(spec.radius):
        if dy >= h or abs(dx) >= w:
            continue
        si = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        sj = (slice(dy, h), slice(max(0, dx), w + min(0, dx)))
        d2 = dy * dy + dx * dx
        spatial = spec.w_spatial * math.exp(-d2 / (2 * spec.theta_gamma**2))
        out.append((si, sj, -d2 / (2 * spec.theta_alpha**2), spatial))
    return out


def _weight(image: np.ndarray, valid: np.ndarray | None, pair: Pair, spec: CRFSpec, k: np.ndarray,
            tmp: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """k(i, i + d) for every pixel pair of one offset, into ``k``: bilateral + spatial kernel, 0 where either
    pixel is invalid. ``tmp`` (float32) and ``ok`` (bool) are scratch of ``k``'s shape (see :func:`mean_field`)."""
    si, sj, alpha, spatial = pair
    np.subtract(image[0][si], image[0][sj], out=tmp)
    np.multiply(tmp, tmp, out=k)
    for band in image[1:]:  # bands in order: the same additions for every window
        np.subtract(band[si], band[sj], out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        k += tmp
    k *= np.float32(-0.5 / spec.theta_beta**2)
    k += np.float32(alpha)
    np.exp(k, out=k)
    k *= np.float32(spec.w_bilateral)
    k += np.float32(spatial)
    if valid is not None:  # x 1.0 and x 0.0 are exact
        np.logical_and(valid[si], valid[sj], out=ok)
        np.multiply(k, ok, out=k)
    return k


def _q_minus_q0(rel: np.ndarray) -> np.ndarray:
    """Q(l) - Q(0) for l = 1..C-1, with Q the softmax of logits relative to class 0 (class by class, in order)."""
    top = np.maximum(rel.max(axis=0), np.float32(0))  # max is exact: no order to keep
    e0 = np.exp(-top)
    e = np.exp(rel - top)
    total = e0.copy()
    for c in range(e.shape[0]):
        total += e[c]
    return (e - e0) / total


def mean_field(rel: np.ndarray, image: np.ndarray, valid: np.ndarray, spec: CRFSpec) -> np.ndarray:
    """Refined logits relative to class 0 (C - 1, h, w) after ``spec.iterations`` mean-field updates.

    ``rel``: the unary as logits relative to class 0 (the model's -log softmax up to a per-pixel constant);
    ``image``: (bands, h, w) normalised as the model sees it; ``valid``: pixels that take part.

    With Potts compatibility the update is ``Q_i(l) ~ exp(L_i(l) + sum_j k(i, j) Q_j(l))`` (the ``1 - Q``
    of Potts differs from ``-Q`` by a per-pixel constant, which softmax drops), so only the differences
    ``Q(l) - Q(0)`` need passing; the result's softmax is the last ``Q`` and its arg-max the class.

    The inner loop writes into preallocated buffers (``out=``): a Dask worker's allocator returns freed memory
    at once (``MALLOC_TRIM_THRESHOLD_``), so each window-sized temporary was a fresh memory map, and the page
    faults made the pass about three times slower on a worker than in one process.
    """
    rel = np.ascontiguousarray(rel, np.float32)
    image = np.where(valid, image, np.float32(0)).astype(np.float32)  # nodata values never enter a weight
    mask = None if np.all(valid) else np.asarray(valid, bool)
    pairs = _pairs(valid.shape, spec)
    kbuf, tmp, ok = np.empty(valid.shape, np.float32), np.empty(valid.shape, np.float32), np.empty(valid.shape, bool)

    def weight(pair: Pair, into: np.ndarray) -> np.ndarray:
        return _weight(image, mask, pair, spec, into, tmp[pair[0]], ok[pair[0]])

    size = 4 * sum((si[0].stop - si[0].start) * (si[1].stop - si[1].start) for si, *_ in pairs)
    weights = None
    if size <= WEIGHT_CACHE_BYTES:
        weights = [weight(p, np.empty((p[0][0].stop - p[0][0].start, p[0][1].stop - p[0][1].start), np.float32))
                   for p in pairs]
    out, msg, part = np.empty_like(rel), np.empty_like(rel), np.empty_like(rel)
    np.copyto(out, rel)
    for _ in range(spec.iterations):
        d = _q_minus_q0(out)
        msg.fill(0)
        for n, pair in enumerate(pairs):
            k = weights[n] if weights is not None else weight(pair, kbuf[pair[0]])
            si, sj = (slice(None), *pair[0]), (slice(None), *pair[1])
            np.multiply(k, d[sj], out=part[si])  # i hears j = i + d ...
            msg[si] += part[si]
            np.multiply(k, d[si], out=part[sj])  # ... and j hears i, with the same pair weight
            msg[sj] += part[sj]
        np.add(rel, msg, out=out)
    return out


def unary_tiles(view: Scene | ResampledScene, scene_shape: tuple[int, ...], tile_size: int,
                scene_tiles: list[Index], halo: int) -> list[Index]:
    """The tiles of blended logits (work store, on ``view``'s grid) that refining ``scene_tiles`` reads: each
    core grown by ``halo``, and on the model grid when the model runs at its own resolution."""
    sgrid, mgrid = TileGrid(scene_shape, tile_size), TileGrid(view.shape, tile_size)
    needed = set()
    for index in scene_tiles:
        box = sgrid.tile(index).core.grow(halo, scene_shape)
        if isinstance(view, ResampledScene):
            box = span_box(view.back_axes(), box)
        needed.update(t.index for t in mgrid.overlapping(box))
    return sorted(needed)


def refine_tiles(run: TileRun, *, params: dict[str, Any], norm: dict[str, Any],
                 scale: tuple[float, ...] | None = None) -> int:
    """Refine each tile from its window (core + halo) of blended logits and image; write its core's classes
    (and probabilities when the result has them) and mark it. A tile already marked is skipped."""
    spec = CRFSpec.model_validate(params)
    scene = Scene(run.scene)
    view = None if scale is None else ResampledScene(scene, tuple(scale))
    grid_logits = zarr.open_array(run.work, path=GRID_LOGITS, mode="r")

    def refined(core: Box) -> tuple[np.ndarray, np.ndarray]:
        outer = core.grow(spec.halo, scene.shape)
        img, valid = scene.read(outer)
        rel = mean_field(window_logits(grid_logits, view, outer), normalised(img, valid, norm), valid, spec)
        inner = core.relative_to(outer)
        return rel[(slice(None), *inner)], valid[inner]

    return finish_scene_tiles(run, refined)
