"""Dask cluster access: a LocalCluster made for the job, or an existing scheduler.

On a GPU host the cluster is mixed (:func:`worker_layout`): one worker per GPU, each seeing its own
device as ``cuda:0`` and advertising ``resources={'GPU': 1}``, which model tasks request, so a GPU never
holds two models; and CPU workers advertising ``resources={'CPU': threads}``, which every other stage's
tasks request (:mod:`segpipe.runtime.placement`), so reading, stitching and export never take a GPU worker's
CPU from the loop that feeds its device.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

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


def gpu_devices(spec: ClusterSpec) -> list[str]:
    """The devices that get a GPU worker each: the job's ``gpus``, else those CUDA_VISIBLE_DEVICES lets this
    process see, else every device; one (which then computes on the CPU) where ``gpu: yes`` finds none."""
    if spec.gpus:
        return [str(d) for d in spec.gpus]
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible or [str(i) for i in range(cuda_devices())] or ["0"]


def check_devices(spec: ClusterSpec) -> None:
    """Refuse ``gpus`` naming a device this host does not have (by index or ``GPU-`` UUID), in one line.

    Only where CUDA sees devices and the job makes its own cluster: a worker pinned to a missing device
    would otherwise fail to start with NVML's "Invalid Argument" deep inside the nanny. A host without
    CUDA keeps any names (``gpu: yes`` builds the GPU layout there and computes on the CPU).
    """
    count = cuda_devices() if spec.gpus and spec.scheduler is None and spec.gpu != "no" else 0
    if not count:
        return
    import torch

    known = {str(i) for i in range(count)} | {f"GPU-{torch.cuda.get_device_properties(i).uuid}"
                                              for i in range(count)}
    missing = [str(d) for d in spec.gpus if str(d) not in known and not str(d).startswith("MIG-")]
    if missing:
        raise InputError(f"cluster.gpus names {', '.join(missing)}, which this host does not have "
                         f"({count} CUDA device(s): {', '.join(sorted(known))})")


def cuda_visible_devices(i: int, devices: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES of the ``i``-th GPU worker: its own device first, then the others.

    The same rotation as dask-cuda's LocalCUDACluster: ``cuda:0`` in each worker is a different GPU, and
    libraries that look past device 0 (NCCL, UCX) still see the whole node.
    """
    return ",".join(devices[i:] + devices[:i])


def worker_layout(spec: ClusterSpec, gpu: bool) -> dict[str, dict]:
    """SpecCluster worker specs: one per GPU (``resources={'GPU': 1}``, its own CUDA_VISIBLE_DEVICES, one task
    at a time) and ``n_workers`` CPU workers (``resources={'CPU': threads}``) for ingest, classical methods,
    stitching and export. Without ``gpu``, just the CPU workers, with no resources, as a LocalCluster makes.
    """
    common = {"memory_limit": spec.memory_limit, "host": "127.0.0.1", "dashboard_address": None}
    layout: dict[str, dict] = {}
    devices = gpu_devices(spec) if gpu else []
    for i, dev in enumerate(devices):
        env = {"CUDA_VISIBLE_DEVICES": cuda_visible_devices(i, devices)}  # read by CUDA at its first use
        layout[f"gpu-{dev}"] = {"cls": Nanny, "options": {**common, "nthreads": 1, "resources": {"GPU": 1},
                                                          "env": env}}
    for j in range(spec.n_workers):
        # CPU workers of a GPU layout see no device: nothing of theirs makes a CUDA context on a GPU (each
        # costs about 500 MiB of device memory) or mistakes itself for a GPU worker
        cpu = {"resources": {"CPU": spec.threads_per_worker}, "env": {"CUDA_VISIBLE_DEVICES": ""}} if gpu else {}
        layout[f"cpu-{j}"] = {"cls": Nanny, "options": {**common, "nthreads": spec.threads_per_worker, **cpu}}
    return layout


@contextmanager
def _worker_spawn_env(env: dict[str, str]) -> Iterator[None]:
    """Worker processes spawned in this block start with ``env`` (malloc settings act only at process start).

    Dask's ``pre-spawn-environ`` alone is not enough: a variable already in this process's environment wins
    over it, and every nanny started before (a previous job in the same process) left Dask's own
    MALLOC_TRIM_THRESHOLD_=65536 there. So the variables are set here too, and restored after.
    """
    saved = {k: os.environ.get(k) for k in env}
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **env}
    os.environ.update(env)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_scheduler(spec: ClusterSpec, timeout: str = "5s") -> None:
    """Raise the same one line as :func:`connect` when the job's scheduler does not answer within ``timeout``;
    connects and disconnects at once (``segpipe validate`` checks what ``run`` would meet, and starts no work).
    Also refuses ``gpus`` this host does not have (:func:`check_devices`)."""
    check_devices(spec)
    if spec.scheduler:
        with connect(spec, timeout=timeout):
            pass


@contextmanager
def connect(spec: ClusterSpec, in_process: bool = False, timeout: str = "15s") -> Iterator[Client]:
    """Yield a client for the job; a LocalCluster made here is closed on exit.

    ``in_process``: one worker whose threads (n_workers x threads_per_worker of them) run in this process;
    no worker process is spawned or stopped, which on a small job is most of its wall time.
    """
    if spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout=timeout)
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
        gpu = {"resources": {"GPU": 1}} if use_gpu(spec) else {}  # model tasks ask for it (cuda:0 here)
        with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, memory_limit=0,
                          dashboard_address=":0", **gpu) as cluster, Client(cluster) as client:
            yield client
        return
    gpu = use_gpu(spec)
    if gpu:
        check_devices(spec)
    with _worker_spawn_env(WORKER_MALLOC_ENV):
        if gpu:
            cluster = SpecCluster(workers=worker_layout(spec, gpu=True), name="segpipe-gpu",
                                  scheduler={"cls": Scheduler,
                                             "options": {"host": "127.0.0.1", "dashboard_address": ":0"}})
        else:
            cluster = LocalCluster(n_workers=spec.n_workers, threads_per_worker=spec.threads_per_worker,
                                   processes=True, memory_limit=spec.memory_limit, dashboard_address=":0")
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
