"""Ingest (GeoTIFF -> scene.zarr) vs decoding the same windows and vs rioxarray -> to_zarr, on the same workers.

A derived 8192² uint16 deflate-tiled GeoTIFF (the SpaceNet sample mosaicked with flips). One LocalCluster
of 2 workers x 1 thread serves all three contenders, alternated and repeated:
- segpipe: the ingest stage as a job runs it: the tiled source is read in place, so ingest decodes
  validity from GDAL's dataset mask (all-valid windows are not written) and leaves completion marks;
- segpipe copy: the same with ``pixels: copy`` (pixels copied into scene.zarr, as for strip TIFFs);
- decode: rasterio reads of the same 512-px row windows on the workers, pixels thrown away (the floor);
- rioxarray: ``open_rasterio(chunks=512).to_zarr()``, pixels only.
Goals (issue 8): segpipe >= 0.8 x decode and >= 1.5 x rioxarray.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import rasterio
from common import alternate, load_average, median_spread, mosaic_scene

from segpipe.config import ClusterSpec, job_from_dict
from segpipe.runtime.cluster import connect
from segpipe.tiling.ingest import ingest, source_info

CHUNK = 512


def _decode_row(src: str, row: int, chunk: int) -> int:
    with rasterio.open(src) as ds:
        r0, r1 = row * chunk, min(ds.height, (row + 1) * chunk)
        data = ds.read(window=((r0, r1), (0, ds.width)))
        mask = ds.dataset_mask(window=((r0, r1), (0, ds.width)))
    return int(data.shape[-1] + mask.shape[-1])


def run(size: int = 8192, reps: int = 3) -> dict:
    import rioxarray

    with tempfile.TemporaryDirectory() as tmp, connect(ClusterSpec(n_workers=2, threads_per_worker=1)) as client:
        tmp = Path(tmp)
        scene = mosaic_scene(tmp / "scene.tif", size)
        info = source_info(str(scene))
        client.run(lambda: None)

        def segpipe_ingest(pixels: str = "auto") -> float:
            out = tmp / "seg"
            shutil.rmtree(out, ignore_errors=True)
            job = job_from_dict({"input": str(scene), "output": str(out), "method": {"name": "otsu"},
                                 "pixels": pixels}, tmp)
            t0 = time.perf_counter()
            ingest(job, info, client)
            return time.perf_counter() - t0

        def decode() -> float:
            t0 = time.perf_counter()
            rows = range(-(-size // CHUNK))
            client.gather(client.map(_decode_row, [str(scene)] * len(rows), rows, chunk=CHUNK, pure=False))
            return time.perf_counter() - t0

        def rio_to_zarr() -> float:
            out = tmp / "rx.zarr"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            da = rioxarray.open_rasterio(scene, chunks={"band": 1, "y": CHUNK, "x": CHUNK})
            da.to_dataset(name="image").to_zarr(out, mode="w", consolidated=False)
            return time.perf_counter() - t0

        res = alternate({"segpipe": segpipe_ingest, "copy": lambda: segpipe_ingest("copy"), "decode": decode,
                         "rioxarray": rio_to_zarr}, reps)
    mpx = size * size / 1e6

    def ratio(a: str, b: str) -> list[float]:
        return [y / x for x, y in zip(res[a], res[b], strict=True)]

    return {"size": size, "reps": reps, **{f"{k}_s": v for k, v in res.items()},
            "segpipe_over_decode": ratio("segpipe", "decode"), "segpipe_over_rioxarray": ratio("segpipe", "rioxarray"),
            "copy_over_decode": ratio("copy", "decode"), "copy_over_rioxarray": ratio("copy", "rioxarray"),
            "segpipe_mpx_s": mpx / median_spread(res["segpipe"])[0], "load": load_average(),
            "note": "ratios are speed ratios (time of the other / time of segpipe)"}


if __name__ == "__main__":
    print(run())
