"""Tile geometry for 2-D and 3-D: one global patch grid and a tile partition on top of it.

Why two grids: inference patches overlap and must lie on a single scene-wide grid so that the
stitched answer does not depend on how the scene is split into tiles. Tiles are chunk-aligned
blocks of the output; they decide *who* writes what, never *what* is computed: patches are computed
once each, in fixed batches cut from the global grid (:mod:`segpipe.methods.infer`), and each output tile is
written by exactly one task.
Everything here works on any number of spatial axes; the last two are rows and columns.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from affine import Affine

from segpipe.geometry import Box, Index


def patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one axis: a regular stride, the last patch flush with the end.

    Scenes shorter than one patch get a single origin at 0 (the patch is padded when read), the
    same rule as MONAI's dense patch slicing.
    """
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch, stride))
    starts.append(length - patch)
    return sorted(set(starts))


# A band of rows (of chunks or of tiles) is what one store shard, one completion mark and one task hold on an image:
# enough rows for about this many pixels, so that small tiles on wide scenes leave few objects (a shard and a mark
# per row of 64-px tiles made 3 objects per MB of class map at 10^5 tiles), but never fewer than MIN_BANDS bands,
# so that a small scene still gives every worker work.
BAND_PIXELS = 2**22
MIN_BANDS = 16


