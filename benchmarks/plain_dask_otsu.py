"""The plain Dask pipeline that segpipe's cheap-method path is measured against (run as a child process).

``rioxarray.open_rasterio(chunks=)`` -> scene-wide Otsu threshold from a Dask histogram ->
``dask.array.map_overlap`` -> ``to_zarr`` -> GDAL COG, on a LocalCluster of 2 workers x 1 thread, the
same layout as segpipe's. Chunks of 512 px, Dask's usual advice (a stronger baseline than 128 px).
Usage: ``python plain_dask_otsu.py SCENE.tif OUT_FOLDER``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dask.array as da
import numpy as np
import rasterio
import rasterio.shutil
import rioxarray
import zarr
from distributed import Client, LocalCluster
from skimage.filters import threshold_otsu


def main(src: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        img = rioxarray.open_rasterio(src, chunks={"band": 1, "y": 512, "x": 512}).squeeze("band", drop=True)
        data = img.data.astype(np.float32)
        lo, hi = da.compute(data.min(), data.max())
        counts, edges = da.histogram(data, bins=1024, range=(float(lo), float(hi)))
        counts = counts.compute()
        t = threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2))
        cls = da.map_overlap(lambda b: (b > t).astype(np.uint8), data, depth=0, dtype=np.uint8)
        cls.to_zarr(str(out_dir / "class.zarr"), overwrite=True)
    arr = zarr.open_array(str(out_dir / "class.zarr"), mode="r")
    profile = {"driver": "GTiff", "height": arr.shape[0], "width": arr.shape[1], "count": 1, "dtype": "uint8",
               "crs": img.rio.crs, "transform": img.rio.transform(), "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "deflate"}
    staging = out_dir / "staging.tif"
    with rasterio.open(staging, "w", **profile) as ds:
        for r in range(0, arr.shape[0], 512):
            ds.write(arr[r:r + 512], 1, window=((r, min(arr.shape[0], r + 512)), (0, arr.shape[1])))
    rasterio.shutil.copy(staging, out_dir / "segmentation.tif", driver="COG", compress="DEFLATE",
                         overview_resampling="NEAREST", blocksize=512)
    staging.unlink()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
