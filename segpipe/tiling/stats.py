"""Scene-wide statistics, reduced over all chunks on the Dask cluster.

Global methods (Otsu, k-means, texture clustering) must decide with statistics of the *whole
scene*: if each tile chose its own threshold, neighbouring tiles would disagree at their seams and
the answer would depend on the tile size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from distributed import Client

from segpipe import progress
from segpipe.geometry import Box
from segpipe.io.scene import Scene

SAMPLE_PIXELS = 200_000


def grey(img: np.ndarray) -> np.ndarray:
    """Single-channel intensity used by the classical methods: the mean of the bands."""
    return img.mean(axis=0) if img.shape[0] > 1 else img[0]


@dataclass
class SceneStats:
    """Per-band moments and a grey-level histogram over valid pixels."""

    minimum: list[float]
    maximum: list[float]
    mean: list[float]
    std: list[float]
    hist_counts: np.ndarray
    hist_edges: np.ndarray

    @property
    def hist_centers(self) -> np.ndarray:
        return (self.hist_edges[:-1] + self.hist_edges[1:]) / 2

    def grey_quantile(self, q: float) -> float:
        cdf = np.cumsum(self.hist_counts) / max(1, self.hist_counts.sum())
        return float(self.hist_centers[min(len(cdf) - 1, np.searchsorted(cdf, q))])


def _row_bands(scene: Scene, multiple: int, budget: int = 2**20) -> list[Box]:
    """Slabs along the first axis (rows; z for volumes), about ``budget`` values each.

    Few tasks, bounded memory per task: each running task holds its slab (in its own type for integer
    images, else float32) and pieces of it (:func:`_moments`), so the peak follows the slab, not the scene.
    Slab thickness is a multiple of ``multiple`` (the chunk edge
    for aligned reads, or a sampling stride so that a strided sample stays on one scene-wide lattice).
    """
    first, rest = scene.shape[0], scene.shape[1:]
    per_row = int(np.prod(rest)) * scene.count
    rows = max(multiple, budget // max(1, per_row) // multiple * multiple)
    return [Box((r, *(0,) * len(rest)), (min(first, r + rows), *rest)) for r in range(0, first, rows)]


# Values converted to float64 at a time for the sums: bounds a slab's temporaries whatever its size.
_PIECE = 2**16


def _moments(path: str, w: Box, exact: bool) -> tuple:
    """Sums, squares, extremes per band and the grey range of a slab; with ``exact``, its grey values' counts.

    For integer images the grey level (the mean of the bands) takes few distinct values: their counts
    (keyed by the integer band sum) are gathered in this same pass, and the histogram is binned from them
    afterwards, so the store is read once instead of twice. Everything past the valid pixels themselves is
    computed a piece at a time (float64 sums, integer keys, bincounts), so a slab's statistics hold little
    more memory than its pixels.
    """
    # Integer pixels stay in their own type (1-2 bytes a value instead of 4): every sum below is exact either
    # way, and the grey levels are taken in float32 a piece at a time, as for float images.
    img, valid = Scene(path).read(w, dtype=None if exact else np.float32)
    # (bands, n); a mask over trailing axes would make NumPy build int64 index arrays (16 B/px)
    x = img.reshape(len(img), -1) if valid.all() else np.stack([band[valid] for band in img])
    n = x.shape[1]
    if n == 0:
        return 0, np.zeros(len(img)), np.zeros(len(img)), None, None, None, None, None
    del img
    mins, maxs = x.min(axis=1).astype(np.float64), x.max(axis=1).astype(np.float64)
    sums, squares = np.zeros(len(x)), np.zeros(len(x))
    g_lo, g_hi = np.inf, -np.inf
    lo, hi = int(mins.sum()), int(maxs.sum())  # bounds of the integer band sums
    small = exact and hi - lo < 2**20
    tally = np.zeros(hi - lo + 1, np.int64) if small else None
    keys = []
    for k in range(0, n, _PIECE):
        part = x[:, k:k + _PIECE]
        wide = part.astype(np.float64)
        sums += wide.sum(axis=1)
        squares += (wide * wide).sum(axis=1)
        g = grey(part.astype(np.float32, copy=False))
        g_lo, g_hi = min(g_lo, float(g.min())), max(g_hi, float(g.max()))
        if exact:
            key = (part.sum(axis=0) if len(part) > 1 else part[0]).astype(np.int64)
            if small:
                tally += np.bincount(key - lo, minlength=len(tally))
            else:
                keys.append(key)
    counts = None
    if small:
        nz = np.flatnonzero(tally)
        counts = (nz + lo, tally[nz])
    elif exact:
        counts = np.unique(np.concatenate(keys), return_counts=True)
    return n, sums, squares, mins, maxs, g_lo, g_hi, counts


def _histogram(path: str, w: Box, lo: float, hi: float, bins: int) -> np.ndarray:
    img, valid = Scene(path).read(w)
    return np.histogram(grey(img)[valid], bins=bins, range=(lo, hi))[0]


def _grey_of_sums(sums: np.ndarray, n_bands: int) -> np.ndarray:
    """The grey level :func:`grey` gives for pixels whose (integer) bands add up to ``sums``.

    Exact: integer sums below 2**24 are exact in float32, and ``mean`` is the float32 sum divided by the
    band count.
    """
    s = sums.astype(np.float32)
    return s if n_bands == 1 else s / np.float32(n_bands)


def scene_stats(scene: Scene, client: Client, bins: int = 1024) -> SceneStats:
    """Moments, range and the grey histogram over valid pixels, reduced on the cluster.

    One pass over the store for integer images (up to 2**24 / bands grey levels); a second pass bins the
    histogram for float images, whose range is known only after the first.
    """
    wins = _row_bands(scene, scene.chunk)
    dtype = np.dtype(scene.image.dtype)
    exact = dtype.kind in "iub" and dtype.itemsize <= 2
    word = "slab" if scene.geometry.is_volume else "row slab"  # a volume's rows are slabs already: not "slab slab"
    parts = [p for p in progress.counted(client, "statistics", client.map(_moments, [scene.path] * len(wins), wins,
                                                                          exact=exact), word)
             if p[0]]
    if not parts:
        zeros = [0.0] * scene.count
        return SceneStats(zeros, zeros, zeros, zeros, np.zeros(bins, np.int64), np.linspace(0, 1, bins + 1))
    n = float(sum(p[0] for p in parts))
    mean = sum(p[1] for p in parts) / n
    std = np.sqrt(np.maximum(sum(p[2] for p in parts) / n - mean**2, 0.0))
    mn = np.min([p[3] for p in parts], axis=0)
    mx = np.max([p[4] for p in parts], axis=0)
    lo = min(p[5] for p in parts)
    hi = max(p[6] for p in parts)
    hi = hi if hi > lo else lo + 1.0
    if exact:
        sums = np.concatenate([p[7][0] for p in parts])
        counts = np.concatenate([p[7][1] for p in parts])
        values, where = np.unique(sums, return_inverse=True)
        weights = np.bincount(where, weights=counts).astype(np.int64)
        hist = np.histogram(_grey_of_sums(values, scene.count), bins=bins, range=(lo, hi), weights=weights)[0]
        hist = hist.astype(np.int64)
    else:
        hists = client.gather(client.map(_histogram, [scene.path] * len(wins), wins, lo=lo, hi=hi, bins=bins))
        hist = np.sum(hists, axis=0)
    edges = np.linspace(lo, hi, bins + 1)
    return SceneStats([float(v) for v in mn], [float(v) for v in mx], [float(v) for v in mean],
                      [float(v) for v in std], hist, edges)


def _strided(path: str, w: Box, step: int) -> np.ndarray:
    img, valid = Scene(path).read(w)
    every = (slice(None, None, step),) * valid.ndim
    return img[(slice(None), *every)][:, valid[every]].T


def sample_pixels(scene: Scene, client: Client, n: int = SAMPLE_PIXELS) -> np.ndarray:
    """A deterministic, tiling-independent pixel sample: a regular stride over the whole scene."""
    step = max(1, int((np.prod(scene.shape) / n) ** (1 / len(scene.shape))))
    wins = _row_bands(scene, step)
    return np.concatenate(client.gather(client.map(_strided, [scene.path] * len(wins), wins, step=step)))


def sample_windows(scene: Scene, size: int | None = None, per_axis: int = 4) -> list[Box]:
    """Fixed windows spread evenly over the scene, independent of the job's tile size.

    256^2 pixels for images, 64^3 voxels for volumes (about the same number of values).
    """
    size = size or scene.geometry.small_edge

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        return sorted({int(round(v)) for v in np.linspace(0, length - size, per_axis)})
    return [Box(start, tuple(min(n, s + size) for s, n in zip(start, scene.shape, strict=True)))
            for start in itertools.product(*(starts(n) for n in scene.shape))]
