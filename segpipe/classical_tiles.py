"""Classical methods on one worker: each tile read with its halo, its core's class map written directly.

Kept apart from the model code so that workers of a classical job never import torch (start-up and
memory of every worker process).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from segpipe.grid import Index, TileGrid
from segpipe.io.result import NODATA
from segpipe.io.store import Marks
from segpipe.models.classical import make_classical
from segpipe.scene import Scene

SEGMENT_STAGE = "segment"


def segment_classical_tiles(scene_path: str, result_path: str, method: str, params: dict[str, Any],
                            state: dict[str, Any], tile_size: int, tiles: list[Index]) -> int:
    """Classical method on each tile (read with its halo), core written to the result store."""
    m = make_classical(method, params)
    scene = Scene(scene_path)
    tgrid = TileGrid(scene.shape, tile_size)
    out = zarr.open_array(result_path, path="class", mode="r+")
    marks = Marks(result_path, SEGMENT_STAGE)
    for index in tiles:
        tile = tgrid.tile(index)
        outer = tile.core.grow(m.halo, scene.shape)
        img, valid = scene.read(outer)
        cls = m.predict(img, valid, state)[tile.core.relative_to(outer)]
        cls = np.where(valid[tile.core.relative_to(outer)], cls, NODATA).astype(np.uint8)
        out[tile.core.slices] = cls
        marks.mark(tile.key)
    return len(tiles)