def band_rows(rows: int, row_pixels: int, most: int = 2**31) -> int:
    """Rows per band for ``rows`` rows of ``row_pixels`` pixels each: enough for :data:`BAND_PIXELS`, at most
    ``rows // MIN_BANDS`` and ``most``, at least one. A function of the grid alone, so a scene's stores have the
    same layout for any worker count."""
    return max(1, min(-(-BAND_PIXELS // max(1, row_pixels)), rows // MIN_BANDS, most))


def _per_axis(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (int(value),) * ndim


@dataclass(frozen=True)
class Tile:
    """One output tile: its index in the tile grid and its core box."""

    index: Index
    core: Box

    @property
    def key(self) -> str:
        return "_".join(map(str, self.index))

    @property
    def row(self) -> int:
        return self.index[-2]

    @property
    def col(self) -> int:
        return self.index[-1]

    def transform(self, scene_transform: Affine) -> Affine:
        """Affine of this tile's core (2-D), so a tile can be georeferenced on its own."""
        return scene_transform @ Affine.translation(self.core.col0, self.core.row0)


@dataclass(frozen=True)
class TileGrid:
    """Chunk-aligned partition of an array of ``shape`` into tiles of ``tile_size`` per axis."""

    shape: Index
    tile_size: int | Index

    @property
    def size(self) -> Index:
        return _per_axis(self.tile_size, len(self.shape))

    @property
    def counts(self) -> Index:
        return tuple(-(-n // t) for n, t in zip(self.shape, self.size, strict=True))

    def tile(self, index: Index) -> Tile:
        start = tuple(i * t for i, t in zip(index, self.size, strict=True))
        stop = tuple(min(n, a + t) for a, t, n in zip(start, self.size, self.shape, strict=True))
        return Tile(tuple(index), Box(start, stop))

    def overlapping(self, box: Box) -> list[Tile]:
        """The tiles whose core shares a pixel with ``box`` (clipped to the array)."""
        axes = [range(max(0, a) // t, -(-min(b, n) // t)) for a, b, t, n in
                zip(box.start, box.stop, self.size, self.shape, strict=True)]
        return [self.tile(i) for i in itertools.product(*axes)]

    def __iter__(self) -> Iterator[Tile]:
        for index in itertools.product(*(range(c) for c in self.counts)):
            yield self.tile(index)

    def __len__(self) -> int:
        return int(np.prod(self.counts))


@dataclass(frozen=True)
class TileTask:
    """One tile's share of a tiled pass, as shipped to a Dask worker.

    Why: every tiled pass hands each worker the same few facts (which stores, the grid, which tile), and long
    positional argument lists of them were easy to get out of order. Stores travel as paths, not handles: a
    task is pickled to the worker, and each process opens its own handles. ``shape`` is the scene's spatial
    shape, so the tile's box is known without opening an array. Stores a pass does not use stay ``None``.
    """

    index: Index
    shape: Index
    tile_size: int | Index
    scene: str | None = None  # scene.zarr: the ingested pixels and their validity
    result: str | None = None  # the store whose arrays the pass reads or writes as its output
    work: str | None = None  # the work store: intermediate arrays of a pass

    @classmethod
    def each(cls, shape: Index, tile_size: int | Index, **stores: str | None) -> list[TileTask]:
        """One task per tile of the grid, in grid (scene) order."""
        return [cls(t.index, tuple(shape), tile_size, **stores) for t in TileGrid(tuple(shape), tile_size)]

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.shape, self.tile_size)

    @property
    def tile(self) -> Tile:
        return self.grid.tile(self.index)

    @property
    def core(self) -> Box:
        """The pixels this task writes."""
        return self.tile.core

    def window(self, halo: int) -> Box:
        """The core grown by ``halo`` on every side, clipped to the scene: the pixels this task reads."""
        return self.core.grow(halo, self.shape)


@dataclass(frozen=True)
class TileRun:
    """Several tiles' share of a tiled pass, as shipped to a Dask worker: a guided unit of consecutive tiles
    (:mod:`segpipe.runtime.units`) with the stores and the grid they are on, like :class:`TileTask` for one.

    Why a run: on small tiles the per-task cost is more than the work, so tiles travel in units; the stores and
    grid come with them so that unit functions take one object, not a list of paths and sizes in some order.
    ``shape`` is the grid's spatial shape (the scene's, or the model grid's where a model runs at its own
    resolution). :meth:`of` makes the template, :func:`segpipe.runtime.units.run_units` fills in the tiles.
    """

    indices: tuple[Index, ...]
    shape: Index
    tile_size: int | Index
    scene: str | None = None
    result: str | None = None
    work: str | None = None

    @classmethod
    def of(cls, shape: Index, tile_size: int | Index, **stores: str | None) -> TileRun:
        """A run of no tiles yet: the stores and grid of a pass."""
        return cls((), tuple(shape), tile_size, **stores)

    def with_tiles(self, indices: Iterable[Index]) -> TileRun:
        return replace(self, indices=tuple(tuple(i) for i in indices))

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.shape, self.tile_size)

    def tiles(self) -> list[Tile]:
        grid = self.grid
        return [grid.tile(i) for i in self.indices]


@dataclass(frozen=True)
class PatchGrid:
    """The scene-wide grid of overlapping inference patches."""

    shape: Index
    patch: int | Index
    overlap: float

    @property
    def size(self) -> Index:
        return _per_axis(self.patch, len(self.shape))

    @property
    def strides(self) -> Index:
        return tuple(max(1, int(round(p * (1.0 - self.overlap)))) for p in self.size)

    @property
    def starts(self) -> tuple[list[int], ...]:
        return tuple(patch_starts(n, p, s) for n, p, s in zip(self.shape, self.size, self.strides, strict=True))

    @property
    def counts(self) -> Index:
        return tuple(len(s) for s in self.starts)

    def window(self, index: Index) -> Box:
        start = tuple(s[i] for s, i in zip(self.starts, index, strict=True))
        return Box(start, tuple(a + p for a, p in zip(start, self.size, strict=True)))

    def covering(self, box: Box) -> list[Index]:
        """Patch indices (in global lexicographic order) whose footprint intersects ``box``."""
        axes = [[i for i, s in enumerate(starts) if s < b and s + p > a]
                for starts, p, a, b in zip(self.starts, self.size, box.start, box.stop, strict=True)]
        return list(itertools.product(*axes))


def gaussian_importance(patch: Index, sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's Gaussian importance map (sigma = patch/8 per axis), max 1, no zeros.

    Zeros would make voxels at patch corners undefined where only one patch covers them, so
    they are lifted to the smallest positive weight, as nnU-Net does.
    """
    g = np.ones((), np.float64)
    for p in patch:
        coords = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        g = np.multiply.outer(g, np.exp(-0.5 * (coords / (p * sigma_scale)) ** 2))
    g /= g.max()
    g = g.astype(np.float32)
    g[g == 0] = g[g > 0].min()
    return g
