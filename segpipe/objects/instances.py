"""Instance labels across tiles: connected components of the class map with global IDs.

Why three passes: a component may cross any number of tiles, so no halo can make per-tile
labelling exact. (1) Each tile labels the components of its own core (one class at a time) and
stores local labels. (2) Each tile finds which of its labels touch labels of its lower neighbours:
for every axis, the two voxel planes straddling its lower face, widened by one voxel along the
other axes so that edge and corner (diagonal) contacts with tiles that share only an edge or a
corner are seen too. Every pair of touching voxels in different tiles is found by exactly one tile
(the one holding the upper voxel along an axis where they differ). (3) The client unions the pairs
(a sparse graph of labels, not of pixels: :func:`segpipe.tiling.unionfind.merge_pairs`) and numbers
components 1..N in scene order of their first tile; each tile rewrites its labels. The result
equals whole-image labelling up to renumbering, for any tile size, in 2-D and 3-D. Only voxels
of the same class are ever joined.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from distributed import Client
from scipy import ndimage as ndi

from segpipe import progress
from segpipe.geometry import Box, Index
from segpipe.io.store import ensure_array
from segpipe.tiling.grid import TileGrid, TileTask
from segpipe.tiling.unionfind import merge_pairs

INSTANCES = "instances"
LOCAL = "instance_local"


@dataclass
class TileLabels:
    """What pass 1 reports for one tile: how many local labels, and the class of each."""

    index: Index
    classes: np.ndarray  # class of local label k+1


def structure(ndim: int, connectivity: int) -> np.ndarray:
    """1 = face neighbours only; ``ndim`` = full (8-connected in 2-D, 26-connected in 3-D)."""
    return ndi.generate_binary_structure(ndim, connectivity)


def label_tile(task: TileTask, *, classes: list[int], connectivity: int, source: str = "class") -> TileLabels:
    """Pass 1: label the components of each class in one tile core (``source`` of the task's result store);
    store local labels in the work store."""
    core = task.core
    cls = np.asarray(zarr.open_array(task.result, path=source, mode="r")[core.slices])
    out = np.zeros(cls.shape, np.uint32)
    owners: list[np.ndarray] = []
    n = 0
    for c in classes:
        lab, k = ndi.label(cls == c, structure=structure(cls.ndim, connectivity))
        if k:
            out[lab > 0] = lab[lab > 0] + n
            owners.append(np.full(k, c, np.uint8))
            n += k
    zarr.open_array(task.work, path=LOCAL, mode="r+")[core.slices] = out
    return TileLabels(task.index, np.concatenate(owners) if owners else np.zeros(0, np.uint8))


def _global_labels(work_path: str, grid: TileGrid, box: Box, offsets: dict[Index, int]) -> np.ndarray:
    """Local labels of ``box`` (which may span tiles) turned into scene-wide provisional labels."""
    local = np.asarray(zarr.open_array(work_path, path=LOCAL, mode="r")[box.slices]).astype(np.int64)
    out = np.zeros(local.shape, np.int64)
    starts = [range(s // t, (e - 1) // t + 1) for s, e, t in zip(box.start, box.stop, grid.size, strict=True)]
    for index in itertools.product(*starts):
        part = grid.tile(index).core.intersect(box).relative_to(box)
        lab = local[part]
        out[part] = np.where(lab > 0, lab + offsets[index], 0)
    return out


def touching_pairs(task: TileTask, *, offsets: dict[Index, int], connectivity: int) -> np.ndarray:
    """Pass 2: provisional label pairs that touch across this tile's lower faces (N x 2)."""
    grid, core, shape = task.grid, task.core, task.shape
    nd = len(shape)
    pairs = [np.zeros((0, 2), np.int64)]
    for a in range(nd):
        if core.start[a] == 0:
            continue
        # Upper plane: this tile's first plane along a. Lower plane: the one before it, one voxel wider along
        # every other axis (clipped to the scene), so diagonal neighbours in edge/corner tiles are seen too.
        lo_box = Box(tuple(core.start[a] - 1 if d == a else max(0, core.start[d] - 1) for d in range(nd)),
                     tuple(core.start[a] if d == a else min(shape[d], core.stop[d] + 1) for d in range(nd)))
        up_box = Box(tuple(core.start), tuple(core.start[a] + 1 if d == a else core.stop[d] for d in range(nd)))
        lower = _global_labels(task.work, grid, lo_box, offsets)
        upper = _global_labels(task.work, grid, up_box, offsets)
        for delta in itertools.product((-1, 0, 1), repeat=nd):
            if delta[a] != 0 or sum(map(abs, delta)) + 1 > connectivity:
                continue  # connectivity 1: straight across the face only; full (= nd): every diagonal too
            up_sl, lo_sl = [], []
            for d in range(nd):
                if d == a:
                    up_sl.append(slice(0, 1))
                    lo_sl.append(slice(0, 1))
                    continue
                u0, u1 = max(core.start[d], -delta[d]), min(core.stop[d], shape[d] - delta[d])
                up_sl.append(slice(u0 - core.start[d], u1 - core.start[d]))
                lo_sl.append(slice(u0 + delta[d] - lo_box.start[d], u1 + delta[d] - lo_box.start[d]))
            up, lo = upper[tuple(up_sl)], lower[tuple(lo_sl)]
            ok = (lo > 0) & (up > 0)
            if ok.any():
                pairs.append(np.unique(np.stack([lo[ok], up[ok]], axis=1), axis=0))
    return np.unique(np.concatenate(pairs), axis=0)


def relabel_tile(task: TileTask, *, lookup: np.ndarray, target: str = INSTANCES) -> int:
    """Pass 3: write global instance IDs (``lookup[local]``) into the result's ``target`` array."""
    core = task.core
    local = np.asarray(zarr.open_array(task.work, path=LOCAL, mode="r")[core.slices])
    zarr.open_array(task.result, path=target, mode="r+")[core.slices] = lookup[local]
    return int((lookup[np.unique(local)] > 0).sum())


@dataclass
class InstanceSummary:
    """Global instance count and the class of every instance (index = ID; 0 = background)."""

    count: int
    classes: np.ndarray


def ensure_instance_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                          dims: tuple[str, ...], connectivity: int, classes: list[int],
                          **attrs: Any) -> zarr.Array:
    """The uint32 instance-ID array (0 = no object), described for readers.

    No ``_FillValue`` attribute: xarray would decode the IDs to float64 with object 0 as NaN. The Zarr fill
    value (0) is what unwritten chunks read as, which is "no object".
    """
    return ensure_array(group, name, shape, chunks, "uint32", 0, dims,
                        {"long_name": "instance ID (0 = no object)", "connectivity": connectivity,
                         "instance_classes": classes, **attrs})


