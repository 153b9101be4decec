"""Clusters segpipe creates on real engines, started for real on this machine (tests/engines.py): a single-node
SLURM (slurmctld, slurmd, munged) whose workers are real ``sbatch`` jobs, and a dask-gateway-server with its
local-process backend. The same job must give a bit-identical class map and identical metrics on a local
cluster, on SLURM and on the gateway; a SLURM worker cancelled mid-run is replaced under ``adapt``; a cluster that
cannot start fails in one line with nothing written; SLURM speaks TLS only; a gateway password given in the
environment appears in no file the run writes. Every engine process is stopped by its id at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import BUILDINGS, SCENE
from engines import gateway_available, gateway_engine, require, slurm_available, slurm_engine
from helpers import assert_one_line_error, cli

from segpipe.config import job_from_dict
from segpipe.pipeline import check, leased, run_job
from segpipe.runtime.cluster import connect

pytestmark = pytest.mark.slow

JOB = {"input": str(SCENE), "tile_size": 256, "method": {"name": "otsu"}, "truth": {"path": str(BUILDINGS)},
       "class_names": ["background", "building"]}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require(slurm_available())
    with slurm_engine(tmp_path_factory.mktemp("slurm")) as engine:
        yield engine
        started = engine.pids()
    assert not engine.pids() and started  # everything it started is gone


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    require(gateway_available())
    with gateway_engine(tmp_path_factory.mktemp("gateway")) as engine:
        yield engine
    assert not engine.pids()


def _live_workers(slurm) -> list[dict]:
    return [j for j in slurm.squeue() if j["name"] == "segpipe-worker" and j["state"] in ("PENDING", "RUNNING")]


def _slurm_cluster(tmp: Path, **more) -> dict:
    return {"kind": "slurm", "n_workers": 2, "memory_limit": "2GiB", "start_timeout": 180,
            "slurm": {"queue": "debug", "walltime": "00:30:00", "shared_directory": str(tmp / "shared")}, **more}


def _run(tmp: Path, name: str, cluster: dict, during=None) -> Path:
    """Run JOB into ``tmp/name`` through the CLI's own path (check, lease, connect, run_job); ``during(client)``
    is called as the segment stage begins, with the cluster up."""
    out = tmp / name
    job = job_from_dict({**JOB, "output": str(out), "cluster": cluster}, Path.cwd())
    c = check(job)

    def runner(stage, work):
        if stage == "segment" and during is not None:
            during(client)
        return work(client)

    with leased(c), connect(job.cluster, in_process=False) as client:
        run_job(c, client, runner=runner)
    return out


def _results(out: Path) -> tuple[np.ndarray, dict, str]:
    cls = np.asarray(zarr.open_array(str(out / "result.zarr"), path="class", mode="r")[:])
    summary = json.loads((out / "metrics" / "summary.json").read_text())
    scores = {"summary": summary["summary"], "tiles": summary["tiles"]}
    return cls, scores, (out / "metrics" / "tiles.csv").read_text()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    return _results(_run(tmp, "local", {"kind": "local", "processes": "yes"}))


def _assert_same(out: Path, reference) -> None:
    cls, scores, tiles = _results(out)
    assert np.array_equal(cls, reference[0])
    assert scores == reference[1] and scores["summary"]["global_mean_iou"] > 0
    assert tiles == reference[2]


def test_slurm_workers_are_sbatch_jobs_speak_tls_only_and_give_the_local_results(tmp_path, slurm, local_reference):
    seen: dict = {}

    def during(client):
        seen["jobs"] = _live_workers(slurm)
        seen["workers"] = len(client.scheduler_info()["workers"])
        address = client.scheduler.address
        seen["address"] = address
        from distributed import Client

        with pytest.raises((OSError, TimeoutError)):  # a client without the run's certificate gets nowhere
            Client(address.replace("tls://", "tcp://"), timeout="5s")
        with pytest.raises((OSError, TimeoutError, TypeError)):
            Client(address, timeout="5s")

    out = _run(tmp_path, "slurm", _slurm_cluster(tmp_path), during)
    _assert_same(out, local_reference)
    assert seen["address"].startswith("tls://")
    assert len(seen["jobs"]) == 2 and {j["state"] for j in seen["jobs"]} <= {"RUNNING", "PENDING"}
    assert seen["workers"] >= 1
    assert not _live_workers(slurm)  # torn down: no worker job left running or queued
    runs = tmp_path / "shared" / "runs"
    assert not list(runs.iterdir())  # the run's certificate folder is gone after success


def test_a_cancelled_slurm_worker_is_replaced_under_adapt_and_the_run_finishes_identical(
        tmp_path, slurm, local_reference):
    seen: dict = {}

    def during(client):
        running = [j["job_id"] for j in _live_workers(slurm)]
        seen["before"] = set(running)
        slurm.scancel(running[0])
        deadline = time.monotonic() + 240  # a condition waited for, with a generous bound: adapt's replacement
        while time.monotonic() < deadline:
            now = {j["job_id"] for j in _live_workers(slurm)}
            if now - seen["before"]:
                seen["after"] = now
                break
            time.sleep(0.5)

    out = _run(tmp_path, "adapt", _slurm_cluster(tmp_path, adapt={"minimum": 2, "maximum": 2}), during)
    assert seen.get("after"), "no replacement worker job was submitted"
    _assert_same(out, local_reference)


def test_a_slurm_cluster_that_cannot_start_fails_in_one_line_and_writes_nothing(tmp_path, slurm):
    out = tmp_path / "out"
    cluster = _slurm_cluster(tmp_path)
    cluster["slurm"]["queue"] = "nosuchpartition"
    proc = cli(tmp_path, {**JOB, "output": str(out), "cluster": cluster})
    assert_one_line_error(proc, "SLURM refuses segpipe's worker job", "partition")
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "SLURM refuses segpipe's worker job")
    assert not out.exists()
    assert not _live_workers(slurm)


def test_a_gateway_cluster_gives_the_local_results_and_its_password_is_written_nowhere(
        tmp_path, gateway, local_reference, monkeypatch):
    monkeypatch.setenv("SEGPIPE_TEST_GATEWAY_PASSWORD", gateway.password)
    cluster = {"kind": "gateway", "n_workers": 2, "start_timeout": 120,
               "gateway": {"address": gateway.address, "proxy_address": gateway.proxy_address, "auth": "basic",
                           "username": "alice", "password_env": "SEGPIPE_TEST_GATEWAY_PASSWORD",
                           "options": {"worker_cores": 1}}}
    seen: dict = {}

    def during(client):
        seen["env"] = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        seen["resources"] = {w["resources"].get("CPU") for w in client.scheduler_info()["workers"].values()}

    out = _run(tmp_path, "gateway", cluster, during)
    _assert_same(out, local_reference)
    assert set(seen["env"].values()) == {str(128 * 2**20)}  # the workers got segpipe's environment
    assert seen["resources"] == {1}
    secret = gateway.password.encode()
    for f in out.rglob("*"):
        if f.is_file():
            assert secret not in f.read_bytes(), f
    with gateway.gateway() as gw:
        assert not gw.list_clusters()  # torn down
    refused = tmp_path / "refused"
    proc = cli(tmp_path, {**JOB, "output": str(refused), "cluster": {
        **cluster, "gateway": {**cluster["gateway"], "options": {"no_such_option": 1}}}})
    assert_one_line_error(proc, "offers no no_such_option", "worker_cores")
    assert not refused.exists()


def _cli_popen(tmp_path: Path, job: dict) -> subprocess.Popen:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    # faulthandler: a run that has to be aborted (SIGABRT) prints every thread's stack (see _finish)
    return subprocess.Popen([sys.executable, "-m", "segpipe.cli", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The run's stderr once it has exited; one still running after ``timeout`` s fails the test with where each
    of its threads was (faulthandler's dump on SIGABRT), since a hang that is not shown cannot be fixed."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stderr = proc.communicate(timeout=60)[1]
        pytest.fail(f"segpipe run still running {timeout:g} s later; its threads:\n{stderr[-20000:]}")


def _await(condition, what: str, timeout: float = 120) -> None:
    """Until ``condition()`` holds (a state awaited, with a generous bound), else fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["ctrl-c", "timeout"])
