"""Georeferenced exports: the class map as a Cloud-Optimized GeoTIFF.

Slides (no CRS) get the same tiled, pyramidal TIFF without GeoTIFF tags, with the pixel size as
TIFF resolution tags (pixels per centimetre), which slide viewers and tifffile read.

Written window by window into a temporary tiled GeoTIFF (bounded memory), converted by GDAL's COG
driver (internal tiling, overviews by nearest neighbour so classes are never averaged), and moved
into place with an atomic rename: a failed export never leaves a half-written COG over a good one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import zarr

from segpipe.grid import TileGrid
from segpipe.io.result import NODATA
from segpipe.io.store import read_geo

PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def export_cog(result_path: str, dest: str | Path, block: int = 512) -> Path:
    """Write ``class`` of the result store to ``dest`` as a COG with the scene CRS and transform."""
    group = zarr.open_group(result_path, mode="r")
    arr = group["class"]
    crs, transform = read_geo(dict(group.attrs))
    names = list(group.attrs.get("class_names", []))
    h, w = arr.shape
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.staging.tif")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    mpp = group.attrs.get("mpp")
    geo = {"crs": crs, "transform": transform} if crs is not None else {}
    profile = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "uint8", **geo,
               "nodata": NODATA, "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate"}
    try:
        with rasterio.open(staging, "w", **profile) as ds:
            for tile in TileGrid((h, w), block):
                win = tile.core
                ds.write(np.asarray(arr[win.slices]), 1,
                         window=((win.row0, win.row1), (win.col0, win.col1)))
            ds.write_colormap(1, {i: PALETTE[i % len(PALETTE)] for i in range(max(1, len(names)))})
            ds.update_tags(class_names=",".join(names))
            if crs is None and mpp:
                ds.update_tags(TIFFTAG_XRESOLUTION=1e4 / mpp[0], TIFFTAG_YRESOLUTION=1e4 / mpp[1],
                               TIFFTAG_RESOLUTIONUNIT=3, mpp=f"{mpp[0]},{mpp[1]}")
            ds.set_band_description(1, "class")
        rasterio.shutil.copy(staging, tmp, driver="COG", compress="DEFLATE", overview_resampling="NEAREST",
                             blocksize=512)
        os.replace(tmp, dest)
    finally:
        for p in (staging, tmp):
            if p.exists():
                p.unlink()
    return dest
