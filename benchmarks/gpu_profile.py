"""Where a GPU model job's time goes: Dask's statistical profiler over every worker during one run.

``python benchmarks/gpu_profile.py [size]`` on a GPU host prints the functions with the most samples
(own time and time including callees) per worker kind (gpu-*/cpu-*), so a short device lease says what
bounds the end-to-end rate. Not part of ``make bench``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import MODEL, mosaic_scene

from segpipe.config import job_from_dict
from segpipe.pipeline import check, run_job
from segpipe.runtime.cluster import connect


def flatten(node: dict, stack: tuple = (), own: Counter | None = None, total: Counter | None = None):
    """Own and inclusive sample counts per function from distributed's profile tree."""
    own = Counter() if own is None else own
    total = Counter() if total is None else total
    name = node.get("description", {})
    key = f"{name.get('filename', '?').split('/site-packages/')[-1]}:{name.get('name', '?')}" if name else "root"
    if key not in stack:
        total[key] += node["count"]
    own[key] += node["count"] - sum(c["count"] for c in node["children"].values())
    for child in node["children"].values():
        flatten(child, (*stack, key), own, total)
    return own, total


def main(size: int = 8192, batch: int = 32) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = mosaic_scene(tmp / "scene.tif", size)
        job = job_from_dict({"input": str(scene), "output": str(tmp / "out"), "tile_size": 1024,
                             "method": {"name": "unet", "model": str(MODEL), "batch_size": batch},
                             "cluster": {"n_workers": 4, "threads_per_worker": 2, "gpu": "auto"}}, tmp)
        with connect(job.cluster) as client:
            client.profile(start=time.time())
            t0 = time.time()
            outcome = run_job(check(job), client)
            print(f"run_job {time.time() - t0:.1f} s; stages {outcome.stage_seconds}")
            workers = client.scheduler_info(n_workers=-1)["workers"]
            for kind in ("gpu", "cpu"):
                addrs = [a for a, w in workers.items() if str(w.get("name", "")).startswith("gpu") == (kind == "gpu")]
                if not addrs:
                    continue
                tree = client.profile(start=t0, workers=addrs)
                own, total = flatten(tree)
                print(f"== {kind} workers {len(addrs)}: {tree['count']} samples")
                print("  own:", *[f"\n    {n:6d} {k}" for k, n in own.most_common(18)])
                print("  incl:", *[f"\n    {n:6d} {k}" for k, n in total.most_common(25)])


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
