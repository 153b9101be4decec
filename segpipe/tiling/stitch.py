"""Overlap-add blending of patch logits into the class map, one output tile per task.

The work store keeps each patch's logits relative to class 0 (C - 1 channels, see
:func:`create_logits_store`): softmax and arg-max are unchanged by adding one constant to every class
of a pixel, and the blend of the differences is the difference of the blends, so the class map is the
same while a 2-class model's scratch halves.

For every pixel, the contributions of the patches covering it are added in global patch order
with the same Gaussian weights, whatever tile the pixel belongs to: the blended logits, and so the
class map, are bit-identical for any tile size or worker count. Each tile writes only its own
whole chunks of the result, so no locks are needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from segpipe.geometry import Box, Index
from segpipe.io.result import NODATA, SEGMENT_STAGE, class_outputs
from segpipe.io.scene import Scene
from segpipe.io.store import Marks, ensure_array
from segpipe.tiling.grid import PatchGrid, TileGrid, TileRun, gaussian_importance
from segpipe.tiling.resample import ResampledScene, open_scene, resample, span_box

# Relative float16 logits are smooth: with the bytes of each value shuffled apart, Blosc's zstd at level 1
# stores them in ~70 % of the space at ~400 MB/s (measured on the demo U-Net's logits of the SpaceNet mosaic;
# plain zstd or lz4 saved nothing). Encoding all logits of a 6144² scene costs well under a second.
LOGITS_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
GRID_LOGITS = "grid_logits"  # a model run at its own resolution: blended logits on the model grid
GRID_STAGE = "grid"  # completion marks of the model grid's tiles (in the work store)


def create_logits_store(group: zarr.Group, grid: PatchGrid, n_classes: int) -> zarr.Array:
    """The work store's ``logits`` array: one chunk per patch, float16 logits of classes 1..C-1 minus class 0.

    An existing array of another shape (a store from a version that kept all C channels) is refused
    rather than misread.
    """
    nd = len(grid.shape)
    arr = ensure_array(group, "logits", (*grid.counts, n_classes - 1, *grid.size),
                       (*(1,) * nd, n_classes - 1, *grid.size), "float16", 0,
                       (*(f"patch_{a}" for a in "zyx"[-nd:]), "class", *(f"p{a}" for a in "zyx"[-nd:])),
                       compressors=LOGITS_CODEC)
    arr.attrs["relative_to_class"] = 0
    return arr


def blend_window(logits: zarr.Array, grid: PatchGrid, window: Box) -> np.ndarray:
    """Gaussian-weighted mean logits (C, *window.shape) over ``window``, class 0's being 0 everywhere."""
    g = gaussian_importance(grid.size)
    nd = len(grid.shape)
    n_classes = logits.shape[nd] + 1
    acc = np.zeros((n_classes, *window.shape), np.float32)
    wsum = np.zeros(window.shape, np.float32)
    for idx in grid.covering(window):
        pw = grid.window(idx)
        inter = pw.intersect(window)
        src = inter.relative_to(pw)
        dst = inter.relative_to(window)
        y = np.asarray(logits[(*idx, slice(None), *src)], dtype=np.float32)
        acc[(slice(1, None), *dst)] += y * g[src]
        wsum[dst] += g[src]
    return acc / wsum


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities (float32) from logits (class first), shifted by their maximum so exp never overflows."""
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


@dataclass(frozen=True)
class Decoding:
    """How blended network outputs, relative to class 0 as the work store keeps them, become classes and
    probabilities.

    Why: a graph may return logits (blended as logits, then softmax) or probabilities (it ends in its own sigmoid
    or softmax: blended as probabilities, never re-activated), and a binary model is cut at its authors'
    threshold, not always at 0.5. Blending is linear, so the relative values carry both: the class is the
    arg-max, except that class 1 of a binary model needs its relative value above ``cut``; the probabilities are
    the softmax of blended logits, or the blended probabilities themselves (class 0's recovered from their sum,
    which is 1).
    """

    space: str = "logits"  # "logits" or "probabilities"
    cut: float = 0.0  # binary models: class 1 where the relative value exceeds this
    multilabel: str | None = None  # several sigmoid channels: "priority" or "highest"
    cuts: tuple[float, ...] = ()  # multilabel: channel i is on where its value exceeds cuts[i]
    order: tuple[int, ...] = ()  # multilabel priority: channel indices, first wins

    @classmethod
    def of_card(cls, card: dict | None) -> Decoding:
        """From a model card (as :meth:`segpipe.models.card.ModelCard.spec` keeps it); the default without."""
        if not card:
            return cls()
        space, t = card.get("returns", "logits"), card.get("threshold", 0.5)
        if card.get("output") != "sigmoid":
            return cls(space)
        if card.get("multilabel"):  # channels (0, c_1 .. c_K) as they come: logit(t) or t
            k = int(card["n_classes"])
            ts = [float(v) for v in t] if isinstance(t, list) else [float(t)] * k
            cuts = tuple(float(np.log(v / (1 - v))) if space == "logits" else v for v in ts * (k // len(ts)))
            return cls(space, multilabel=card["multilabel"], cuts=cuts, order=tuple(card.get("priority") or range(k)))
        t = float(t[0] if isinstance(t, list) else t)
        # logits (0, z): z > log(t / (1 - t)) is sigmoid(z) > t; probabilities (1 - p, p): 2p - 1 > 2t - 1 is p > t
        return cls(space, float(np.log(t / (1 - t))) if space == "logits" else 2 * t - 1)

    def classes(self, rel: np.ndarray) -> np.ndarray:
        """The class of each pixel from relative values (C, ...) whose class 0 is 0."""
        if self.multilabel:
            return self._labels(rel[1:])
        if self.cut:
            return (rel[1] > self.cut).astype(np.uint8)
        return np.argmax(rel, axis=0).astype(np.uint8)

    def _labels(self, ch: np.ndarray) -> np.ndarray:
        """Multi-label: 0 where no channel is on, else 1 + the channel the rule picks among those on."""
        on = ch > np.asarray(self.cuts, ch.dtype).reshape(-1, *(1,) * (ch.ndim - 1))
        if self.multilabel == "highest":  # the same channel in logits or probabilities: sigmoid is monotone
            pick = np.argmax(np.where(on, ch, -np.inf), axis=0) + 1
            return np.where(on.any(axis=0), pick, 0).astype(np.uint8)
        cls = np.zeros(ch.shape[1:], np.uint8)
        for c in reversed(self.order):  # the first in order is written last and wins
            cls[on[c]] = c + 1
        return cls

    def probabilities(self, rel: np.ndarray) -> np.ndarray:
        """Per-class probabilities (C, ...) float32 from relative values whose class 0 is 0. Multi-label: each
        channel's own probability, and for class 0 the chance that none is on, their product of (1 - p)."""
        if self.multilabel:
            p = 1 / (1 + np.exp(-rel[1:].astype(np.float32))) if self.space == "logits" else rel[1:].astype(np.float32)
            return np.concatenate([np.prod(1 - p, axis=0, keepdims=True), p])
        if self.space == "logits":
            return softmax(rel)
        return rel + (1 - rel.sum(axis=0, keepdims=True)) / len(rel)


