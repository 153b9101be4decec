"""A crash loses at most the batches in flight: SIGKILL the whole run, or one Dask worker."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from distributed import Client
from helpers import class_map, run

from segpipe.io.store import Marks

TILE = 512


@pytest.fixture(scope="module")
def job(big_scene, tiny_model):
    return {"input": str(big_scene), "tile_size": TILE, "keep_work": True,
            "method": {"name": "unet", "model": str(tiny_model), "patch_size": 128, "batch_size": 4}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, client, job):
    return class_map(run(client, tmp_path_factory.mktemp("ref"), **job))


def expected_batches(out, patch: int = 128, batch: int = 4) -> int:
    """Batches of the job, counted here from the ingested validity: patches holding a valid pixel / batch size."""
    import zarr

    from segpipe.tiling.grid import PatchGrid
    valid = zarr.open_array(str(out / "scene.zarr"), path="valid", mode="r")[:] > 0
    grid = PatchGrid(valid.shape, patch, 0.25)
    rows, cols = grid.counts
    n = sum(valid[grid.window((i, j)).slices].any() for i in range(rows) for j in range(cols))
    return -(-n // batch)


def wait_for_marks(marks: Marks, at_least: int, proc=None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(marks.keys()) < at_least:
        assert time.time() < deadline, "run made no progress"
        assert proc is None or proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.05)


def mtimes(marks: Marks) -> dict[str, int]:
    return {k: (marks.dir / k).stat().st_mtime_ns for k in marks.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["cli", "prefect-flow"])
def test_sigkill_of_the_run_then_rerun_redoes_only_unfinished_batches(tmp_path, job, reference, runner):
    """SIGKILL of `segpipe run`, or of the Prefect flow process (with its own ephemeral Prefect server)."""
    out = tmp_path / "out"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**job, "output": str(out), "cluster": {"n_workers": 2}}))
    infer_marks = Marks(out / "work.zarr", "infer")
    command = [sys.executable, "-m", "segpipe.cli", "run", str(path)] if runner == "cli" else \
        [sys.executable, "-m", "segpipe_flows.segment_scene", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    try:
        wait_for_marks(infer_marks, 3, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its scheduler and its workers, all at once
        proc.wait()
    done_before = mtimes(infer_marks)
    total = expected_batches(out)  # batches of the global patch grid, whatever the tile size
    assert 3 <= len(done_before) < total, "kill came too late to leave unfinished batches"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr
    after = mtimes(infer_marks)
    assert len(after) == total
    redone = {k for k, t in after.items() if done_before.get(k) != t}
    assert redone == set(after) - set(done_before), "finished batches were computed again"
    assert len(redone) == total - len(done_before)
    np.testing.assert_array_equal(class_map_at(out), reference)


def class_map_at(out):
    import zarr
    return np.asarray(zarr.open_array(str(out / "result.zarr"), path="class", mode="r")[:])


@pytest.mark.slow
def test_killing_a_worker_mid_run_still_gives_the_same_output(tmp_path, job, reference, dask_cli_cluster):
    """A real `dask scheduler` and `dask worker` processes; one worker is SIGKILLed while tiles are in flight."""
    out = tmp_path / "out"
    with Client(dask_cli_cluster) as c:
        pids = c.run(os.getpid)
        result: dict = {}

        def go():
            try:
                result["outcome"] = run(c, out, **{**job, "keep_work": False})  # patches freed while stitching
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        t = threading.Thread(target=go)
        t.start()
        wait_for_marks(Marks(out / "work.zarr", "infer"), 2)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=600)
        assert not t.is_alive()
        assert "error" not in result, result.get("error")
        assert victim not in c.run(os.getpid).values(), "the worker was not really killed"
    np.testing.assert_array_equal(class_map(result["outcome"]), reference)
