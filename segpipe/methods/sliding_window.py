"""The model path's sliding-window settings as one value, and where its logits go.

Why a module of its own: the client plans with these values (:func:`segpipe.methods.segment.infer_and_stitch`)
and the workers run with them (:func:`segpipe.methods.infer.infer_batches`), and the client of a classical job
must not import torch, which the worker side does. One frozen value replaces the long parameter lists that
each side repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segpipe.geometry import Index
    from segpipe.io.scene import Scene
    from segpipe.tiling.resample import ResampledScene
    from segpipe.tiling.stitch import Decoding


@dataclass(frozen=True)
class SlidingWindow:
    """A model's sliding-window inference, held as one value (as MONAI's ``SlidingWindowInferer`` holds roi size,
    overlap and batch): the model file, patch size and overlap on the global patch grid, batch size, the
    scene-wide normalisation, test-time mirroring, whether model tasks ask for a GPU, the model grid's
    ``scale`` when the model runs at another pixel size, and how its card says its outputs become classes.
    """

    model: str
    patch: int | Index
    overlap: float
    batch_size: int
    norm: dict[str, Any]
    mirror: bool = False
    gpu: bool = False
    scale: tuple[float, ...] | None = None
    decoding: Decoding | None = None  # how the blended outputs become classes (None: logits, arg-max)


@dataclass(frozen=True)
class LogitsTarget:
    """Where a sliding window's logits go: the scene (or model grid) it reads, the work store of logits, the
    result store, the tile size, whether the work store is kept, and whether tiles are blended into the work
    store (``into_work``: the model grid, or a CRF's input) instead of made final in the result."""

    scene: Scene | ResampledScene
    work: str
    result: str
    tile_size: int
    keep: bool = False
    into_work: bool = False
