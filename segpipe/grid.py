"""Tile geometry: one global patch grid and a tile partition on top of it.

Why two grids: inference patches overlap and must lie on a single scene-wide grid so that the
stitched answer does not depend on how the scene is split into tiles. Tiles are chunk-aligned
blocks of the output; they decide *who* computes and writes what, never *what* is computed.
Each patch is owned by exactly one tile (the tile containing its origin), so no patch is
computed twice, and each output tile is written by exactly one task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from affine import Affine


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


@dataclass(frozen=True)
class Window:
    """A half-open pixel window [row0, row1) x [col0, col1)."""

    row0: int
    col0: int
    row1: int
    col1: int

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row0, self.row1), slice(self.col0, self.col1)

    def grow(self, halo: int, height: int, width: int) -> Window:
        """This window enlarged by ``halo`` pixels on every side, clipped to the scene."""
        return Window(
            max(0, self.row0 - halo), max(0, self.col0 - halo),
            min(height, self.row1 + halo), min(width, self.col1 + halo),
        )

    def intersect(self, other: Window) -> Window:
        """The overlap of two windows (assumed to intersect)."""
        return Window(max(self.row0, other.row0), max(self.col0, other.col0),
                      min(self.row1, other.row1), min(self.col1, other.col1))

    def relative_to(self, outer: Window) -> tuple[slice, slice]:
        """Slices that cut this window out of an array holding ``outer``."""
        return (slice(self.row0 - outer.row0, self.row1 - outer.row0),
                slice(self.col0 - outer.col0, self.col1 - outer.col0))


@dataclass(frozen=True)
class Tile:
    """One output tile: its index in the tile grid and its core window."""

    row: int
    col: int
    core: Window

    @property
    def key(self) -> str:
        return f"{self.row}_{self.col}"

    def transform(self, scene_transform: Affine) -> Affine:
        """Affine of this tile's core, so a tile can be georeferenced on its own."""
        return scene_transform @ Affine.translation(self.core.col0, self.core.row0)


@dataclass(frozen=True)
class TileGrid:
    """Chunk-aligned partition of a ``height`` x ``width`` scene into tiles of ``tile_size``."""

    height: int
    width: int
    tile_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (-(-self.height // self.tile_size), -(-self.width // self.tile_size))

    def tile(self, row: int, col: int) -> Tile:
        t = self.tile_size
        return Tile(row, col, Window(row * t, col * t, min(self.height, (row + 1) * t),
                                     min(self.width, (col + 1) * t)))

    def __iter__(self) -> Iterator[Tile]:
        rows, cols = self.shape
        for r in range(rows):
            for c in range(cols):
                yield self.tile(r, c)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols


@dataclass(frozen=True)
class PatchGrid:
    """The scene-wide grid of overlapping inference patches."""

    height: int
    width: int
    patch: int
    overlap: float

    @property
    def stride(self) -> int:
        return max(1, int(round(self.patch * (1.0 - self.overlap))))

    @property
    def row_starts(self) -> list[int]:
        return patch_starts(self.height, self.patch, self.stride)

    @property
    def col_starts(self) -> list[int]:
        return patch_starts(self.width, self.patch, self.stride)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_starts), len(self.col_starts)

    def window(self, i: int, j: int) -> Window:
        r, c = self.row_starts[i], self.col_starts[j]
        return Window(r, c, r + self.patch, c + self.patch)

    def owned_by(self, tile: Tile) -> list[tuple[int, int]]:
        """Patch indices whose origin lies in ``tile``'s core: a partition of all patches."""
        rows = [i for i, r in enumerate(self.row_starts) if tile.core.row0 <= r < tile.core.row1]
        cols = [j for j, c in enumerate(self.col_starts) if tile.core.col0 <= c < tile.core.col1]
        return [(i, j) for i in rows for j in cols]

    def covering(self, window: Window) -> list[tuple[int, int]]:
        """Patch indices (in global row-major order) whose footprint intersects ``window``."""
        rows = [i for i, r in enumerate(self.row_starts) if r < window.row1 and r + self.patch > window.row0]
        cols = [j for j, c in enumerate(self.col_starts) if c < window.col1 and c + self.patch > window.col0]
        return [(i, j) for i in rows for j in cols]


def gaussian_importance(patch: int, sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's Gaussian importance map (sigma = patch/8), normalised to max 1, no zeros.

    Zeros would make pixels at patch corners undefined where only one patch covers them, so
    they are lifted to the smallest positive weight, as nnU-Net does.
    """
    coords = np.arange(patch, dtype=np.float64) - (patch - 1) / 2.0
    sigma = patch * sigma_scale
    g1 = np.exp(-0.5 * (coords / sigma) ** 2)
    g = np.outer(g1, g1)
    g /= g.max()
    g = g.astype(np.float32)
    g[g == 0] = g[g > 0].min()
    return g
