"""How much ground each class covers in a result: the land-cover report of a period, with or without truth.

Per tile on the cluster, pixel counts per class (and, on geographic grids, their geodesic areas row by row);
summed in grid order on the client, so the figures do not depend on the tile size. Pixel areas come from
:func:`segpipe.report.change.pixel_area`, the same rule the change product's matrices use, so a period's class
areas and the change between periods add up.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from distributed import Client

from segpipe import progress
from segpipe.io.store import write_atomic
from segpipe.report.change import counts_and_areas, pixel_area, read_period
from segpipe.tiling.grid import TileTask

FILES = {"json": "classes.json", "csv": "classes.csv"}


@dataclass
class ClassAreas:
    """Pixels and area (m², None for a grid in pixels only) per class of one result."""

    class_names: list[str]
    pixels: np.ndarray
    area_m2: np.ndarray | None
    area_method: str

    def summary(self) -> dict[str, Any]:
        total = int(self.pixels.sum())
        rows = []
        for k, name in enumerate(self.class_names):
            row: dict[str, Any] = {"class": name, "pixels": int(self.pixels[k]),
                                   "share": self.pixels[k] / total if total else None}
            if self.area_m2 is not None:
                row["hectares"] = float(self.area_m2[k] / 1e4)
            rows.append(row)
        return {"classes": rows, "valid_pixels": total, "area_method": self.area_method,
                "hectares": None if self.area_m2 is None else float(self.area_m2.sum() / 1e4)}


def tile_classes(task: TileTask, result: str, n_classes: int, row_m2: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """One tile's pixel counts per class (and geodesic areas); reads only the tile's window of the class map."""
    c = np.asarray(zarr.open_array(result, path="class", mode="r")[task.core.slices])
    return counts_and_areas(c, c < n_classes, n_classes, row_m2)


def class_areas(result: str, client: Client, tile_size: int) -> ClassAreas:
    """Pixels and area per class of the result store at ``result``, computed per tile on ``client``."""
    period = read_period(result)
    n = len(period.class_names)
    area = pixel_area(period.grid)
    tasks = TileTask.each(period.shape, tile_size)
    futures = [client.submit(tile_classes, t, period.path, n, area.rows(t.core.row0, t.core.row1), pure=False)
               for t in tasks]
    parts = progress.counted(client, "class areas", futures)
    pixels = np.sum([p[0] for p in parts], axis=0).astype(np.int64)
    if area.method == "projected":
        m2 = pixels * area.pixel_m2
    elif area.method == "geodesic":
        m2 = np.sum([p[1] for p in parts], axis=0)
    else:
        m2 = None
    return ClassAreas(period.class_names, pixels, m2, area.method)


def write_class_areas(areas: ClassAreas, folder: str | Path) -> dict[str, Path]:
    """``classes.json`` and ``classes.csv`` (class, pixels, share, hectares) in ``folder``, each atomically."""
    folder = Path(folder)
    summary = areas.summary()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    hectares = areas.area_m2 is not None
    writer.writerow(["class", "pixels", "share", *(["hectares"] if hectares else [])])
    for row in summary["classes"]:
        writer.writerow([row["class"], row["pixels"], f"{row['share']:.6f}" if row["share"] is not None else "",
                         *([f"{row['hectares']:.6f}"] if hectares else [])])
    paths = {k: folder / name for k, name in FILES.items()}
    write_atomic(paths["json"], json.dumps(summary, indent=2))
    write_atomic(paths["csv"], buf.getvalue())
    return paths
