"""Run segpipe on a SLURM cluster: Dask workers as SLURM jobs (dask-jobqueue), the job on this node.

    python infra/slurm/slurm_cluster.py job.yaml --queue compute --workers 8 [--gpu]

or submit `infra/slurm/segpipe-run.sbatch`, which runs this script on a compute node. Input and output
must be on a filesystem every node mounts (or s3:// stores).
"""

from __future__ import annotations

import argparse
import sys

from dask_jobqueue import SLURMCluster
from distributed import Client

# Dask's default (65536) halves torch's CPU speed; see segpipe/runtime/cluster.py.
WORKER_ENV = ["export MALLOC_TRIM_THRESHOLD_=-1", "export OMP_NUM_THREADS=1"]


def cpu_cluster(queue: str, cores: int = 4, memory: str = "16GiB", walltime: str = "04:00:00",
                account: str | None = None) -> SLURMCluster:
    """One Dask worker process per SLURM job, one thread per core (torch uses the worker's share)."""
    return SLURMCluster(queue=queue, account=account, cores=cores, processes=1, memory=memory,
                        walltime=walltime, job_name="segpipe-cpu", job_script_prologue=WORKER_ENV,
                        worker_extra_args=["--nthreads", str(cores), "--resources", f"CPU={cores}"],
                        log_directory="slurm-logs")


def gpu_cluster(queue: str, memory: str = "64GiB", walltime: str = "04:00:00",
                account: str | None = None) -> SLURMCluster:
    """GPU jobs: one GPU each (``--gres=gpu:1``, which SLURM makes the job's only visible device, cuda:0) and a
    matching ``GPU`` resource, which segpipe's model tasks request; scale with more jobs, not more GPUs per
    job, so that no two workers drive the same device."""
    return SLURMCluster(queue=queue, account=account, cores=4, processes=1, memory=memory,
                        walltime=walltime, job_name="segpipe-gpu",
                        job_extra_directives=["--gres=gpu:1"], job_script_prologue=WORKER_ENV,
                        worker_extra_args=["--nthreads", "1", "--resources", "GPU=1"], log_directory="slurm-logs")


def main(argv: list[str] | None = None) -> int:
    from segpipe.config import load_job
    from segpipe.pipeline import check, run_job

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job")
    p.add_argument("--queue", required=True)
    p.add_argument("--workers", type=int, default=4, help="SLURM jobs, one Dask worker process each")
    p.add_argument("--gpu", action="store_true", help="GPU jobs (--gres=gpu:1) instead of CPU jobs")
    p.add_argument("--account")
    a = p.parse_args(argv)
    checked = check(load_job(a.job))  # bad input fails here, before any SLURM job is queued
    cluster = (gpu_cluster if a.gpu else cpu_cluster)(a.queue, account=a.account)
    with cluster, Client(cluster) as client:
        cluster.scale(jobs=a.workers)
        client.wait_for_workers(1)
        run_job(checked, client, log=lambda line: print(f"segpipe: {line}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
