"""Region split-and-merge (Horowitz & Pavlidis) that is exact across tiles.

Split: the scene is cut into root blocks of ``block`` pixels on a lattice fixed to the scene's origin
(never to the tiles), and each block is split into quadrants, recursively, until its grey values are
homogeneous (max - min <= ``threshold``) or it is ``min_block`` pixels wide. Merge: two leaves that share an
edge are joined when their union is homogeneous too (the max and min of the pair); regions are the
connected sets of joined leaves. Each region takes the class of its mean grey value under the scene's
(multi-)Otsu thresholds, so a pixel is classed by the homogeneous region it lies in rather than by its
own value (noise inside a region does not flip it).

Why this definition of merge: the classic merge joins regions one after another, and whether a third leaf
may join depends on which two were joined first, i.e. on the visiting order, which a tiling would change.
Joining adjacent *leaf pairs* and taking connected components is order-free: a region is the same whatever
order or tiles it is found in. The price is documented: a region is connected through homogeneous pairs,
so its whole range may exceed ``threshold`` (a slow gradient chains into one region), as in single-linkage.

Exactness: every leaf lies inside one root block and depends only on that block's pixels, so a tile reads
its core grown outward to the root lattice and finds the same leaves. Grey values are quantised to
integers (:data:`LEVELS` steps across the scene's 1st..99th percentile range) before anything else, so
every min, max and region sum is an exact integer, whatever order tiles add them in. Leaves are named by
their first pixel (a scene-wide flat index), so a leaf cut by a tile border has one name in both tiles.
Regions cross tiles without bound, so, like region growing (:mod:`segpipe.methods.regions`), each tile
joins the leaves of its own core (pass 1, on workers), the client joins components across tile faces and
by shared leaves (:func:`segpipe.tiling.unionfind.merge_pairs`) and classes each region, and each tile
paints its core from a lookup (pass 2). The client holds only the components that touch a tile border:
a region inside one tile is classed on its worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from distributed import Client
from pydantic import BaseModel, ConfigDict, Field, model_validator

from segpipe import progress
from segpipe.geometry import Box, Index
from segpipe.io.result import record_fit
from segpipe.io.scene import Scene
from segpipe.io.store import ensure_array
from segpipe.methods.classical import otsu_thresholds, typed_params
from segpipe.methods.regions import label_merge_paint
from segpipe.tiling.grid import TileTask
from segpipe.tiling.stats import SceneStats, grey
from segpipe.tiling.unionfind import merge_pairs

# Quantisation steps across the scene's 1st..99th percentile grey range: far finer than any threshold a
# person sets (1/65536 of the range), coarse enough that a region's sum of steps is an exact int64.
LEVELS = 2**16
_FAR = np.iinfo(np.int64).max // 4  # min/max fill for invalid pixels: never the min or max of a valid one


class SplitMergeParams(BaseModel):
    """Parameters of ``split_merge``, checked before anything is written."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.1, ge=0.0, le=1.0, description="homogeneity: max - min of grey within a block "
                                                              "(or a joined pair), as a fraction of the scene's "
                                                              "1st..99th percentile range")
    block: int = Field(64, ge=2, le=1024, description="root block edge (a power of two), on the scene's lattice")
    min_block: int = Field(2, ge=1, description="smallest block edge (a power of two): split no further")
    classes: int = Field(2, ge=2, le=254, description="region means classed by (multi-)Otsu thresholds")

    @model_validator(mode="after")
    def _powers_of_two(self) -> SplitMergeParams:
        for name in ("block", "min_block"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"{name} must be a power of two (got {v})")
        if self.min_block > self.block:
            raise ValueError(f"min_block {self.min_block} is larger than block {self.block}")
        return self


def check_params(params: dict[str, Any]) -> SplitMergeParams:
    """The typed parameters, or one :class:`InputError` line naming the first problem."""
    return typed_params("split_merge", SplitMergeParams, params)


