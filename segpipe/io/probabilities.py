"""``probabilities.tif``: the per-class probabilities as a COG, for a person or a GIS to look at.

One uint8 band per class (probability x 254, rounded; 255 = no data) named after the class, then a
``confidence`` band (the winning class's probability, the same scale). Overviews average, since these
are quantities rather than labels. The float16 probabilities themselves stay in ``result.zarr``.
Streamed in strips of whole chunks through an uncompressed staging GeoTIFF, written atomically like the
class COG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import zarr

from segpipe.geometry import SceneGeometry
from segpipe.io.cog import CACHE_MB, COG_TILE, DEFLATE_LEVEL
from segpipe.io.raster import quiet_not_georeferenced
from segpipe.io.result import NODATA
from segpipe.io.store import remove_leftovers

SCALE = 254


def to_bytes(p: np.ndarray) -> np.ndarray:
    """Probabilities (float, NaN = no data) as uint8 0..254, 255 where there is no data."""
    out = np.rint(np.nan_to_num(p, nan=0.0) * SCALE).astype(np.uint8)
    out[np.isnan(p)] = NODATA
    return out


def export_probabilities(result_path: str, dest: str | Path) -> Path:
    """Write ``result.zarr/probability`` to ``dest`` as described above; returns ``dest``."""
    group = zarr.open_group(result_path, mode="r")
    prob = group["probability"]
    names = list(prob.attrs.get("class_names", [f"class{i}" for i in range(prob.shape[0])]))
    n, h, w = (int(v) for v in prob.shape)
    grid = SceneGeometry.of_attrs((h, w), dict(group.attrs))
    dest = Path(dest)
    remove_leftovers(dest)
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.staging.tif")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    rows = int(np.lcm(int(prob.chunks[1]), COG_TILE))
    profile = {"driver": "GTiff", "height": h, "width": w, "count": n + 1, "dtype": "uint8", "nodata": NODATA,
               "tiled": True, "blockxsize": COG_TILE, "blockysize": COG_TILE, "crs": grid.crs,
               "transform": grid.transform}
    try:
        quiet_not_georeferenced()
        with rasterio.Env(GDAL_CACHEMAX=CACHE_MB * 2**20, GDAL_NUM_THREADS="ALL_CPUS"):
            with rasterio.open(staging, "w", **profile) as out:
                for r0 in range(0, h, rows):
                    p = np.asarray(prob[:, r0:r0 + rows, :], dtype=np.float32)
                    window = ((r0, r0 + p.shape[1]), (0, w))
                    out.write(to_bytes(p), indexes=list(range(1, n + 1)), window=window)
                    out.write(to_bytes(p.max(axis=0)), n + 1, window=window)  # NaN (no data) stays NaN
                for i, name in enumerate([*names, "confidence"], start=1):
                    out.set_band_description(i, name)
            rasterio.shutil.copy(staging, tmp, driver="COG", compress="DEFLATE", level=DEFLATE_LEVEL,
                                 blocksize=COG_TILE, overview_resampling="AVERAGE", num_threads="ALL_CPUS")
        os.replace(tmp, dest)
    finally:
        staging.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dest
