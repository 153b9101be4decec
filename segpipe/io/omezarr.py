"""OME-Zarr 0.5 export: the scene as a multiscale image with the class map as a ``labels`` image.

Levels halve the resolution along every spatial axis by taking every second pixel or voxel
(nearest neighbour), for the image and the labels alike, so both pyramids stay aligned and classes
are never averaged; an axis already one pixel or voxel thick (a single slice) is kept, and its scale
with it. Pixel size comes from the scene: micrometres for slides, millimetres for volumes, CRS units
otherwise.

Volumes lie in world space as the NIfTI does: every level has a ``scale`` then a ``translation``, the
position of its first stored voxel centre (the same at every level: subsampling keeps that voxel), so
that ``index * scale + translation`` is the voxel centre in RAS+ mm, z along S, y along A, x along R,
equal to nibabel's ``apply_affine``. OME-Zarr has no flips, and a negative scale breaks validators
(ome-zarr-models reads it as a finer level): an axis the affine runs backwards (a DICOM-style x towards
L, y towards P) is stored reversed, so that it runs forwards with a positive scale; OME index i along
such an axis is NIfTI (and ``result.zarr``) index n - 1 - i, and ``segpipe.world.reversed`` names those
axes. A reader taking scale and translation (ome-zarr-py, napari) puts every voxel where the NIfTI does.
An oblique or axis-swapping affine, which NGFF 0.5 cannot express, is not dropped silently: the
transforms then place voxels in their own frame (mm from voxel 0 along the array axes), and the
``segpipe`` attribute beside ``ome`` says so (``world.exact`` false) with the 4x4
``coordinate_to_world`` matrix from those coordinates (z, y, x, 1) to RAS+ (R, A, S, 1); in the exact
case that matrix only swaps the axes' order.

Each level is built from the previous one on the Dask cluster, chunk by chunk; the finished
store is renamed into place, so a failed export never leaves a half-written one behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from distributed import Client

from segpipe.geometry import SceneGeometry
from segpipe.io.cog import PALETTE
from segpipe.io.result import NODATA, world_frame
from segpipe.io.scene import Scene
from segpipe.io.store import remove_leftovers

VERSION = "0.5"
LABEL_NAME = "segmentation"


# OME-NGFF axis units (UDUNITS names) for the scene's units; others are left unnamed.
NGFF_UNITS = {"mm": "millimeter", "µm": "micrometer", "metre": "meter", "meter": "meter"}


# OME-Zarr coordinates (z, y, x, 1) of a volume whose axes are the world's, to RAS+ (R, A, S, 1).
ZYX_TO_RAS = [[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


@dataclass(frozen=True)
class Placement:
    """Where level 0 lies, per spatial axis: the step between pixel/voxel centres and (volumes) the first stored
    centre's position; ``reverse``: the spatial axes stored backwards so that they run forwards in world space;
    ``world`` is what the ``segpipe`` attribute says about a volume's world frame."""

    unit: str | None
    step: tuple[float, ...]
    start: tuple[float, ...] | None = None
    reverse: tuple[int, ...] = ()
    world: dict[str, Any] | None = None

    def orient(self, arr: da.Array) -> da.Array:
        """``arr`` (leading axes, then the spatial ones) in stored order: the ``reverse`` axes reversed."""
        lead = arr.ndim - len(self.step)
        return arr[(*(slice(None),) * lead, *(slice(None, None, -1 if k in self.reverse else 1)
                                               for k in range(len(self.step))))]


def _placement(scene: Scene) -> Placement:
    g = scene.geometry
    if g.is_volume:
        return volume_placement(g)
    return Placement(NGFF_UNITS.get(g.units), (abs(g.transform.e), abs(g.transform.a)))


def volume_placement(g: SceneGeometry) -> Placement:
    """Scale and translation in world mm when the volume's axes are the world's (an axis running backwards stored
    reversed, since a scale must be positive), so a viewer overlays it on the NIfTI; otherwise its own voxel frame
    and the matrix to world."""
    axes = g.world_axes()
    reverse: tuple[int, ...] = ()
    if axes is not None:
        reverse = tuple(k for k, (_, d) in enumerate(axes) if d < 0)
        start = tuple(s + d * (n - 1) if d < 0 else s for (s, d), n in zip(axes, g.shape, strict=True))
        step = tuple(abs(d) for _, d in axes)
        to_world = ZYX_TO_RAS
        note = ("z, y, x coordinates are S, A, R in the world frame; the axes in 'reversed' run backwards in the "
                "NIfTI and are stored reversed here (OME index i is NIfTI index n - 1 - i)")
    else:
        step, start = g.pixel_size, (0.0, 0.0, 0.0)
        sz, sy, sx = step
        to_zyx_index = np.array([[0, 0, 1 / sx, 0], [0, 1 / sy, 0, 0], [1 / sz, 0, 0, 0], [0, 0, 0, 1]])
        to_world = (g.affine @ to_zyx_index).tolist()
        note = ("the affine is oblique or swaps axes, which OME-Zarr 0.5 cannot express: coordinates are mm from "
                "voxel 0 along the array axes; world = coordinate_to_world @ (z, y, x, 1)")
    world = {"frame": world_frame(g), "exact": axes is not None, "coordinate_to_world": to_world,
             "affine": g.affine.tolist(), "reversed": ["zyx"[k] for k in reverse], "note": note}
    return Placement(NGFF_UNITS[g.units], step, start, reverse, world)


