"""`segpipe run --scheduler`: a real scheduler and worker processes started with the dask CLI."""

import subprocess
import sys

import pytest
import yaml
from conftest import BUILDINGS, SCENE
from distributed import Client


@pytest.mark.slow
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
        from segpipe.methods.infer import _cached
        info = _cached.cache_info()
        return info.misses, info.hits

    with Client(dask_cli_cluster) as c:
        per_worker = c.run(loads)
    assert len(per_worker) == 2
    used = [v for v in per_worker.values() if sum(v) > 0]
    assert used, "no worker ran the model"
    assert all(misses == 1 for misses, _ in used), per_worker  # loaded once, then reused from the cache
    assert sum(hits for _, hits in used) >= 1  # several units of batches, one lookup each
