"""Region growing that is exact across tiles.

A region is the set of pixels connected to a seed through pixels whose grey value lies within
``tolerance`` of the seeds' mean value (``skimage.segmentation.flood`` for one seed). Growth has
no bounded reach, so a halo cannot make it tile-exact. Instead: each tile labels the connected
components of its own mask (pass 1, on workers), the client unions labels that touch across tile
faces and corners (a small graph of face pixels, not of the image), marks the components that
contain a seed, and each tile maps its labels to the class map (pass 2). The result equals
whole-image flood filling for any tile size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr
from distributed import Client
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi

from segpipe import progress
from segpipe.errors import InputError
from segpipe.geometry import Index, SceneGeometry
from segpipe.io.result import NODATA, SEGMENT_STAGE
from segpipe.io.scene import Scene
from segpipe.io.store import Marks, ensure_array
from segpipe.methods.classical import typed_params
from segpipe.tiling.grid import TileTask
from segpipe.tiling.stats import grey
from segpipe.tiling.unionfind import merge_pairs


class RegionGrowingParams(BaseModel):
    """Parameters of ``region_growing``, typed and checked before anything is written."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[tuple[int, int]] = Field(default_factory=list, description="seed pixels as [row, col]")
    seeds_xy: list[tuple[float, float]] = Field(default_factory=list, description="seeds as [x, y] in the scene CRS")
    tolerance: float = Field(ge=0.0, description="grey units around the seeds' mean value")
    connectivity: Literal[1, 2] = Field(1, description="1: 4-neighbours, 2: 8-neighbours")

    @model_validator(mode="after")
    def _seeded(self) -> RegionGrowingParams:
        if not self.seeds and not self.seeds_xy:
            raise ValueError("region_growing needs 'seeds' ([[row, col], ...]) or 'seeds_xy' (scene CRS)")
        return self


@dataclass
class Faces:
    """One tile's local label count, border rows/columns and the labels under its seeds."""

    n: int
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray
    seed_labels: list[int]


def check_params(params: dict[str, Any]) -> RegionGrowingParams:
    """The typed parameters, or one :class:`InputError` line naming the first problem."""
    return typed_params("region_growing", RegionGrowingParams, params)


def seed_pixels(p: RegionGrowingParams, grid: SceneGeometry) -> list[tuple[int, int]]:
    """Seeds as (row, col) pixels; map coordinates go through the scene's inverse transform. Checked on the
    client before anything is written (a seed off the scene is one line), and again when the job runs."""
    seeds = [(int(r), int(c)) for r, c in p.seeds]
    inv = ~grid.transform
    for x, y in p.seeds_xy:
        col, row = inv * (x, y)
        seeds.append((int(np.floor(row)), int(np.floor(col))))
    height, width = grid.shape
    for r, c in seeds:
        if not (0 <= r < height and 0 <= c < width):
            raise InputError(f"region_growing seed ({r}, {c}) lies outside the {width}x{height} scene")
    return seeds


def _label_tile(task: TileTask, *, lo: float, hi: float, connectivity: int, seeds: list[tuple[int, int]]) -> Faces:
    """Pass 1: label the components of the in-range mask of one tile; store them, report the tile's faces."""
    core = task.core
    img, valid = Scene(task.scene).read(core)
    g = grey(img)
    mask = (g >= lo) & (g <= hi) & valid
    lab, n = ndi.label(mask, structure=ndi.generate_binary_structure(2, connectivity))
    zarr.open_array(task.work, path="labels", mode="r+")[core.slices] = lab.astype(np.uint32)
    inside = [lab[r - core.row0, c - core.col0] for r, c in seeds
              if core.row0 <= r < core.row1 and core.col0 <= c < core.col1]
    return Faces(int(n), lab[0].copy(), lab[-1].copy(), lab[:, 0].copy(), lab[:, -1].copy(),
                 [int(v) for v in inside if v])


def _pairs(a: np.ndarray, b: np.ndarray, oa: int, ob: int, connectivity: int) -> list[np.ndarray]:
    """Global label pairs that touch across a face (``a`` and ``b`` are facing pixel lines)."""
    out = []
    shifts = (0, -1, 1) if connectivity == 2 else (0,)
    for s in shifts:
        aa = a[max(0, -s):len(a) - max(0, s)]
        bb = b[max(0, s):len(b) - max(0, -s)]
        ok = (aa > 0) & (bb > 0)
        out.append(np.stack([aa[ok].astype(np.int64) + oa, bb[ok].astype(np.int64) + ob], axis=1))
    return out


