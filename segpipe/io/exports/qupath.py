"""Export ``qupath``: a whole-slide run's result as the GeoJSON QuPath imports (``qupath.geojson``), in pixels of
the slide's level 0 (x right, y down, origin at its top-left corner), whatever level the run read.

What QuPath reads (``qupath.lib.io.PathObjectTypeAdapters`` and ``GsonTools.PathClassTypeAdapter``, QuPath 0.4
on): a FeatureCollection whose features carry ``properties.objectType`` (``"annotation"``, ``"detection"``, ...;
QuPath reads it from the properties only, not from the feature itself), ``properties.classification`` as
``{"name": ..., "color": [r, g, b]}`` (both: a classification object without ``color`` is refused),
``properties.isLocked``, ``properties.measurements`` as a name -> number object, and the feature's ``id`` as
the object's UUID. So every feature here has them all: the class regions as annotations (one per 4-connected
region of one class of the class map; background, class 0, and nodata left out), and, where the run measured
instances (``objects.gpkg``), each object as a detection. Colours are the class map's palette
(:data:`segpipe.io.cog.PALETTE`, as the COG and the OME-Zarr labels show the classes); ids are UUIDs derived
from the output folder and the feature's place in the file, so a rerun writes the same file.

Why the class regions come from :func:`segpipe.io.exports.polygons.polygons`: that is the exact, banded,
streaming vectorisation of the class map (one polygon per region, holes kept, the same for any tile size); this
module only moves its pixel corners to level 0 and writes them out as they come, one feature per line, so the
file is never a Python dict in memory (a slide's regions can run to millions).

Why level 0: QuPath places objects in pixels of the full-resolution image, and a run may read a coarser level
(``level:``, or the level nearest a model's resolution). A level's pixels are level 0's scaled by the level's
extent (:func:`segpipe.io.slide.slide_info` derives its µm per pixel the same way), so corner ``(x, y)`` of the
class map lies at ``(x · w0 / w, y · h0 / h)`` of level 0: the products are integers and the one division is
correctly rounded, so the map's right and bottom edges land exactly on level 0's. The objects' polygons are
in micrometres; their vertices are pixel corners of the class map (traced by GDAL), so they are taken back to
those integers first and then moved the same way.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from segpipe.io.exports import ExportRun

FILE = "qupath.geojson"
BACKGROUND = 0  # class 0: the background, not an object anyone wants to see outlined
OBJECTS_LAYER = "objects"  # segpipe.objects.measure.write_polygons' layer
BATCH = 10_000  # objects read from objects.gpkg at a time
UNKNOWN_COLOUR = (128, 128, 128)


def write(run: ExportRun) -> list[Path]:
    import zarr

    from segpipe.geometry import SceneGeometry
    from segpipe.io.exports.polygons import polygons
    from segpipe.io.slide import level0_size

    arr = zarr.open_array(run.result, path="class", mode="r")
    grid = SceneGeometry.of_attrs(arr.shape, dict(zarr.open_group(run.result, mode="r").attrs))
    to_level0 = level0_mapping(grid.shape, level0_size(run.source))
    dest = run.path(FILE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp{dest.suffix}")
    ids = _ids(run.output)
    try:
        with tmp.open("w", encoding="utf-8") as f:
            out = _FeatureWriter(f)
            for cls, geom, pixels in polygons(run.result, arr.shape[0], arr.chunks[0], run.client):
                if cls == BACKGROUND:
                    continue
                name = _name(run.class_names, cls)
                out.feature(next(ids), _geojson(geom, to_level0), "annotation", name, class_colour(cls),
                            {"class_id": cls, "pixels": pixels})
            if run.objects is not None and run.objects.is_file():
                back = world_to_pixels(grid)
                for oid, cls, name, pixels, geom in _objects(run.objects, run.class_names):
                    out.feature(next(ids), _geojson(geom, lambda xy: to_level0(back(xy))), "detection", name,
                                class_colour(cls), {"object_id": oid, "class_id": cls, "pixels": pixels})
            out.close()
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return [dest]


def level0_mapping(shape: tuple[int, ...], level0: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """Pixel corners ``(x, y)`` of a class map of ``shape`` (rows, cols) read at some level of a slide whose level 0
    is ``level0`` (height, width), as level-0 pixel coordinates: ``x · w0 / w``, ``y · h0 / h``."""
    num = np.asarray([level0[1], level0[0]], dtype=np.float64)
    den = np.asarray([shape[-1], shape[-2]], dtype=np.float64)

    def to_level0(xy: np.ndarray) -> np.ndarray:
        return xy * num / den

    return to_level0


def world_to_pixels(grid: Any) -> Callable[[np.ndarray], np.ndarray]:
    """World coordinates (µm) of the grid's pixel corners back to those corners' integer ``(x, y)``."""
    inv = ~grid.transform

    def back(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.rint(np.column_stack([inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f]))

    return back


def class_colour(value: int) -> list[int]:
    """A class value's ``[r, g, b]``: the class map's palette, as the COG and the OME-Zarr labels show it (grey
    for a class the job does not name). QuPath refuses a classification without a colour."""
    from segpipe.io.cog import PALETTE

    return [int(c) for c in PALETTE[value % len(PALETTE)]] if value >= 0 else list(UNKNOWN_COLOUR)


def _name(class_names: list[str], cls: int) -> str:
    return class_names[cls] if 0 <= cls < len(class_names) else str(cls)


def _ids(output: Path) -> Iterator[str]:
    """UUIDs for the features, the same for every run into this output folder."""
    base = f"segpipe:{output.resolve()}/{FILE}"
    n = 0
    while True:
        yield str(uuid.uuid5(uuid.NAMESPACE_URL, f"{base}#{n}"))
        n += 1


def _geojson(geom: Any, move: Callable[[np.ndarray], np.ndarray]) -> str:
    """The geometry moved by ``move`` as GeoJSON text (GEOS writes shortest round-trip numbers); an object
    of one part as a Polygon, of several as a MultiPolygon."""
    import shapely

    if geom.geom_type == "MultiPolygon" and len(geom.geoms) == 1:
        geom = geom.geoms[0]
    return shapely.to_geojson(shapely.transform(geom, move))


def _objects(path: Path, class_names: list[str]) -> Iterator[tuple[int, int, str, int, Any]]:
    """``(id, class value, class name, pixels, polygon in µm)`` of each object in ``objects.gpkg``, read in
    batches (:data:`BATCH`); valid as :func:`segpipe.objects.measure.write_polygons` writes them."""
    import shapely
    from pyogrio.raw import open_arrow

    value = {name: i for i, name in enumerate(class_names)}
    with open_arrow(str(path), layer=OBJECTS_LAYER, batch_size=BATCH, use_pyarrow=True) as (meta, reader):
        geometry = meta["geometry_name"] or "wkb_geometry"
        for batch in reader:
            geoms = shapely.from_wkb(batch.column(geometry).to_numpy(zero_copy_only=False))
            ids, names, pixels = (batch.column(c).to_pylist() for c in ("id", "class", "pixels"))
            for oid, name, px, geom in zip(ids, names, pixels, geoms, strict=True):
                yield int(oid), value.get(name, -1), str(name), int(px), geom


class _FeatureWriter:
    """A FeatureCollection written one feature per line, as the features come."""

    def __init__(self, f: IO[str]) -> None:
        self.f, self.first = f, True
        f.write('{"type": "FeatureCollection", "features": [\n')

    def feature(self, fid: str, geometry: str, object_type: str, name: str, colour: list[int],
                measurements: dict[str, int]) -> None:
        props = {"objectType": object_type, "classification": {"name": name, "color": colour}, "isLocked": False,
                 "measurements": measurements}
        self.f.write(("" if self.first else ",\n")
                     + f'{{"type": "Feature", "id": "{fid}", "geometry": {geometry}, '
                     + f'"properties": {json.dumps(props, ensure_ascii=False)}}}')
        self.first = False

    def close(self) -> None:
        self.f.write("\n]}\n")