def test_a_slurm_cluster_is_torn_down_on_ctrl_c_and_when_no_worker_comes(tmp_path, slurm, how):
    """Worker jobs held in the queue (``--begin`` an hour from now): Ctrl-C while segpipe waits for them, or a
    ``start_timeout`` that runs out, ends the run in one line with its jobs cancelled and nothing written."""
    out = tmp_path / "out"
    cluster = _slurm_cluster(tmp_path, start_timeout=600 if how == "ctrl-c" else 8)
    cluster["slurm"]["job_directives"] = ["--begin=now+3600"]
    proc = _cli_popen(tmp_path, {**JOB, "output": str(out), "cluster": cluster})
    try:
        _await(lambda: any(j["name"] == "segpipe-worker" and j["state"] == "PENDING" for j in slurm.squeue()),
               "the worker jobs to be queued")
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        stderr = _finish(proc)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert "Traceback" not in stderr, stderr
        if how == "ctrl-c":
            assert proc.returncode == 130 and lines[-1] == "segpipe: interrupted", stderr
        else:
            assert proc.returncode == 2, stderr
            assert lines[-1].startswith("segpipe: error: no worker of the slurm cluster started within 8 s (jobs "), \
                stderr
            assert "PENDING" in lines[-1] and "BeginTime" in lines[-1], lines[-1]
        _await(lambda: not [j for j in slurm.squeue() if j["name"] == "segpipe-worker" and j["state"] == "PENDING"],
               "the worker jobs to be cancelled", 30)
        assert not out.exists()
    finally:  # whatever failed, the next test meets an empty queue
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for job in slurm.squeue():
            if job["name"] == "segpipe-worker":
                slurm.scancel(job["job_id"])
