"""Watershed splitting of touching objects (nuclei, buildings) with global IDs across tiles.

Why markers first: a per-tile watershed invents its own markers and the tiles disagree at their
seams. Here markers are decided once for the whole scene: (A) each tile, read with a halo just
over ``marker_distance``, marks the pixels at least ``marker_distance`` inside an object (exact
distance transform there); (B) the markers' connected components get global IDs with the
tile-exact labelling of :mod:`segpipe.objects.instances`; (C) each tile, read with ``halo``, floods the
negated distance map of each class from those global markers inside the class mask and keeps
its core. Flooding priorities get a tiny tie-break that depends only on the pixel's scene
position, so the flood order never depends on the window: the result equals whole-image
watershed (same markers, same priorities) wherever each object lies within ``halo`` of every
tile core it touches. (D) Object pixels no marker reaches (objects thinner than twice
``marker_distance``) become objects of their own, labelled tile-exactly again, numbered after
the marker objects. Distances are in pixels for images and in millimetres for volumes (the
voxel spacing), so markers stay round in anisotropic CT.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zarr
from distributed import Client
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from segpipe.io.store import ensure_array
from segpipe.objects.instances import INSTANCES, InstanceSummary, ensure_instance_array, label_instances
from segpipe.tiling.grid import TileTask

MARKERS, MARKER_IDS, UNREACHED, UNREACHED_IDS = "markers", "marker_ids", "unreached", "unreached_ids"
TIE_BREAK = 1e-6  # far below the gap between distinct distance values (>= ~1e-2 up to 50 px deep)


def mark_tile(task: TileTask, *, classes: list[int], marker_distance: float,
              sampling: tuple[float, ...] | None) -> None:
    """Pass A: class id where a pixel lies at least ``marker_distance`` inside an object of that class."""
    reach = marker_distance / min(sampling) if sampling else marker_distance  # in voxels along the finest axis
    core, outer = task.core, task.window(int(np.ceil(reach)) + 1)
    cls = np.asarray(zarr.open_array(task.result, path="class", mode="r")[outer.slices])
    out = np.zeros(core.shape, np.uint8)
    inner = core.relative_to(outer)
    for c in classes:
        deep = ndi.distance_transform_edt(cls == c, sampling=sampling)[inner] >= marker_distance
        out[deep] = c
    zarr.open_array(task.work, path=MARKERS, mode="r+")[core.slices] = out


def _priority(dist: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Negated distance plus a tie-break fixed by each pixel's position in the scene (not in the window)."""
    coords = np.indices(dist.shape, dtype=np.int64)
    flat = np.ravel_multi_index(tuple(c + s for c, s in zip(coords, start, strict=True)), shape)
    jitter = ((flat * 2654435761) % 2**32) / 2**32  # Knuth's multiplicative hash: fixed, well spread
    return -dist.astype(np.float64) + TIE_BREAK * jitter


def flood_tile(task: TileTask, *, classes: list[int], halo: int, connectivity: int,
               sampling: tuple[float, ...] | None) -> None:
    """Pass C: watershed from the global markers; core pixels no marker reaches go to ``unreached``."""
    core, outer = task.core, task.window(halo)
    cls = np.asarray(zarr.open_array(task.result, path="class", mode="r")[outer.slices])
    markers = np.asarray(zarr.open_array(task.work, path=MARKER_IDS, mode="r")[outer.slices]).astype(np.int64)
    inner = core.relative_to(outer)
    ids = np.zeros(core.shape, np.uint32)
    unreached = np.zeros(core.shape, np.uint8)
    for c in classes:
        fg = cls == c
        if not fg[inner].any():
            continue
        prio = _priority(ndi.distance_transform_edt(fg, sampling=sampling), outer.start, task.shape)
        ws = watershed(prio, np.where(fg, markers, 0), mask=fg, connectivity=connectivity)[inner]
        core_fg = fg[inner]
        ids[core_fg] = ws[core_fg]
        unreached[core_fg & (ws == 0)] = c
    zarr.open_array(task.result, path=INSTANCES, mode="r+")[core.slices] = ids
    zarr.open_array(task.work, path=UNREACHED, mode="r+")[core.slices] = unreached


def combine_tile(task: TileTask, *, offset: int) -> None:
    """Pass E: unreached objects take IDs after the marker objects."""
    core = task.core
    arr = zarr.open_array(task.result, path=INSTANCES, mode="r+")
    ids = np.asarray(arr[core.slices])
    rest = np.asarray(zarr.open_array(task.work, path=UNREACHED_IDS, mode="r")[core.slices])
    arr[core.slices] = np.where(ids > 0, ids, np.where(rest > 0, rest + offset, 0)).astype(np.uint32)


def split_instances(result_path: str, work_group: zarr.Group, work_path: str, tile_size: int,
                    classes: list[int], connectivity: int, marker_distance: float, halo: int,
                    client: Client) -> InstanceSummary:
    """All passes on the cluster; writes ``instances`` into the result store."""
    cls = zarr.open_array(result_path, path="class", mode="r")
    shape, chunks = tuple(cls.shape), tuple(cls.chunks)
    dims = ("z", "y", "x")[-len(shape):]
    for name in (MARKERS, UNREACHED):
        ensure_array(work_group, name, shape, chunks, "uint8", 0, dims)
    tasks = TileTask.each(shape, tile_size, result=result_path, work=work_path)
    spacing = zarr.open_group(result_path, mode="r").attrs.get("spacing")  # volumes: distances in millimetres
    sampling = tuple(float(v) for v in spacing) if spacing and len(spacing) == len(shape) else None

    def each(fn: Callable[..., None], **kw: object) -> None:
        """``fn(task, **kw)`` for every tile, on the cluster, all finished before the next pass."""
        client.gather([client.submit(fn, t, pure=False, **kw) for t in tasks])

    each(mark_tile, classes=classes, marker_distance=marker_distance, sampling=sampling)
    markers = label_instances(work_path, work_group, work_path, tile_size, classes, connectivity, client,
                              source=MARKERS, target=MARKER_IDS)
    ensure_instance_array(zarr.open_group(result_path, mode="r+"), INSTANCES, shape, chunks, dims, connectivity,
                          classes, split="watershed", marker_distance=marker_distance)
    each(flood_tile, classes=classes, halo=halo, connectivity=connectivity, sampling=sampling)
    rest = label_instances(work_path, work_group, work_path, tile_size, classes, connectivity, client,
                           source=UNREACHED, target=UNREACHED_IDS)
    each(combine_tile, offset=markers.count)
    return InstanceSummary(markers.count + rest.count, np.concatenate([markers.classes, rest.classes[1:]]))