@dataclass(frozen=True)
class Levels:
    """The scene-wide quantisation and class thresholds, in integer steps (see :data:`LEVELS`)."""

    lo: float
    hi: float
    threshold: int  # homogeneity bound, steps
    class_bounds: tuple[float, ...]  # region mean (steps) above bound k is of class k + 1

    @classmethod
    def of(cls, stats: SceneStats, p: SplitMergeParams) -> Levels:
        lo, hi = stats.grey_quantile(0.01), stats.grey_quantile(0.99)
        span = max(hi - lo, 1e-12)
        bounds = tuple((t - lo) / span * LEVELS for t in otsu_thresholds(stats, p.classes))
        return cls(lo, hi, int(np.floor(p.threshold * LEVELS)), bounds)

    def quantise(self, img: np.ndarray) -> np.ndarray:
        """Grey as integer steps; element-wise, so a pixel's value never depends on its window."""
        g = (grey(img).astype(np.float64) - self.lo) / max(self.hi - self.lo, 1e-12)
        return np.rint(g * LEVELS).astype(np.int64)

    def classes(self, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Class of regions from their exact step sums and pixel counts (as Otsu: a mean on a bound is below)."""
        means = sums / np.maximum(counts, 1)
        return np.digitize(means, self.class_bounds, right=True).astype(np.uint8)


def lattice_window(core: Box, block: int, shape: tuple[int, ...]) -> Box:
    """``core`` grown outward to whole root blocks (clipped to the scene): the pixels its leaves need."""
    start = tuple(s // block * block for s in core.start)
    stop = tuple(min(-(-e // block) * block, n) for e, n in zip(core.stop, shape, strict=True))
    return Box(start, stop)


def quadtree_leaves(q: np.ndarray, valid: np.ndarray, origin: tuple[int, int], width: int,
                    p: SplitMergeParams, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of a lattice-aligned window: its leaf's name (first pixel, flat scene index), min and max.

    Level by level from the root blocks down: a block still open is a leaf when its valid values span at
    most ``threshold`` steps (or it has none, or it is ``min_block`` wide), else its quadrants stay open.
    The window is padded with invalid pixels to whole root blocks, as the scene's edge clips them.
    """
    b = p.block
    h, w = q.shape
    hp, wp = -(-h // b) * b, -(-w // b) * b
    qmin = np.full((hp, wp), _FAR, np.int64)
    qmax = np.full((hp, wp), -_FAR, np.int64)
    qmin[:h, :w] = np.where(valid, q, _FAR)
    qmax[:h, :w] = np.where(valid, q, -_FAR)
    out = np.zeros((3, hp, wp), np.int64)  # per pixel: leaf name, leaf min, leaf max
    open_ = np.ones((hp // b, wp // b), bool)
    s = b
    while True:
        nr, nc = hp // s, wp // s
        bmin = qmin.reshape(nr, s, nc, s).min(axis=(1, 3))
        bmax = qmax.reshape(nr, s, nc, s).max(axis=(1, 3))
        leaf = open_ & ((bmax - bmin <= threshold) | (bmax < bmin) | (s <= p.min_block))
        first = (origin[0] + np.arange(nr)[:, None] * s) * width + origin[1] + np.arange(nc)[None] * s
        mine = np.repeat(np.repeat(leaf, s, axis=0), s, axis=1)
        out[:, mine] = np.repeat(np.repeat(np.stack([first, bmin, bmax]), s, axis=1), s, axis=2)[:, mine]
        open_ = open_ & ~leaf
        if not open_.any():
            break
        open_ = np.repeat(np.repeat(open_, 2, axis=0), 2, axis=1)
        s //= 2
    name, lmin, lmax = out[:, :h, :w]
    return name, lmin, lmax


def joined(amin: np.ndarray, amax: np.ndarray, bmin: np.ndarray, bmax: np.ndarray, threshold: int) -> np.ndarray:
    """Whether adjacent leaves join: their union is homogeneous."""
    return np.maximum(amax, bmax) - np.minimum(amin, bmin) <= threshold


@dataclass
class TileRegions:
    """Pass 1 of one tile: its components' classes where final, what the client needs for the others.

    ``border`` lists the local components touching the core's edge with their step sums and counts (only
    those can continue in another tile); ``shared`` maps leaves cut by the core's edge to their component;
    the edge lines carry, per pixel, component, leaf name, leaf min and max (component 0 = invalid).
    """

    n: int
    classes: np.ndarray  # (n + 1,) uint8 lookup for the tile's components; border ones are set by the client
    border: np.ndarray  # (k,) local component labels
    border_sums: np.ndarray
    border_counts: np.ndarray
    shared_leaves: np.ndarray  # leaf names cut by the core's edge
    shared_labels: np.ndarray  # their local component
    edges: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # side -> (label, name, min, max)


def _local_components(name: np.ndarray, lmin: np.ndarray, lmax: np.ndarray, valid: np.ndarray,
                      threshold: int) -> tuple[np.ndarray, int]:
    """Label (1..n, 0 invalid) of each pixel's component of joined leaves within the core."""
    leaves, node = np.unique(name[valid], return_inverse=True)
    idx = np.full(name.shape, -1, np.int64)
    idx[valid] = node
    pairs = [np.zeros((0, 2), np.int64)]
    for a, b, sl_a, sl_b in ((idx[:, :-1], idx[:, 1:], (slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                             (idx[:-1], idx[1:], (slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        ok = (a >= 0) & (b >= 0) & (a != b)
        ok &= joined(lmin[sl_a], lmax[sl_a], lmin[sl_b], lmax[sl_b], threshold)
        pairs.append(np.stack([a[ok], b[ok]], axis=1) + 1)
    component = merge_pairs(len(leaves), np.concatenate(pairs))  # leaf node (1-based) -> component 1..n
    labels = np.zeros(name.shape, np.uint32)
    labels[valid] = component[node + 1]
    return labels, int(component.max()) if len(leaves) else 0


def _split_tile(task: TileTask, *, params: dict[str, Any], levels: Levels) -> TileRegions:
    """Pass 1: leaves of the tile's root blocks, components of joined leaves in its core (stored as labels)."""
    p = SplitMergeParams.model_validate(params)
    core, scene = task.core, Scene(task.scene)
    window = lattice_window(core, p.block, task.shape)
    img, valid_w = scene.read(window)
    q_w = levels.quantise(img)
    name, lmin, lmax = quadtree_leaves(q_w, valid_w, window.start, task.shape[1], p, levels.threshold)
    inner = core.relative_to(window)
    q, valid, name, lmin, lmax = q_w[inner], valid_w[inner], name[inner], lmin[inner], lmax[inner]
    labels, n = _local_components(name, lmin, lmax, valid, levels.threshold)
    zarr.open_array(task.work, path="labels", mode="r+")[core.slices] = labels
    counts = np.bincount(labels[valid], minlength=n + 1).astype(np.int64)
    sums = np.zeros(n + 1, np.int64)
    np.add.at(sums, labels[valid], q[valid])  # integers: exact in any order
    classes = levels.classes(sums, counts)
    classes[0] = 0
    edge = np.zeros(labels.shape, bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    # A leaf reaching past the core has pixels on its edge line (valid or not): it may hold valid pixels in
    # another tile that no face pair connects, so components are also joined through it by name.
    cut = np.isin(name, np.unique(name[edge])) & valid
    shared_leaves, at = np.unique(name[cut], return_index=True)
    shared_labels = labels[cut][at]
    border = np.union1d(labels[edge & valid], shared_labels).astype(np.int64)
    sides = {"top": np.s_[0, :], "bottom": np.s_[-1, :], "left": np.s_[:, 0], "right": np.s_[:, -1]}
    edges = {k: tuple(np.ascontiguousarray(a[sl]) for a in (labels, name, lmin, lmax)) for k, sl in sides.items()}
    return TileRegions(n, classes, border, sums[border], counts[border], shared_leaves,
                       shared_labels.astype(np.int64), edges)


def merge_regions(parts: dict[tuple[int, ...], TileRegions], levels: Levels) -> dict[tuple[int, ...], np.ndarray]:
    """Per tile, its class lookup with the border components classed from their scene-wide regions.

    Nodes are the tiles' border components only; they are joined across tile faces (valid facing pixels of
    one leaf, or of two leaves that join) and through leaves that several tiles hold.
    """
    order = sorted(parts)
    node_of: dict[tuple[int, ...], np.ndarray] = {}  # per tile: local label -> node (1-based; 0 = not a node)
    total = 0
    for key in order:
        part = parts[key]
        node_of[key] = np.zeros(part.n + 1, np.int64)
        node_of[key][part.border] = np.arange(total + 1, total + 1 + len(part.border))
        total += len(part.border)
    pairs: list[np.ndarray] = [np.zeros((0, 2), np.int64)]

    for key in order:
        for other_key, mine, theirs in (((key[0], key[1] + 1), "right", "left"),
                                        ((key[0] + 1, key[1]), "bottom", "top")):
            if other_key not in parts:
                continue
            la, na, mina, maxa = parts[key].edges[mine]
            lb, nb, minb, maxb = parts[other_key].edges[theirs]
            ok = (la > 0) & (lb > 0) & ((na == nb) | joined(mina, maxa, minb, maxb, levels.threshold))
            pairs.append(np.stack([node_of[key][la[ok]], node_of[other_key][lb[ok]]], axis=1))
    by_leaf: dict[int, int] = {}
    for key in order:
        part = parts[key]
        for leaf, label in zip(part.shared_leaves.tolist(), part.shared_labels.tolist(), strict=True):
            mine = int(node_of[key][label])
            first = by_leaf.setdefault(leaf, mine)
            if first != mine:
                pairs.append(np.array([[first, mine]], np.int64))
    region = merge_pairs(total, np.concatenate(pairs)).astype(np.int64)
    n_regions = int(region.max()) if total else 0
    sums, counts = np.zeros(n_regions + 1, np.int64), np.zeros(n_regions + 1, np.int64)
    for key in order:
        part = parts[key]
        ids = region[node_of[key][part.border]]
        np.add.at(sums, ids, part.border_sums)
        np.add.at(counts, ids, part.border_counts)
    region_class = levels.classes(sums, counts)
    out = {}
    for key in order:
        part = parts[key]
        lookup = part.classes.copy()
        lookup[part.border] = region_class[region[node_of[key][part.border]]]
        out[key] = lookup
    return out


def split_and_merge(scene: Scene, stats: SceneStats, work_group: zarr.Group, work_path: str, result_path: str,
                    tile_size: int, params: dict[str, Any], client: Client, pending: list[Index],
                    advance: progress.Advance | None = None) -> None:
    """Both passes of tile-exact split-and-merge into ``result_path``'s ``class`` array."""
    p = check_params(params)
    levels = Levels.of(stats, p)
    record_fit(result_path, {**asdict(levels), "levels": LEVELS})
    ensure_array(work_group, "labels", scene.shape, (scene.chunk, scene.chunk), "uint32", 0, ("y", "x"))
    tasks = TileTask.each(scene.shape, tile_size, scene=scene.path, result=result_path, work=work_path)
    label_merge_paint(client, tasks, _split_tile, lambda parts: merge_regions(parts, levels), pending, advance,
                      params=p.model_dump(), levels=levels)
