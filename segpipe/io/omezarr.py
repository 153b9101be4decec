"""OME-Zarr 0.5 export: the scene as a multiscale image with the class map as a ``labels`` image.

Levels halve the resolution along every spatial axis by taking every second pixel or voxel
(nearest neighbour), for the image and the labels alike, so both pyramids stay aligned with
scale-only transforms and classes are never averaged. Pixel size comes from the scene:
micrometres for slides, millimetres (the voxel spacing) for volumes, CRS units otherwise.
Each level is built from the previous one on the Dask cluster, chunk by chunk; the finished
store is renamed into place, so a failed export never leaves a half-written one behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import dask.array as da
import zarr
from distributed import Client

from segpipe.io.cog import PALETTE
from segpipe.io.result import NODATA
from segpipe.io.scene import Scene
from segpipe.io.store import remove_leftovers

VERSION = "0.5"
LABEL_NAME = "segmentation"


# OME-NGFF axis units (UDUNITS names) for the scene's units; others are left unnamed.
NGFF_UNITS = {"mm": "millimeter", "µm": "micrometer", "metre": "meter", "meter": "meter"}


def _units(scene: Scene) -> tuple[str | None, tuple[float, ...]]:
    g = scene.geometry
    if g.is_volume:
        return NGFF_UNITS[g.units], tuple(float(v) for v in scene.group.attrs["spacing"])
    return NGFF_UNITS.get(g.units), (abs(g.transform.e), abs(g.transform.a))


def _multiscales(n_levels: int, axes: list[dict[str, Any]], size: tuple[float, ...], name: str) -> list[dict]:
    lead = [1.0] * (len(axes) - len(size))
    return [{
        "name": name,
        "axes": axes,
        "datasets": [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": lead + [v * 2**k for v in size]}]} for k in range(n_levels)],
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
    unit, size = _units(scene)
    nd = len(scene.shape)
    spatial = ("z", "y", "x")[-nd:]
    space = [{"name": ax, "type": "space", **({"unit": unit} if unit else {})} for ax in spatial]
    n = levels_for(scene.shape, scene.geometry.small_edge)
    chunk = scene.chunk
    try:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        root.attrs["ome"] = {"version": VERSION, "multiscales": _multiscales(
            n, [{"name": "c", "type": "channel"}, *space], size, Path(scene.group.attrs.get("source", "image")).name)}
        image = scene.image  # the store's array, or the source read in place
        pixels = da.from_zarr(image) if isinstance(image, zarr.Array) else da.from_array(image, chunks=image.chunks)
        _pyramid(root, pixels, n, chunk, nd, 0, ("c", *spatial), client)
        labels = root.create_group("labels")
        labels.attrs["ome"] = {"version": VERSION, "labels": [LABEL_NAME]}
        seg = labels.create_group(LABEL_NAME)
        colors = [{"label-value": i, "rgba": [*PALETTE[i % len(PALETTE)], 255]} for i in range(len(class_names))]
        seg.attrs["ome"] = {"version": VERSION, "multiscales": _multiscales(n, space, size, LABEL_NAME),
                            "image-label": {"colors": colors, "source": {"image": "../../"},
                                            "properties": [{"label-value": i, "class": name}
                                                           for i, name in enumerate(class_names)]}}
        classes = da.from_zarr(zarr.open_array(result_path, path="class", mode="r"))
        _pyramid(seg, classes, n, chunk, nd, NODATA, spatial, client)
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
