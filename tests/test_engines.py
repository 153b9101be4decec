"""The real engines of tests/engines.py: they start, run work, and leave no process of theirs behind.

Other tests rely on these context managers to reach SLURM and Dask Gateway for real, and on their cleanup to stop
exactly what they started (by pid), so both halves are checked here against the engines themselves.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
from engines import gateway_available, gateway_engine, require, slurm_available, slurm_engine

pytestmark = pytest.mark.slow


def _alive(pids: set[int], since: float) -> list[str]:
    """The processes among ``pids`` still running (not zombies) that were started after ``since`` (epoch s): a pid
    reused by an unrelated later process does not count."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.create_time() >= since - 1 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {p.name()} {p.cmdline()}")
        except psutil.NoSuchProcess:
            continue
    return out


def _names(procs: set[psutil.Process]) -> set[str]:
    names = set()
    for p in procs:
        try:
            names.add(p.name())
        except psutil.NoSuchProcess:
            continue
    return names


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def test_slurm_engine_runs_a_job_and_leaves_nothing(tmp_path: Path) -> None:
    require(slurm_available())
    before_conf = os.environ.get("SLURM_CONF")
    children_before = _children()
    started = time.time()
    seen: set[int] = set()
    with slurm_engine(tmp_path) as slurm:
        assert os.environ["SLURM_CONF"] == str(slurm.conf)
        assert slurm.partition == "debug"
        assert slurm.node_state() == "idle"
        out = tmp_path / "job.out"
        job = slurm.sbatch("--wrap", "sleep 3; echo done", "-o", str(out), "-J", "probe")
        assert {"job_id": job, "name": "probe"}.items() <= next(
            j for j in slurm.squeue() if j["job_id"] == job).items()
        _wait(lambda: any(j["job_id"] == job and j["state"] == "RUNNING" for j in slurm.squeue()), 60, "job running")
        seen |= slurm.pids() | _children()
        names = _names(slurm.processes())
        assert {"munged", "slurmctld", "slurmd", "slurmstepd"} <= names, names
        _wait(lambda: all(j["job_id"] != job for j in slurm.squeue()), 60, "job finished")
        assert out.read_text().strip() == "done"
        # a job still running at the end is cancelled, its processes stopped
        slurm.sbatch("--wrap", "sleep 300", "-o", str(tmp_path / "long.out"))
        _wait(lambda: any(j["state"] == "RUNNING" for j in slurm.squeue()), 60, "second job running")
        seen |= slurm.pids() | _children()
    assert os.environ.get("SLURM_CONF") == before_conf
    assert not _alive(seen - children_before, started)
    assert not _alive(_children() - children_before, started)


def test_gateway_engine_runs_a_cluster_and_leaves_nothing(tmp_path: Path) -> None:
    require(gateway_available())
    from dask_gateway import BasicAuth, Gateway

    children_before = _children()
    started = time.time()
    seen: set[int] = set()
    with gateway_engine(tmp_path) as engine:
        assert engine.address.startswith("http://127.0.0.1:")
        assert engine.proxy_address == engine.address.replace("http://", "gateway://")
        # what a plain client does
        plain = Gateway(engine.address, proxy_address=engine.proxy_address,
                        auth=BasicAuth(engine.username, engine.password))
        assert plain.list_clusters() == []
        with engine.gateway(auth=BasicAuth(engine.username, "not-the-password")) as intruder:
            with pytest.raises(Exception, match="401|Unauthorized"):
                intruder.list_clusters()
        with engine.gateway() as gateway:
            options = gateway.cluster_options()
            assert {"worker_cores", "worker_memory", "environment"} <= set(options)
            options.worker_cores = 1
            options.worker_memory = 1.5
            options.environment = {"SEGPIPE_PROBE": "from-the-gateway"}
            cluster = gateway.new_cluster(options)
            try:
                cluster.scale(1)
                with cluster.get_client() as client:
                    client.wait_for_workers(1, timeout=120)
                    assert client.submit(lambda: 1 + 1).result(timeout=60) == 2
                    # a function of the worker's own os.environ (os.environ.get would pickle the client's copy)
                    probe = client.submit(lambda: __import__("os").environ.get("SEGPIPE_PROBE")).result(timeout=60)
                    assert probe == "from-the-gateway"
                    (worker,) = client.scheduler_info()["workers"].values()
                    assert worker["nthreads"] == 1
                    assert worker["memory_limit"] == int(1.5 * 2**30)
                    seen |= engine.pids() | _children()
                    names = _names(engine.processes())
                    assert "dask-gateway-proxy" in names, names
                    assert len(engine.pids()) >= 4  # server, proxy, scheduler, worker (and its nanny's process)
                # left running on purpose: the engine's exit must stop the cluster's processes too
            except BaseException:
                cluster.shutdown()
                raise
            cluster.close(shutdown=False)
    assert not _alive(seen - children_before, started)
    assert not _alive(_children() - children_before, started)
