"""Which patches of the global patch grid hold a valid pixel: the list model batches are cut from.

Torch-free, so listing runs on any worker without loading a model. A patch with no valid pixel only
covers pixels that end as nodata, so it is never computed.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from segpipe.geometry import Box, Index
from segpipe.io.scene import Scene
from segpipe.tiling.grid import PatchGrid
from segpipe.tiling.resample import ResampledScene, open_scene


def with_valid_pixels(scene: Scene | ResampledScene, grid: PatchGrid, patches: list[Index]) -> list[Index]:
    """The patches that hold at least one valid pixel, from one read of their union's validity."""
    if not patches:
        return []
    whole = Box.of(scene.shape)
    wins = [grid.window(idx).intersect(whole) for idx in patches]
    span = Box(tuple(min(c) for c in zip(*(w.start for w in wins), strict=True)),
               tuple(max(c) for c in zip(*(w.stop for w in wins), strict=True)))
    valid = scene.valid_in(span.slices)
    return [idx for idx, w in zip(patches, wins, strict=True) if valid[w.relative_to(span)].any()]


def valid_patches_in_rows(scene_path: str, patch: int | Index, overlap: float, rows: list[int],
                          scale: tuple[float, ...] | None = None) -> list[Index]:
    """Patches of the given first-axis indices (patch rows; z for volumes) that hold a valid pixel, in order.

    With ``scale``, of the patch grid on the model grid (:mod:`segpipe.tiling.resample`).
    """
    scene = open_scene(scene_path, scale)
    grid = PatchGrid(scene.shape, patch, overlap)
    rest = [range(c) for c in grid.counts[1:]]
    return [idx for i in rows for idx in with_valid_pixels(scene, grid, list(itertools.product([i], *rest)))]


def normalised(img: np.ndarray, valid: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """Pixels (bands, *spatial) as the model sees them: clipped to ``norm["clip"]`` ([low, high] per band, or
    None) first, then ``(x - mean) / std`` per band, invalid pixels 0 (the band mean); float32.

    ``norm`` is resolved once for the whole scene on the client (:func:`segpipe.methods.segment.normalisation`).
    Element-wise, so a pixel's value never depends on the window read: the model's patches and the CRF's
    bilateral kernel see the same numbers.
    """
    lead = (slice(None),) + (None,) * (img.ndim - 1)
    if norm.get("clip") is not None:  # a fixed window (model card): values outside it are saturated first
        bounds = np.asarray(norm["clip"], np.float32)
        img = np.clip(img, bounds[:, 0][lead], bounds[:, 1][lead])
    mean = np.asarray(norm["mean"], np.float32)[lead]
    std = np.asarray(norm["std"], np.float32)[lead]
    return np.where(valid[None], (img - mean) / std, np.float32(0)).astype(np.float32, copy=False)
