"""A model run at its own resolution: the scene seen on the model's pixel grid, and results brought back.

A model trained at 0.5 m/px sees buildings of a 0.3 m scene 1.7x too big; one trained on 1 mm CT voxels
sees a 3 mm slice spacing as squashed anatomy. So the scene is resampled to the model's pixel size (the
*model grid*: same origin and extent, pixels of the model's size), the model runs on that grid, and its
logits are resampled back onto the scene's own grid, where the class map, probabilities, exports and
metrics live (nnU-Net resamples its softmax back the same way).

Both directions use one separable kernel defined on global pixel coordinates: output pixel ``o`` of an
axis has its centre at input coordinate ``(o + 0.5) * ratio - 0.5`` (``ratio`` = output pixel size over
input pixel size); enlarging interpolates bilinearly, shrinking averages the input pixels by the share of
each that the output pixel covers (GDAL's ``average``), so nothing aliases. Validity is carried as
a weight (normalised convolution): nodata never leaks into values, and an output pixel is valid where
some valid input has weight. Each output pixel sums its taps in a fixed order from global indices, so a
window gives bit-identical values whatever window it was cut from: tiling still does not change the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from segpipe.geometry import Box
from segpipe.io.scene import Scene


@dataclass(frozen=True)
class Axis:
    """One axis resampled from ``n_in`` pixels to pixels ``ratio`` times as large, from the same origin."""

    n_in: int
    ratio: float

    @property
    def n_out(self) -> int:
        """Output pixels covering the input's extent (the last one may reach past it)."""
        return max(1, math.ceil(self.n_in / self.ratio - 1e-6))

    @property
    def radius(self) -> float:
        """How far from an output pixel's centre (in input pixels) its taps reach."""
        return 1.0 if self.ratio <= 1 else self.ratio / 2 + 0.5

    @property
    def width(self) -> int:
        return math.ceil(2 * self.radius) + 1

    def taps(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Input indices (clipped into the axis) and weights, (n, width) each, of output pixels ``start:stop``.

        Taps outside the input get weight 0; weights depend on global indices only.
        """
        centre = (np.arange(start, stop, dtype=np.float64) + 0.5) * self.ratio - 0.5
        first = np.floor(centre - self.radius).astype(np.int64) + 1
        idx = first[:, None] + np.arange(self.width)[None, :]
        if self.ratio <= 1:  # enlarging: bilinear
            w = np.clip(1.0 - np.abs(idx - centre[:, None]), 0.0, None)
        else:  # shrinking: each input pixel weighs by the share of it the output pixel covers (area average)
            half = self.ratio / 2
            w = np.clip(np.minimum(idx + 0.5, centre[:, None] + half) - np.maximum(idx - 0.5, centre[:, None] - half),
                        0.0, None)
        w[(idx < 0) | (idx >= self.n_in)] = 0.0
        return np.clip(idx, 0, self.n_in - 1), w.astype(np.float32)

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """The input range ``[lo, hi)`` the taps of output pixels ``start:stop`` read."""
        idx, _ = self.taps(start, stop)
        return int(idx.min()), int(idx.max()) + 1


def span_box(axes: list[Axis], window: Box) -> Box:
    """The input pixels an output ``window`` is resampled from (:meth:`Axis.span` per axis)."""
    spans = [a.span(lo, hi) for a, lo, hi in zip(axes, window.start, window.stop, strict=True)]
    return Box(tuple(s[0] for s in spans), tuple(s[1] for s in spans))


def _along(a: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted sum of taps along ``axis`` (indices relative to ``a``), tap by tap in a fixed order."""
    shape = [1] * a.ndim
    shape[axis] = -1
    out = np.take(a, idx[:, 0], axis=axis) * w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        out += np.take(a, idx[:, k], axis=axis) * w[:, k].reshape(shape)
    return out


def resample(values: np.ndarray, weight: np.ndarray, axes: list[Axis], out: Box, where: Box) -> tuple[
        np.ndarray, np.ndarray]:
    """Resample ``values`` (C, *where.shape) with per-pixel ``weight`` (*where.shape) onto output box ``out``.

    ``where`` is the input window the arrays hold; it must contain :meth:`Axis.span` of ``out`` per axis.
    Returns the normalised values (C, *out.shape; 0 where nothing had weight) and the summed weight.
    """
    num = np.where(weight > 0, values, 0).astype(np.float32) * weight.astype(np.float32)[None]
    den = weight.astype(np.float32)
    for ax, (axis, a, b, lo) in enumerate(zip(axes, out.start, out.stop, where.start, strict=True)):
        idx, w = axis.taps(a, b)
        num = _along(num, ax + 1, idx - lo, w)
        den = _along(den, ax, idx - lo, w)
    return np.divide(num, den[None], out=np.zeros_like(num), where=den[None] > 0), den


@dataclass(frozen=True)
class ResampledScene:
    """The scene on the model grid, read like a :class:`~segpipe.io.scene.Scene`.

    ``scale`` per spatial axis is the model's pixel size over the scene's.
    """

    scene: Scene
    scale: tuple[float, ...]

    @cached_property
    def axes(self) -> list[Axis]:
        return [Axis(n, r) for n, r in zip(self.scene.shape, self.scale, strict=True)]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.n_out for a in self.axes)

    @property
    def count(self) -> int:
        return self.scene.count

    @property
    def path(self) -> str:
        return self.scene.path

    def read(self, window: Box) -> tuple[np.ndarray, np.ndarray]:
        """Resampled pixels (float32, band-first) and validity of a model-grid window."""
        src = span_box(self.axes, window)
        img, valid = self.scene.read(src)
        values, den = resample(img, valid, self.axes, window, src)
        return values, den > 0

    def valid_in(self, where: tuple[slice, ...]) -> np.ndarray:
        """Validity of a model-grid window: some valid scene pixel has weight in it."""
        window = Box(tuple(s.start or 0 for s in where),
                     tuple(min(n, s.stop if s.stop is not None else n) for s, n in zip(where, self.shape,
                                                                                       strict=True)))
        src = span_box(self.axes, window)
        valid = self.scene.valid_in(src.slices)
        _, den = resample(np.zeros((0, *valid.shape), np.float32), valid, self.axes, window, src)  # no bands
        return den > 0

    def back_axes(self) -> list[Axis]:
        """The axes of the way back: from the model grid onto the scene's pixels."""
        return [Axis(a.n_out, 1.0 / r) for a, r in zip(self.axes, self.scale, strict=True)]


def open_scene(path: str, scale: tuple[float, ...] | None = None) -> Scene | ResampledScene:
    """The scene at ``path`` as a model sees it: itself, or resampled to the model's pixel size."""
    scene = Scene(path)
    return scene if scale is None else ResampledScene(scene, tuple(scale))
