"""Workers as SLURM jobs, made with dask-jobqueue's ``SLURMCluster`` (the library built for it).

Each worker is one SLURM job with one worker process of ``threads_per_worker`` cores and ``memory_limit`` of
memory; a GPU worker's job asks ``--gres=gpu:1``, which SLURM makes its only visible device. The environment
every worker gets (:mod:`segpipe.runtime.workers`) is exported in the job script's prologue. Before anything
is queued, the job script is shown to ``sbatch --test-only``: a partition, account, QOS or walltime SLURM
would refuse is one line then, not a worker that never comes.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.errors import InputError
from segpipe.runtime.workers import worker_environment

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster
    from distributed.security import Security

    from segpipe.config import ClusterSpec

JOB_NAME = "segpipe-worker"

#: Seconds the cluster's own teardown may take before its jobs are cancelled directly (a teardown that waits on a
#: slurmctld that does not answer must not keep a Ctrl-C'd run, or its queued jobs, alive).
CLOSE_TIMEOUT = 60


def job_kwargs(spec: ClusterSpec, gpu: bool, run_dir: Path | None) -> dict[str, Any]:
    """``SLURMCluster`` settings of the job's cluster section (also those of a stand-alone ``SLURMJob``)."""
    s = spec.slurm
    assert s is not None
    env = worker_environment(gpu, spec.threads_per_worker)
    prologue = [f"export {k}={shlex.quote(v)}" for k, v in env.items()] + list(s.prologue)
    directives = list(s.job_directives) + (["--gres=gpu:1"] if gpu else [])
    kwargs: dict[str, Any] = {
        "queue": s.queue, "account": s.account, "walltime": s.walltime, "cores": spec.threads_per_worker,
        "processes": 1, "memory": spec.memory_limit if spec.memory_limit != "auto" else "4GiB",
        "job_name": JOB_NAME, "job_extra_directives": directives, "job_script_prologue": prologue,
        "python": s.python or sys.executable, "interface": s.interface,
        # a worker's own dashboard would listen on every interface of its node, unencrypted
        "worker_extra_args": ["--no-dashboard"],
    }
    if run_dir is not None:
        kwargs["log_directory"] = str(run_dir / "logs")
    return kwargs


def _sbatch() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise InputError("cluster kind slurm needs SLURM's sbatch on PATH: run segpipe on a SLURM login node")
    return found


def _jobqueue() -> Any:
    """dask_jobqueue, imported without its side effect on this process: importing ``dask_jobqueue.runner`` sets
    SIGINT to ``sys.exit()``, which would turn Ctrl-C into a silent exit 0 instead of an interrupt that tears
    the cluster down and says so. The handler found before the import is put back."""
    handler = signal.getsignal(signal.SIGINT)
    import dask_jobqueue
    import dask_jobqueue.slurm

    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGINT, handler)
    return dask_jobqueue


def check(spec: ClusterSpec, gpu: bool) -> None:
    """Ask SLURM whether it would take a worker's job script (``sbatch --test-only``); queues nothing."""
    SLURMJob = _jobqueue().slurm.SLURMJob  # noqa: N806 - the library's class

    sbatch = _sbatch()
    kwargs = job_kwargs(spec, gpu, None)
    script = SLURMJob("tcp://127.0.0.1:8786", name="check", **kwargs).job_script()
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(script)
        f.flush()
        proc = subprocess.run([sbatch, "--test-only", f.name], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        said = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        why = said[-1] if said else f"sbatch exit {proc.returncode}"
        raise InputError(f"SLURM refuses segpipe's worker job: {why}")


def create(spec: ClusterSpec, gpu: bool, security: Security | None, run_dir: Path) -> SLURMCluster:
    """The cluster, its scheduler on this host and no job queued yet (the caller scales or adapts it)."""
    dashboard = {"dashboard_address": spec.dashboard} if spec.dashboard else {"dashboard": False}
    return _jobqueue().SLURMCluster(**job_kwargs(spec, gpu, run_dir), security=security,
                        shared_temp_directory=str(run_dir), scheduler_options=dashboard)


def job_ids(cluster: SLURMCluster) -> list[str]:
    """The SLURM job ids of the cluster's workers (running or queued)."""
    return [w.job_id for w in cluster.workers.values() if getattr(w, "job_id", None)]


def describe_waiting(cluster: SLURMCluster) -> str:
    """Why no worker came: the state and reason squeue gives each of the cluster's jobs."""
    ids = job_ids(cluster)
    if not ids or shutil.which("squeue") is None:
        return "no job was queued"
    proc = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %R"], capture_output=True, text=True,
                          timeout=30)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return "jobs " + "; ".join(lines) if lines else f"jobs {', '.join(ids)} are no longer queued"


def close(cluster: SLURMCluster, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close the cluster (dask-jobqueue ``scancel``s each worker job and stops the scheduler) within ``timeout``
    seconds, then ``scancel`` every job it had, whether or not that went through: cancelling a finished job is a
    no-op, and a job left queued would start a worker for a run that is gone."""
    ids = job_ids(cluster)
    try:
        cluster.close(timeout=timeout)
    finally:
        if ids and shutil.which("scancel") is not None:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)


def drop_certificates(cluster: SLURMCluster) -> None:
    """Delete the workers' copy of the run's temporary certificate and key: dask-jobqueue keeps them as
    temporary files held by the cluster (``_job_<role>`` attributes) until it is garbage collected."""
    for name, value in list(vars(cluster).items()):
        if name.startswith("_job_") and hasattr(value, "close"):
            value.close()