def label_instances(result_path: str, work_group: zarr.Group, work_path: str, tile_size: int,
                    classes: list[int], connectivity: int, client: Client, source: str = "class",
                    target: str = INSTANCES, unit: str = "tile") -> InstanceSummary:
    """All three passes on the cluster; writes ``target`` (uint32, 0 = none) into the result store.

    ``source`` (a class array of the same store) holds the classes whose components are labelled; ``unit`` is
    what progress calls a tile (a volume's: block).
    """
    result = zarr.open_group(result_path, mode="r+")
    cls = result[source]
    shape, chunks = tuple(cls.shape), tuple(cls.chunks)
    if any(tile_size % c for c in chunks):  # tiles write whole chunks only: no two tasks share one
        raise ValueError(f"tile_size {tile_size} is not a multiple of the chunk shape {chunks}")
    dims = ("z", "y", "x")[-len(shape):]
    ensure_array(work_group, LOCAL, shape, chunks, "uint32", 0, dims)
    tasks = TileTask.each(shape, tile_size, result=result_path, work=work_path)
    tiles = progress.counted(client, "instances", [client.submit(label_tile, t, classes=classes,
                                                                  connectivity=connectivity, source=source,
                                                                  pure=False) for t in tasks], unit)
    offsets, total = {}, 0
    for t in tiles:
        offsets[t.index] = total
        total += len(t.classes)
    pairs = client.gather([client.submit(touching_pairs, t, offsets=offsets, connectivity=connectivity, pure=False)
                           for t in tasks])
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    owner = np.concatenate([t.classes for t in tiles]) if tiles else np.zeros(0, np.uint8)
    pairs = pairs[owner[pairs[:, 0] - 1] == owner[pairs[:, 1] - 1]]  # touching objects of two classes stay apart
    lookup = merge_pairs(total, pairs)  # numbered in provisional order: tiles in scene order
    n = int(lookup.max()) if total else 0
    instance_class = np.zeros(n + 1, np.uint8)
    instance_class[lookup[1:]] = owner
    ensure_instance_array(result, target, shape, chunks, dims, connectivity, classes)
    starts = [offsets[t.index] + 1 for t in tiles]  # each tile's provisional labels: local label k -> start + k - 1
    local_ids = [np.concatenate([[0], lookup[s:s + len(t.classes)]]).astype(np.uint32)
                 for s, t in zip(starts, tiles, strict=True)]
    progress.counted(client, "instance ids", [client.submit(relabel_tile, task, lookup=ids, target=target, pure=False)
                                              for task, ids in zip(tasks, local_ids, strict=True)], unit)
    return InstanceSummary(n, instance_class)