@dataclass(frozen=True)
class Stitching:
    """How a sliding window's patches are blended into tiles: the patch grid (``patch``, ``overlap``, and the
    model grid's ``scale`` where the model runs at its own pixel size), whether patches are freed once final,
    and whether the blend goes to the work store (``into_work``) rather than to the result's classes."""

    patch: int | Index
    overlap: float
    scale: tuple[float, ...] | None = None
    free: bool = False
    into_work: bool = False
    decoding: Decoding = Decoding()


def stitch_tiles(run: TileRun, how: Stitching, after: list | None = None) -> int:
    """Blend, take the arg-max class and write each tile's core; invalid pixels get nodata (see :class:`Stitching`).

    With ``how.free``, a patch is deleted from the work store once every tile it overlaps is marked final
    (each task marks its tile before looking at its neighbours', so of two neighbours finishing together
    at least one sees both marks). A tile already marked is skipped. ``after`` only makes Dask wait for
    the inference units this needs. With ``scale`` the patches lie on the model grid
    (:mod:`segpipe.tiling.resample`): the tiles are the model grid's and their blended logits go to the work
    store's ``grid_logits``, from which :func:`stitch_back_tiles` makes the scene's classes. ``into_work`` sends
    them there without ``scale`` too (a refinement pass, :mod:`segpipe.methods.crf`, makes the classes).
    """
    patch, overlap, scale, free = how.patch, how.overlap, how.scale, how.free
    scene = open_scene(run.scene, scale)
    grid = PatchGrid(scene.shape, patch, overlap)
    tgrid = run.grid  # the scene's, or the model grid's (``run.shape`` is then the model grid's)
    logits = zarr.open_array(run.work, path="logits", mode="r+" if free else "r")
    into_work = how.into_work or scale is not None
    if not into_work:
        out, prob = class_outputs(run.result)
        marks = Marks(run.result, SEGMENT_STAGE)
    else:
        out, prob = zarr.open_array(run.work, path=GRID_LOGITS, mode="r+"), None
        marks = Marks(run.work, GRID_STAGE)
    for index in run.indices:
        tile = tgrid.tile(index)
        if marks.done(tile.key):  # final already: a task Dask reruns after a lost worker must not redo it,
            continue  # since with ``free`` the patches it was made from may be gone
        blended = blend_window(logits, grid, tile.core)
        if not into_work:
            write_classes(out, prob, tile.core.slices, blended, scene.valid_in(tile.core.slices), how.decoding)
        else:
            out[(slice(None), *tile.core.slices)] = blended[1:].astype(np.float16)
        marks.mark(tile.key)
        if free:
            for idx in grid.covering(tile.core):
                if all(marks.done(t.key) for t in tgrid.overlapping(grid.window(idx))):
                    logits[idx] = 0  # a chunk equal to the fill value is deleted by Zarr
    return len(run.indices)


