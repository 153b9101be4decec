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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
from common import ROOT, SAMPLE, alternate, load_average, tree_rss
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent


def big_scene(path: Path, size: int) -> Path:
    """The derived mosaic, written one block row at a time (the benchmark process stays small)."""
    with rasterio.open(SAMPLE / "spacenet_pan.tif") as src:
        a = src.read(1)
        profile = src.profile
    profile.update(height=size, width=size, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                   predictor=2, BIGTIFF="YES", num_threads="all_cpus")
    reps = -(-size // a.shape[1])
    with rasterio.open(path, "w", **profile) as dst:
        for k, top in enumerate(range(0, size, a.shape[0])):
            tile = a if k % 2 == 0 else a[::-1]
            row = np.concatenate([tile if j % 2 == 0 else tile[:, ::-1] for j in range(reps)], axis=1)[:, :size]
            rows = min(a.shape[0], size - top)
            dst.write(row[None, :rows], window=Window(0, top, size, rows))
    return path


def timed_lines(command: list[str]) -> dict:
    """Run ``command``; wall time, peak tree RSS, and when each stdout line appeared (s since start)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in child.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))

    reader = threading.Thread(target=read)
    reader.start()
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.1)
    reader.join()
    if child.returncode:
        raise RuntimeError(f"{command} failed: {child.stderr.read()[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak / 2**20, "lines": lines}


def run(size: int = 40000, tile: int = 2048, reps: int = 1) -> dict:
    import yaml

    with tempfile.TemporaryDirectory(dir=os.environ.get("SEGPIPE_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        scene = big_scene(tmp / "scene.tif", size)
        made = time.perf_counter() - t0
        n = {"k": 0}

        def segpipe_run() -> dict:
            n["k"] += 1
            out = tmp / f"seg{n['k']}"
            job = tmp / "job.yaml"
            job.write_text(yaml.safe_dump({"input": str(scene), "output": str(out),
                                           "tile_size": tile, "method": {"name": "otsu"},
                                           "cluster": {"n_workers": 2, "threads_per_worker": 1}}))
            r = timed_lines([sys.executable, "-m", "segpipe.cli", "run", str(job)])
            start = next(t for t, line in r["lines"] if line.startswith("segpipe: export"))
            end = next(t for t, line in r["lines"] if line.startswith("export:"))
            r["export_share"] = (end - start) / r["seconds"]
            shutil.rmtree(out)  # 1.6 GB of results per run
            return r

        def plain_run() -> dict:
            n["k"] += 1
            out = tmp / f"p{n['k']}"
            r = timed_lines([sys.executable, str(HERE / "plain_dask_otsu.py"), str(scene), str(out)])
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
