"""`segpipe run --scheduler`: a real scheduler and worker processes started with the dask CLI."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BUILDINGS, SCENE
from distributed import Client


@pytest.fixture
def dask_cli_cluster(tmp_path):
    dask = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sched_file)], stderr=subprocess.DEVNULL)]
    deadline = time.time() + 60
    while not sched_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(sched_file), "--nworkers", "2",
                                   "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
                                  stderr=subprocess.DEVNULL))
    address = json.loads(sched_file.read_text())["address"]
    with Client(address) as c:
        c.wait_for_workers(2, timeout=60)
    yield address
    for p in reversed(procs):
        p.terminate()
        p.wait(timeout=30)


def test_run_on_an_existing_scheduler_loads_the_model_once_per_worker(tmp_path, dask_cli_cluster, tiny_model):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "input": str(SCENE), "output": str(tmp_path / "out"), "tile_size": 256,
        "method": {"name": "unet", "model": str(tiny_model), "patch_size": 128, "batch_size": 4},
        "truth": {"path": str(BUILDINGS)}, "class_names": ["a", "b", "c"]}))
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "run", str(job), "--scheduler", dask_cli_cluster],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "segmentation.tif").is_file()

    def loads():
        from segpipe.infer import _cached
        info = _cached.cache_info()
        return info.misses, info.hits

    with Client(dask_cli_cluster) as c:
        per_worker = c.run(loads)
    assert len(per_worker) == 2
    used = [v for v in per_worker.values() if sum(v) > 0]
    assert used, "no worker ran the model"
    assert all(misses == 1 for misses, _ in used), per_worker  # loaded once, then reused from the cache
    assert sum(hits for _, hits in used) + len(used) == 16  # one lookup per tile task
