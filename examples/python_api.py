"""A notebook session with segpipe's Python API, on the embedded SpaceNet sample (run: python examples/python_api.py).

Each numbered block is a notebook cell (in a notebook, without the ``main`` wrapper): segment a file with the
shipped U-Net and read the scores, reopen the result later, segment an xarray DataArray already in memory, and
keep working on the class map with xarray.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import rioxarray
from distributed import Client, LocalCluster

import segpipe

SAMPLE = Path(segpipe.__file__).parent / "sample"


def main(out: Path) -> None:
    """The session; a script needs it under ``__main__`` (Dask's worker processes re-import this file)."""
    # One Dask cluster for the session; every call below runs on it (without client=, each call starts its own).
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        # 1. A GeoTIFF with the shipped model and its ground truth: a lazy Dataset on out/unet/result.zarr.
        model = {"name": "unet", "model": str(SAMPLE / "unet_spacenet.pt"), "patch_size": 256, "batch_size": 4}
        ds = segpipe.segment(SAMPLE / "spacenet_pan.tif", model, tile_size=256, output=out / "unet", client=client,
                             truth=SAMPLE / "spacenet_buildings.geojson", class_names=["background", "building"],
                             probabilities=True, progress=False)
        print(ds)  # class (uint8), truth (uint8), probability (class_index, y, x) float16
        confident = float((ds["probability"].max("class_index") > 0.9).mean())
        print(f"{confident:.1%} of pixels classified with probability > 0.9")
        print(f"building IoU {ds.attrs['iou_building']:.3f}, mean IoU {ds.attrs['mean_iou']:.3f}, CRS {ds.rio.crs}")
        tiles = ds.segpipe.tiles  # one row per tile: position, pixels, accuracy, IoU/Dice per class
        print(tiles[["tile", "pixels", "iou_building"]].sort_values("iou_building").head(3).to_string(index=False))

        # 2. Later, or in another process: the same result without running anything.
        again = segpipe.open_result(out / "unet")
        assert (again["class"] == ds["class"]).all()

        # 3. Pixels already in memory (an xarray DataArray with a CRS, e.g. from rioxarray, odc-stac or stackstac).
        scene = rioxarray.open_rasterio(SAMPLE / "spacenet_pan.tif").load()
        clusters = segpipe.segment(scene, {"name": "kmeans", "params": {"k": 3}}, tile_size=512,
                                   output=out / "kmeans", client=client, progress=False)

        # 4. Plain xarray from here on: share of building pixels per k-means cluster, and an area in m^2.
        building = ds["class"] == 1
        for k in range(3):
            share = float(building.where(clusters["class"] == k).mean())
            print(f"k-means cluster {k}: {share:.1%} building pixels")
        res = abs(ds.rio.resolution()[0])
        area, total = int(building.sum()) * res * res, np.prod(building.shape) * res * res
        print(f"building area {area:.0f} m^2 over {total:.0f} m^2")
        print(f"results in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="segpipe-example-")))
