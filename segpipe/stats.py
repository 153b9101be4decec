"""Scene-wide statistics, reduced over all chunks on the Dask cluster.

Global methods (Otsu, k-means, texture clustering) must decide with statistics of the *whole
scene*: if each tile chose its own threshold, neighbouring tiles would disagree at their seams and
the answer would depend on the tile size.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
from distributed import Client

from segpipe.grid import Window
from segpipe.scene import Scene

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


def _dask_arrays(scene: Scene) -> tuple[da.Array, da.Array]:
    img = da.from_zarr(scene.image).astype(np.float32)
    valid = da.from_zarr(scene.valid) > 0
    return img, valid


def scene_stats(scene: Scene, client: Client, bins: int = 1024) -> SceneStats:
    """Two reductions over the store: moments and range, then the grey histogram."""
    img, valid = _dask_arrays(scene)
    w = valid.astype(np.float64)
    n = w.sum()
    s1 = (img * w).sum(axis=(1, 2))
    s2 = ((img.astype(np.float64) ** 2) * w).sum(axis=(1, 2))
    big = np.float32(np.finfo(np.float32).max)
    mn = da.where(valid, img, big).min(axis=(1, 2))
    mx = da.where(valid, img, -big).max(axis=(1, 2))
    g = img.mean(axis=0)
    gmin = da.where(valid, g, big).min()
    gmax = da.where(valid, g, -big).max()
    n, s1, s2, mn, mx, gmin, gmax = client.compute([n, s1, s2, mn, mx, gmin, gmax], sync=True)
    n = max(float(n), 1.0)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    if gmax < gmin:  # no valid pixel at all
        gmin, gmax = 0.0, 1.0
    hi = float(gmax) if gmax > gmin else float(gmin) + 1.0
    counts, edges = da.histogram(da.where(valid, g, np.nan), bins=bins, range=(float(gmin), hi))
    counts = client.compute(counts, sync=True)
    return SceneStats([float(v) for v in mn], [float(v) for v in mx], [float(v) for v in mean],
                      [float(v) for v in std], np.asarray(counts), np.asarray(edges))


def sample_pixels(scene: Scene, client: Client, n: int = SAMPLE_PIXELS) -> np.ndarray:
    """A deterministic, tiling-independent pixel sample: a regular stride over the whole scene."""
    step = max(1, int(np.sqrt(scene.height * scene.width / n)))
    img, valid = _dask_arrays(scene)
    sub, ok = client.compute([img[:, ::step, ::step], valid[::step, ::step]], sync=True)
    return sub[:, ok].T  # (pixels, bands)


def sample_windows(scene: Scene, size: int = 256, per_axis: int = 4) -> list[Window]:
    """Fixed windows spread evenly over the scene, independent of the job's tile size."""
    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        return sorted({int(round(v)) for v in np.linspace(0, length - size, per_axis)})
    return [Window(r, c, min(scene.height, r + size), min(scene.width, c + size))
            for r in starts(scene.height) for c in starts(scene.width)]