def level_factors(shape: tuple[int, ...], n_levels: int) -> list[tuple[int, ...]]:
    """Per level, per spatial axis, how many level-0 pixels apart its pixels are: doubled where the level
    halved the axis, kept where the axis was already one pixel (a single slice keeps its thickness)."""
    factors, factor, size = [], (1,) * len(shape), tuple(shape)
    for _ in range(n_levels):
        factors.append(factor)
        factor = tuple(f * 2 if n > 1 else f for f, n in zip(factor, size, strict=True))
        size = tuple(-(-n // 2) for n in size)
    return factors


def _transforms(p: Placement, factor: tuple[int, ...], lead: int) -> list[dict[str, Any]]:
    """One level's coordinateTransformations: its scale, then (volumes) its first voxel centre's position."""
    out: list[dict[str, Any]] = [{"type": "scale",
                                  "scale": [1.0] * lead + [s * f for s, f in zip(p.step, factor, strict=True)]}]
    if p.start is not None:
        out.append({"type": "translation", "translation": [0.0] * lead + list(p.start)})
    return out


def _multiscales(p: Placement, factors: list[tuple[int, ...]], axes: list[dict[str, Any]], name: str) -> list[dict]:
    lead = len(axes) - len(p.step)
    return [{
        "name": name,
        "axes": axes,
        "datasets": [{"path": str(k), "coordinateTransformations": _transforms(p, f, lead)}
                     for k, f in enumerate(factors)],
    }]


def _pyramid(group: zarr.Group, base: da.Array, n_levels: int, chunk: int, nd: int, fill: Any,
             dims: tuple[str, ...], client: Client) -> None:
    level = base
    for k in range(n_levels):
        chunks = (*level.shape[:-nd], *(chunk,) * nd)
        arr = group.create_array(str(k), shape=level.shape, chunks=chunks, dtype=level.dtype, fill_value=fill,
                                 dimension_names=dims)
        client.compute(da.store(level.rechunk(chunks), arr, lock=False, compute=False), sync=True)
        level = da.from_zarr(arr)[(..., *(slice(None, None, 2),) * nd)]


def levels_for(shape: tuple[int, ...], smallest: int, most: int = 6) -> int:
    """Pyramid depth: halve until the image fits ``smallest`` pixels (the scene's ``geometry.small_edge``)."""
    n = 1
    while max(shape) / 2**n >= smallest and n < most:
        n += 1
    return n


def export_ome_zarr(scene_path: str, result_path: str, dest: str | Path, client: Client,
                    class_names: list[str]) -> Path:
    """Write ``dest`` (an ``.ome.zarr`` folder) from the scene store and the result store."""
    scene = Scene(scene_path)
    dest = Path(dest)
    remove_leftovers(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    place = _placement(scene)
    nd = len(scene.shape)
    spatial = ("z", "y", "x")[-nd:]
    space = [{"name": ax, "type": "space", **({"unit": place.unit} if place.unit else {})} for ax in spatial]
    n = levels_for(scene.shape, scene.geometry.small_edge)
    factors = level_factors(scene.shape, n)
    extra = {"segpipe": {"world": place.world}} if place.world is not None else {}
    chunk = scene.chunk
    try:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        root.update_attributes({"ome": {"version": VERSION, "multiscales": _multiscales(
            place, factors, [{"name": "c", "type": "channel"}, *space],
            Path(scene.group.attrs.get("source", "image")).name)}, **extra})
        image = scene.image  # the store's array, or the source read in place
        pixels = da.from_zarr(image) if isinstance(image, zarr.Array) else da.from_array(image, chunks=image.chunks)
        _pyramid(root, place.orient(pixels), n, chunk, nd, 0, ("c", *spatial), client)
        labels = root.create_group("labels")
        labels.attrs["ome"] = {"version": VERSION, "labels": [LABEL_NAME]}
        seg = labels.create_group(LABEL_NAME)
        colors = [{"label-value": i, "rgba": [*PALETTE[i % len(PALETTE)], 255]} for i in range(len(class_names))]
        multiscales = _multiscales(place, factors, space, LABEL_NAME)
        seg.update_attributes({"ome": {"version": VERSION, "multiscales": multiscales,
                                       "image-label": {"colors": colors, "source": {"image": "../../"},
                                                       "properties": [{"label-value": i, "class": name}
                                                                      for i, name in enumerate(class_names)]}},
                               **extra})
        classes = da.from_zarr(zarr.open_array(result_path, path="class", mode="r"))
        _pyramid(seg, place.orient(classes), n, chunk, nd, NODATA, spatial, client)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written store behind
        raise
    if dest.exists():
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    return dest
