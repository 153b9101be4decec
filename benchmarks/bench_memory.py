"""Peak resident memory of a whole run at 1x and 16x scene size.

The run goes in a child process with its own LocalCluster; the peak of the summed RSS of the
child and all its worker processes is sampled every 50 ms. Streaming ingest and tile-wise
segmentation should keep the 16x peak close to the 1x peak.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from common import MODEL, ROOT, mosaic_scene


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss_of_run(scene: Path, out: Path) -> tuple[float, float]:
    job = out.parent / f"{out.name}.yaml"
    job.write_text(yaml.safe_dump({
        "input": str(scene), "output": str(out), "tile_size": 1024,
        "method": {"name": "unet", "model": str(MODEL), "patch_size": 256, "overlap": 0.25, "batch_size": 4},
        "cluster": {"n_workers": 2, "threads_per_worker": 1}}))
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "segpipe.cli", "run", str(job)], cwd=ROOT,
                             stdout=subprocess.DEVNULL)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.05)
    if child.returncode:
        raise RuntimeError(f"run failed with {child.returncode}")
    return peak / 2**20, time.perf_counter() - t0


def run(base: int = 1024) -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for factor, size in ((1, base), (16, base * 4)):
            scene = mosaic_scene(Path(tmp) / f"s{factor}.tif", size)
            peak, secs = peak_rss_of_run(scene, Path(tmp) / f"out{factor}")
            res[factor] = {"size": size, "peak_rss_mib": peak, "seconds": secs}
    res["ratio_16x_over_1x"] = res[16]["peak_rss_mib"] / res[1]["peak_rss_mib"]
    return res


if __name__ == "__main__":
    print(run())
