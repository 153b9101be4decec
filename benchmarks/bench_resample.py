"""A model at its own resolution (issue 10): what the model grid costs beside a scene already at that resolution.

The demo U-Net (trained at 0.5 m) on a derived SpaceNet mosaic at 0.5 m (no resampling), and on the same area
at 1.0 m (GDAL area average: a quarter of the pixels), which segpipe resamples to the model's 0.5 m grid, runs
the same patches on, and brings back to 1.0 m. Both forward the same number of model-grid pixels, so the
ratio of their wall times is the price of the resampling reads, the model-grid blend and the way back.
Alternated and repeated, each a whole `segpipe run` process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from common import MODEL, alternate, load_average, mosaic_scene, run_sampled, segpipe_cli
from rasterio.warp import Resampling, reproject


def coarser(src_path: Path, dst_path: Path, factor: int) -> Path:
    """The scene at ``factor`` times its pixel size (GDAL average), same origin and CRS: a derived file."""
    with rasterio.open(src_path) as src:
        t = src.transform
        h, w = src.height // factor, src.width // factor
        out = np.zeros((h, w), src.dtypes[0])
        transform = Affine(t.a * factor, 0, t.c, 0, t.e * factor, t.f)
        reproject(src.read(1), out, src_transform=t, src_crs=src.crs, dst_transform=transform, dst_crs=src.crs,
                  resampling=Resampling.average)
        with rasterio.open(dst_path, "w", **{**src.profile, "height": h, "width": w, "transform": transform}) as dst:
            dst.write(out, 1)
    return dst_path


def run(size: int = 3072, reps: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scenes = {"native": mosaic_scene(tmp / "scene.tif", size)}
        scenes["coarser"] = coarser(scenes["native"], tmp / "scene_1m.tif", 2)
        n = {"k": 0}

        def contender(name: str):
            def go() -> dict:
                n["k"] += 1
                job = {"input": str(scenes[name]), "output": str(tmp / f"{name}{n['k']}"),
                       "method": {"name": "model", "model": str(MODEL), "patch_size": 256, "overlap": 0.25,
                                  "batch_size": 8}, "cluster": {"n_workers": 2, "threads_per_worker": 1}}
                r = run_sampled(segpipe_cli(job, tmp / "job.yaml"))
                r["model_mpx_s"] = size * size / r["seconds"] / 1e6  # model-grid pixels: the same for both
                return r
            return go

        res = alternate({name: contender(name) for name in scenes}, reps)
    rate = {name: [r["model_mpx_s"] for r in rs] for name, rs in res.items()}
    return {"size": size, "reps": reps, "model_mpx_s": rate, "load": load_average(),
            "coarser_over_native": [a / b for a, b in zip(rate["coarser"], rate["native"], strict=True)],
            "peak_rss_mib": {name: [r["peak_rss_mib"] for r in rs] for name, rs in res.items()}}


if __name__ == "__main__":
    print(run())