def merge(faces: dict[Index, Faces], connectivity: int) -> dict[Index, np.ndarray]:
    """Per tile, a lookup local label -> kept (bool), from unions across all tile borders.

    A label is kept when its component (:func:`segpipe.tiling.unionfind.merge_pairs`) holds a seed.
    """
    order = sorted(faces)
    offsets, total = {}, 0
    for key in order:
        offsets[key] = total
        total += faces[key].n
    pairs: list[np.ndarray] = [np.zeros((0, 2), np.int64)]
    for (r, c) in order:
        f = faces[(r, c)]
        if (r, c + 1) in faces:
            pairs += _pairs(f.right, faces[(r, c + 1)].left, offsets[(r, c)], offsets[(r, c + 1)], connectivity)
        if (r + 1, c) in faces:
            pairs += _pairs(f.bottom, faces[(r + 1, c)].top, offsets[(r, c)], offsets[(r + 1, c)], connectivity)
        if connectivity == 2:
            for dc, mine, theirs in ((1, f.bottom[-1], lambda g: g.top[0]), (-1, f.bottom[0], lambda g: g.top[-1])):
                other = faces.get((r + 1, c + dc))
                if other is not None and mine and theirs(other):
                    a, b = int(mine) + offsets[(r, c)], int(theirs(other)) + offsets[(r + 1, c + dc)]
                    pairs.append(np.array([[a, b]]))
    component = merge_pairs(total, np.concatenate(pairs))  # global (1-based) label -> component
    seeded = {component[offsets[k] + s] for k in order for s in faces[k].seed_labels}
    keep = np.isin(component[1:], list(seeded))
    return {k: np.concatenate([[False], keep[offsets[k]:offsets[k] + faces[k].n]]) for k in order}


def paint_tile(task: TileTask, *, lookup: np.ndarray) -> None:
    """Pass 2 of a two-pass labelling: each local label of the tile (work store ``labels``) becomes its class
    from ``lookup`` (region growing: kept or not; split-and-merge: the region's class), invalid pixels nodata;
    the tile is marked done."""
    tile = task.tile
    lab = np.asarray(zarr.open_array(task.work, path="labels", mode="r")[tile.core.slices])
    valid = Scene(task.scene).valid_in(tile.core.slices)
    cls = np.where(valid, lookup[lab].astype(np.uint8), NODATA).astype(np.uint8)
    zarr.open_array(task.result, path="class", mode="r+")[tile.core.slices] = cls
    Marks(task.result, SEGMENT_STAGE).mark(tile.key)


def label_merge_paint(client: Client, tasks: list[TileTask], label: Callable[..., Any],
                      merge_parts: Callable[[dict[Index, Any]], dict[Index, np.ndarray]], pending: list[Index],
                      advance: progress.Advance | None = None, **kwargs: Any) -> None:
    """The two passes of a tile-exact labelling: ``label(task, **kwargs)`` on every tile (workers; it stores the
    tile's local labels in the work store), ``merge_parts`` of all their reports on the client (tile index ->
    class lookup of its labels), then the ``pending`` tiles painted from their lookups (:func:`paint_tile`).

    Every tile is labelled, also on a resume: a region may reach a pending tile from any other. Pass 1 reports
    its own progress; pass 2 advances ``advance`` by a tile as each is painted.
    """
    futures = [client.submit(label, t, pure=False, **kwargs) for t in tasks]
    parts = dict(zip([t.index for t in tasks], progress.counted(client, "label", futures), strict=True))
    lookups = merge_parts(parts)
    todo = set(pending)
    progress.gather(client, [client.submit(paint_tile, t, lookup=lookups[t.index], pure=False)
                             for t in tasks if t.index in todo], advance)


def grow_regions(scene: Scene, work_group: zarr.Group, work_path: str, result_path: str, tile_size: int,
                 params: dict[str, Any], client: Client, pending: list[Index],
                 advance: progress.Advance | None = None) -> None:
    """Run both passes of tile-exact region growing into ``result_path``'s ``class`` array."""
    p = check_params(params)
    seeds = seed_pixels(p, scene.geometry)
    values = []
    for r, c in seeds:
        img = np.asarray(scene.image[:, r, c], dtype=np.float32)[:, None, None]
        values.append(float(grey(img)[0, 0]))
    centre, tol = float(np.mean(values)), p.tolerance
    ensure_array(work_group, "labels", (scene.height, scene.width), (scene.chunk, scene.chunk), "uint32", 0,
                 ("y", "x"))
    tasks = TileTask.each(scene.shape, tile_size, scene=scene.path, result=result_path, work=work_path)
    label_merge_paint(client, tasks, _label_tile, lambda faces: merge(faces, p.connectivity), pending, advance,
                      lo=centre - tol, hi=centre + tol, connectivity=p.connectivity, seeds=seeds)
