"""Peak resident memory of a whole run at 1x and 16x scene size, for otsu and the U-Net.

Each run is ``segpipe run`` in a child process with its own LocalCluster (2 workers x 1 thread); the
peak of the summed RSS of the child and all its worker processes is sampled every 50 ms. Both scenes
use the job's default tile (512), so the 1x scene (1024²) already has several tiles in flight and
both workers load the model: the ratio compares like with like. Streaming ingest and tile-wise work
should keep the 16x peak close to the 1x peak (goal <= 1.2).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import MODEL, mosaic_scene, run_sampled, segpipe_cli

METHODS = {"otsu": {"name": "otsu"},
           "unet": {"name": "unet", "model": str(MODEL), "patch_size": 256, "overlap": 0.25, "batch_size": 8}}


def run(base: int = 1024) -> dict:
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scenes = {factor: mosaic_scene(tmp / f"s{factor}.tif", base * (1 if factor == 1 else 4)) for factor in (1, 16)}
        for name, method in METHODS.items():
            res[name] = {}
            for factor, scene in scenes.items():
                job = {"input": str(scene), "output": str(tmp / f"{name}{factor}"), "method": method,
                       "cluster": {"n_workers": 2, "threads_per_worker": 1}}
                r = run_sampled(segpipe_cli(job, tmp / "job.yaml"))
                res[name][factor] = {"size": base * (1 if factor == 1 else 4), "peak_rss_mib": r["peak_rss_mib"],
                                     "seconds": r["seconds"]}
            res[name]["ratio"] = res[name][16]["peak_rss_mib"] / res[name][1]["peak_rss_mib"]
    return res


if __name__ == "__main__":
    print(run())