def write_classes(out: zarr.Array, prob: zarr.Array | None, where: tuple[slice, ...], logits: np.ndarray,
                  valid: np.ndarray, decoding: Decoding = Decoding()) -> None:  # noqa: B008 - frozen, shared
    """The class (nodata where invalid) and, when asked, the probabilities of a window's blended outputs."""
    cls = decoding.classes(logits)
    out[where] = np.where(valid, cls, NODATA).astype(np.uint8)
    if prob is not None:
        prob[(slice(None), *where)] = np.where(valid, decoding.probabilities(logits), np.nan).astype(np.float16)


def create_grid_logits(group: zarr.Group, shape: tuple[int, ...], n_classes: int, tile_size: int) -> zarr.Array:
    """The work store's blended logits on the model grid (classes 1..C-1 minus class 0), one chunk per tile."""
    nd = len(shape)
    return ensure_array(group, GRID_LOGITS, (n_classes - 1, *shape), (n_classes - 1, *(tile_size,) * nd),
                        "float16", 0, ("class", *"zyx"[-nd:]), compressors=LOGITS_CODEC)


def model_tiles_for(view: ResampledScene, tile_size: int, scene_tiles: list[Index]) -> list[Index]:
    """The model-grid tiles whose logits the given scene tiles are resampled from (both grids in ``tile_size``)."""
    back = view.back_axes()
    mgrid, sgrid = TileGrid(view.shape, tile_size), TileGrid(view.scene.shape, tile_size)
    needed = {t.index for index in scene_tiles for t in mgrid.overlapping(span_box(back, sgrid.tile(index).core))}
    return sorted(needed)


def window_logits(grid_logits: zarr.Array, view: ResampledScene | None, window: Box) -> np.ndarray:
    """Blended logits (relative to class 0, float32) of a scene window from the work store's ``grid_logits``,
    resampled back from the model grid when the model ran at its own resolution (``view``; window-independent
    per pixel, see :mod:`segpipe.tiling.resample`; logits of invalid model-grid pixels have no weight)."""
    if view is None:
        return np.asarray(grid_logits[(slice(None), *window.slices)], np.float32)
    back = view.back_axes()
    src = span_box(back, window)
    rel = np.asarray(grid_logits[(slice(None), *src.slices)], np.float32)
    values, _ = resample(rel, view.valid_in(src.slices), back, window, src)
    return values


def finish_scene_tiles(run: TileRun, logits_of: Callable[[Box], tuple[np.ndarray, np.ndarray]],
                       decoding: Decoding = Decoding()) -> int:  # noqa: B008 - frozen, shared
    """Classes (and probabilities when asked) of each scene tile of ``run`` from ``logits_of(core)``: its relative
    logits (C - 1, float32) and validity. A tile already marked is skipped; each is marked when written."""
    out, prob = class_outputs(run.result)
    marks = Marks(run.result, SEGMENT_STAGE)
    for tile in run.tiles():
        if marks.done(tile.key):
            continue
        rel, valid = logits_of(tile.core)
        logits = np.concatenate([np.zeros((1, *tile.core.shape), np.float32), rel])
        write_classes(out, prob, tile.core.slices, logits, valid, decoding)
        marks.mark(tile.key)
    return len(run.indices)


def stitch_back_tiles(run: TileRun, *, scale: tuple[float, ...],
                      decoding: Decoding = Decoding()) -> int:  # noqa: B008 - frozen, shared
    """Resample the model grid's blended logits onto each scene tile's core, then classes as :func:`stitch_tiles`.

    Every valid scene pixel has a valid model pixel among its taps (see :mod:`segpipe.tiling.resample`).
    """
    view = ResampledScene(Scene(run.scene), tuple(scale))
    grid_logits = zarr.open_array(run.work, path=GRID_LOGITS, mode="r")
    return finish_scene_tiles(run, lambda core: (window_logits(grid_logits, view, core),
                                                 view.scene.valid_in(core.slices)), decoding)
