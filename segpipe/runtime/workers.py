"""What every worker gets, wherever it runs: the malloc settings, its resources, and one visible GPU.

A LocalCluster's workers get these from :func:`segpipe.runtime.cluster.worker_layout`; workers that segpipe
starts elsewhere (SLURM jobs, Dask Gateway or Kubernetes pods) get the same through their environment, the one
channel all three libraries pass on unchanged: Dask reads ``DASK_DISTRIBUTED__WORKER__RESOURCES='{"GPU": 1}'`` as
the worker's ``resources={'GPU': 1}``, which model tasks request, and ``{"CPU": n}`` as a CPU worker's, which every
other stage requests on a mixed cluster (:mod:`segpipe.runtime.placement`). (The one-variable-per-key form,
``..._RESOURCES__GPU=1``, would arrive lower-cased as ``gpu``.)
"""

from __future__ import annotations

import json

# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold at
# 128 KiB: every activation tensor is then mmap'ed and unmapped again, and the U-Net forward pass
# runs at half speed (measured: 0.41 vs 0.88 Mpx/s on one core). Larger thresholds keep
# those buffers in the heap; workers still hand memory back above 128 MiB of free heap.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(128 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}


def worker_resources(gpu: bool, threads: int) -> dict[str, int]:
    """A GPU worker drives one device (``GPU: 1``, one task at a time); a CPU worker offers its threads."""
    return {"GPU": 1} if gpu else {"CPU": threads}


def worker_environment(gpu: bool, threads: int) -> dict[str, str]:
    """The environment of a worker segpipe starts on another machine: the malloc settings, its resources as
    Dask config, and for a CPU worker no visible GPU (a GPU worker's scheduler, SLURM's ``--gres=gpu:1`` or a
    pod's ``nvidia.com/gpu: 1``, makes its one device the only visible one, as ``cuda:0``)."""
    env = {**WORKER_MALLOC_ENV, "DASK_DISTRIBUTED__WORKER__RESOURCES": json.dumps(worker_resources(gpu, threads))}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env
