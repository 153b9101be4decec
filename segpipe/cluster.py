"""Dask cluster access: a LocalCluster made for the job, or an existing scheduler.

GPU workers advertise ``resources={'GPU': 1}``; model tasks then request one GPU each so that a
worker never holds two models on one device.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

from segpipe.config import ClusterSpec
from segpipe.errors import InputError

# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold at
# 128 KiB: every activation tensor is then mmap'ed and unmapped again, and the U-Net forward pass
# runs at half speed (measured: 0.41 vs 0.88 Mpx/s on one core). Larger thresholds keep
# those buffers in the heap; workers still hand memory back above 128 MiB of free heap.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(128 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}


# In-process (threads) jobs: glibc's dynamic trim threshold climbs to tens of MiB after large frees, so each
# thread's arena kept freed tile buffers and peak RSS grew with the scene (otsu, 16.8 Mpx: 310 vs 205 MiB
# at 1 Mpx; with a fixed 1 MiB threshold 260 MiB, at the same speed). Only classical jobs run in threads.
IN_PROCESS_TRIM_BYTES = 2**20


def _trim_freed_heap(threshold: int = IN_PROCESS_TRIM_BYTES) -> None:
    """Have glibc give freed heap above ``threshold`` back to the system (a no-op without glibc's mallopt)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD


def cuda_devices() -> int:
    """CUDA devices on this host; torch is asked only where an NVIDIA driver is installed.

    Importing torch costs seconds and hundreds of MiB, which a classical job on a CPU host never needs.
    """
    if not os.path.exists("/dev/nvidiactl") and ctypes.util.find_library("cuda") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def use_gpu(spec: ClusterSpec) -> bool:
    """Whether model tasks should request GPU resources."""
    if spec.gpu == "yes":
        return True
    return spec.gpu == "auto" and spec.scheduler is None and cuda_devices() > 0


@contextmanager
def connect(spec: ClusterSpec, in_process: bool = False) -> Iterator[Client]:
    """Yield a client for the job; a LocalCluster made here is closed on exit.

    ``in_process``: one worker whose threads (n_workers x threads_per_worker of them) run in this process;
    no worker process is spawned or stopped, which on a small job is most of its wall time.
    """
    if spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout="15s")
        except OSError as exc:
            raise InputError(f"cannot reach Dask scheduler {spec.scheduler}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return
    if in_process:
        threads = spec.n_workers * spec.threads_per_worker
        _trim_freed_heap()
        with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, memory_limit=0,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            yield client
        return
    gpu = use_gpu(spec)
    n_workers = max(1, cuda_devices()) if gpu else spec.n_workers
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=spec.threads_per_worker, processes=True,
                               memory_limit=spec.memory_limit, dashboard_address=":0",
                               resources={"GPU": 1} if gpu else None)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
