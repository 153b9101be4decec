"""Scale: a 1.6 Gpx scene (40000 x 40000) end to end with otsu, against the plain Dask pipeline.

The scene is derived (never committed): the SpaceNet sample (900² uint16) tiled with flips to 40000²,
written row block by row block as a 256-px tiled deflate GeoTIFF (so segpipe reads it in place; ~1.5 GB).
Contenders, each a whole child process on 2 workers x 1 thread, alternated: ``segpipe run`` (tile 2048)
and ``plain_dask_otsu.py``. Reported: wall time, peak RSS of the process tree, and the share of segpipe's
run spent in the COG export (from the times its stage lines appear on stdout).
Goals (issue 8): peak RSS < 1.5 GB, time <= 2 x plain Dask, export <= 15 % of the run.
Not in the default ``make bench`` set (one repetition takes several minutes): ``run_all.py scale``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import alternate, load_average, mosaic_scene, run_sampled, segpipe_cli

HERE = Path(__file__).resolve().parent


def run(size: int = 40000, tile: int = 2048, reps: int = 1) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEGPIPE_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        scene = mosaic_scene(tmp / "scene.tif", size, BIGTIFF="YES", num_threads="all_cpus")
        made = time.perf_counter() - t0
        n = {"k": 0}

        def segpipe_run() -> dict:
            n["k"] += 1
            out = tmp / f"seg{n['k']}"
            job = {"input": str(scene), "output": str(out), "tile_size": tile, "method": {"name": "otsu"},
                   "cluster": {"n_workers": 2, "threads_per_worker": 1}}
            r = run_sampled(segpipe_cli(job, tmp / "job.yaml"), lines=True)
            start = next(t for t, line in r["lines"] if line.startswith("segpipe: export"))
            end = next(t for t, line in r["lines"] if line.startswith("export:"))
            r["export_share"] = (end - start) / r["seconds"]
            shutil.rmtree(out)  # 1.6 GB of results per run
            return r

        def plain_run() -> dict:
            n["k"] += 1
            out = tmp / f"p{n['k']}"
            r = run_sampled([sys.executable, str(HERE / "plain_dask_otsu.py"), str(scene), str(out)])
            shutil.rmtree(out)
            return r

        res = alternate({"segpipe": segpipe_run, "plain": plain_run}, reps)
    seg, plain = res["segpipe"], res["plain"]
    return {"size": size, "tile": tile, "reps": reps, "scene_seconds": made,
            "segpipe_s": [r["seconds"] for r in seg], "plain_s": [r["seconds"] for r in plain],
            "ratio": [s["seconds"] / p["seconds"] for s, p in zip(seg, plain, strict=True)],
            "segpipe_rss_mib": [r["peak_rss_mib"] for r in seg], "plain_rss_mib": [r["peak_rss_mib"] for r in plain],
            "export_share": [r["export_share"] for r in seg], "load": load_average()}


if __name__ == "__main__":
    print(run())
