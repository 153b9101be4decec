"""Cluster kinds in the job file, checked without a live engine: the settings each kind takes and refuses, the
worker environment SLURM jobs and Kubernetes pods get, the operator's CRD schema for the Kubernetes spec,
one-line refusals of a cluster that cannot start (nothing written), and a local run that listens on loopback only.
The live SLURM and Dask Gateway runs are in tests/test_cluster_engines.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml
from conftest import SCENE
from helpers import assert_one_line_error, check_error, cli
from test_infra import _crd_schema

from segpipe.config import ClusterSpec, job_from_dict
from segpipe.pipeline import check, run_job
from segpipe.runtime import kubernetes as kube
from segpipe.runtime import slurm
from segpipe.runtime.cluster import connect, describe
from segpipe.runtime.workers import WORKER_MALLOC_ENV

OTSU = {"input": str(SCENE), "tile_size": 256, "method": {"name": "otsu"}}


@pytest.mark.parametrize("cluster,words", [
    ({"kind": "gateway"}, ["cluster kind gateway needs a cluster.gateway section"]),
    ({"kind": "scheduler"}, ["needs cluster.scheduler"]),
    ({"kind": "slurm", "scheduler": "tcp://10.0.0.5:8786"}, ["cluster.scheduler is for kind scheduler"]),
    ({"adapt": {"minimum": 1, "maximum": 4}}, ["adapt scales a cluster segpipe creates"]),
    ({"kind": "slurm", "adapt": {"minimum": 5, "maximum": 2}}, ["adapt.minimum 5 is above adapt.maximum 2"]),
    ({"kind": "local", "tls": "yes"}, ["tls: yes is for slurm and gateway"]),
    ({"kind": "slurm", "gateway": {"address": "http://x"}}, ["cluster.gateway is set but the cluster kind is slurm"]),
    ({"kind": "slurm", "slurm": {"partition": "debug"}}, ["partition"]),
    ({"kind": "slurm", "tls_files": {"ca": "/nonexistent/ca.pem"}}, ["tls_files needs ca, cert and key"]),
])
def test_a_cluster_section_that_cannot_work_is_refused_in_one_line(tmp_path, cluster, words):
    message = check_error(tmp_path, {**OTSU, "output": str(tmp_path / "out"), "cluster": cluster})
    for w in words:
        assert w in message, message
    assert not (tmp_path / "out").exists()


def test_kinds_default_from_what_the_section_says():
    assert ClusterSpec().kind == "local" and ClusterSpec(scheduler="tcp://10.0.0.5:8786").kind == "scheduler"
    slurm_spec = ClusterSpec(kind="slurm", adapt={"minimum": 1, "maximum": 8})
    assert slurm_spec.slurm is not None and slurm_spec.creates
    assert slurm_spec.at("tcp://10.0.0.5:8786").kind == "scheduler"  # --scheduler replaces what the job makes
    assert "adapting between 1 and 8 workers" in describe(slurm_spec) and "TLS" in describe(slurm_spec)
    assert "TLS" not in describe(slurm_spec.model_copy(update={"tls": "no"}))


def test_slurm_worker_jobs_get_the_local_workers_environment_resources_and_one_gpu():
    from dask_jobqueue.slurm import SLURMJob

    spec = ClusterSpec(kind="slurm", threads_per_worker=2, memory_limit="3GiB",
                       slurm={"queue": "gpu", "account": "proj", "walltime": "02:00:00",
                              "job_directives": ["--qos=high"], "prologue": ["module load cuda"]})
    for gpu in (False, True):
        script = SLURMJob("tls://10.0.0.5:8786", name="w", **slurm.job_kwargs(spec, gpu, None)).job_script()
        for k, v in WORKER_MALLOC_ENV.items():
            assert f"export {k}={v}" in script
        resources = '{"GPU": 1}' if gpu else '{"CPU": 2}'
        assert f"export DASK_DISTRIBUTED__WORKER__RESOURCES='{resources}'" in script
        assert ("#SBATCH --gres=gpu:1" in script) == gpu
        assert ("export CUDA_VISIBLE_DEVICES=''" in script) == (not gpu)  # a CPU worker sees no device
        for line in ("#SBATCH -p gpu", "#SBATCH -A proj", "#SBATCH -t 02:00:00", "#SBATCH --qos=high",
                     "#SBATCH --cpus-per-task=2", "module load cuda", "--no-dashboard", f"{sys.executable} -m"):
            assert line in script, script
    # what the environment variable gives a worker: resources named as model tasks ask for them
    code = "import dask, distributed; print(dask.config.get('distributed.worker.resources'))"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DASK_DISTRIBUTED__WORKER__RESOURCES": '{"GPU": 1}'}).stdout
    assert got.strip() == "{'GPU': 1}"


@pytest.mark.parametrize("gpu", [False, True])
def test_the_kubernetes_spec_matches_the_operator_crd(gpu):
    spec = ClusterSpec(kind="kubernetes", threads_per_worker=4, adapt={"minimum": 2, "maximum": 10},
                       gpu="yes" if gpu else "no",
                       kubernetes={"image": "ghcr.io/example/segpipe:1", "namespace": "seg", "cpu": "4",
                                   "memory": "16Gi", "env": {"AWS_REGION": "eu-west-1"}})
    doc = kube.cluster_spec(spec, gpu, kube.cluster_name("Land cover 2026/11"))
    jsonschema.validate(doc, _crd_schema("DaskCluster"), cls=jsonschema.Draft202012Validator)
    assert doc["metadata"]["name"] == "segpipe-land-cover-2026-11"
    worker = doc["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["AWS_REGION"] == "eu-west-1" and all(env[k] == v for k, v in WORKER_MALLOC_ENV.items())
    assert env["DASK_DISTRIBUTED__WORKER__RESOURCES"] == ('{"GPU": 1}' if gpu else '{"CPU": 4}')
    assert ("nvidia.com/gpu" in worker["resources"]["limits"]) == gpu
    assert "--no-dashboard" in worker["args"] and doc["spec"]["worker"]["replicas"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cluster_that_cannot_start_fails_in_one_line_and_writes_nothing(tmp_path):
    """An unreachable gateway and a host without Kubernetes configuration: ``run`` and ``validate`` both refuse
    before the first write; a gateway password is read from the environment, and a missing one is named."""
    out = tmp_path / "out"
    nowhere = f"http://127.0.0.1:{_free_port()}"
    proc = cli(tmp_path, {**OTSU, "output": str(out), "cluster": {"kind": "gateway", "gateway": {"address": nowhere}}})
    assert_one_line_error(proc, "cannot reach the Dask Gateway at", nowhere)
    assert not out.exists()
    proc = cli(tmp_path, {**OTSU, "output": str(out), "cluster": {
        "kind": "gateway", "gateway": {"address": nowhere, "auth": "basic", "password_env": "SEGPIPE_TEST_NO_SUCH"}}})
    assert_one_line_error(proc, "$SEGPIPE_TEST_NO_SUCH, which is not set")
    job = tmp_path / "kube.yaml"
    job.write_text(yaml.safe_dump({**OTSU, "output": str(out), "cluster": {
        "kind": "kubernetes", "kubernetes": {"image": "ghcr.io/example/segpipe:1"}}}))
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "PYTHONWARNINGS": "ignore"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    for command in ("validate", "run"):
        proc = subprocess.run([sys.executable, "-m", "segpipe.cli", command, str(job)], capture_output=True,
                              text=True, timeout=120, env=env)
        assert_one_line_error(proc, "no Kubernetes configuration")
    assert not out.exists()


def _listeners() -> set[tuple[str, int]]:
    """Every listening address of this process and its children."""
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _opened_since(before: set[tuple[str, int]]) -> set[str]:
    """The interfaces of listeners opened since ``before``: in a full run the test's process may hold other
    tests' servers (a session cluster, a loopback S3 server), which are not this run's."""
    return {ip for ip, port in _listeners() - before}


@pytest.mark.parametrize("processes", ["yes", "no"])
def test_a_local_run_listens_on_loopback_only(tmp_path, processes):
    """Checked from the socket table during the run (inside its segment stage), for the whole process tree:
    scheduler, dashboard, nannies and workers; the dashboard is there, on loopback."""
    job = job_from_dict({**OTSU, "output": str(tmp_path / "out"), "cluster": {"processes": processes}}, Path.cwd())
    c = check(job)
    seen: list[set[str]] = []
    links: list[str] = []

    before = _listeners()

    def runner(name, work):
        if name == "segment":
            seen.append(_opened_since(before))
            links.append(client.dashboard_link)
        return work(client)

    with connect(job.cluster, in_process=processes == "no") as client:
        run_job(c, client, runner=runner)
    assert seen and seen[0] and seen[0] <= {"127.0.0.1", "::1"}, seen
    assert client.scheduler_info is not None and links


@pytest.mark.parametrize("processes", [True, False])
def test_the_dashboard_can_be_left_out(processes):
    """Without a dashboard the scheduler's HTTP server (health checks; Dask starts it in any case) stays on
    loopback, on a port of its own rather than Dask's default 8787."""
    import urllib.request

    before = _listeners()
    with connect(ClusterSpec(dashboard=None, n_workers=1), in_process=not processes) as client:
        port = client.scheduler_info()["services"]["dashboard"]
        assert port != 8787
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
        opened = _opened_since(before)
        assert opened and opened <= {"127.0.0.1", "::1"}, opened
