"""Dask cluster access: a LocalCluster made for the job, an existing scheduler, or a cluster created, scaled and
torn down for the job on SLURM, a Dask Gateway or Kubernetes (one module each: :mod:`segpipe.runtime.slurm`,
:mod:`~segpipe.runtime.gateway`, :mod:`~segpipe.runtime.kubernetes`, each built on the library made for it).

Every cluster a run makes is closed when the run ends, on failure and Ctrl-C too. Dashboards listen on loopback
unless the job says otherwise; a SLURM cluster speaks TLS (:mod:`segpipe.runtime.security`).

On a GPU host the cluster is mixed (:func:`worker_layout`): one worker per GPU, each seeing its own
device as ``cuda:0`` and advertising ``resources={'GPU': 1}``, which model tasks request, so a GPU never
holds two models; and CPU workers advertising ``resources={'CPU': threads}``, which every other stage's
tasks request (:mod:`segpipe.runtime.placement`), so reading, stitching and export never take a GPU worker's
CPU from the loop that feeds its device.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

from segpipe.config import ClusterSpec
from segpipe.errors import InputError
from segpipe.runtime.security import remember, run_security, security_for, wants_tls
from segpipe.runtime.workers import WORKER_MALLOC_ENV, worker_resources

# In-process (threads) jobs: glibc's dynamic trim threshold climbs to tens of MiB after large frees, so each
# thread's arena kept freed tile buffers and peak RSS grew with the scene (otsu, 16.8 Mpx: 310 vs 205 MiB
# at 1 Mpx; with a fixed 1 MiB threshold 260 MiB, at the same speed). Only classical jobs run in threads.
IN_PROCESS_TRIM_BYTES = 2**20


# A worker's own HTTP server (health, metrics) listens on every interface unless told otherwise, also in-process.
LOOPBACK = "127.0.0.1:0"


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
    return spec.gpu == "auto" and spec.kind == "local" and cuda_devices() > 0


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
    count = cuda_devices() if spec.gpus and spec.kind == "local" and spec.gpu != "no" else 0
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
        layout[f"gpu-{dev}"] = {"cls": Nanny, "options": {**common, "nthreads": 1,
                                                          "resources": worker_resources(True, 1), "env": env}}
    for j in range(spec.n_workers):
        # CPU workers of a GPU layout see no device: nothing of theirs makes a CUDA context on a GPU (each
        # costs about 500 MiB of device memory) or mistakes itself for a GPU worker
        cpu = ({"resources": worker_resources(False, spec.threads_per_worker), "env": {"CUDA_VISIBLE_DEVICES": ""}}
               if gpu else {})
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


def check_cluster(spec: ClusterSpec, timeout: str = "5s") -> None:
    """What ``run`` would meet, checked without starting work: the job's scheduler answers within ``timeout``
    (connected and disconnected at once); SLURM would take the worker jobs (``sbatch --test-only``), the gateway
    is reached with the job's credentials and options, Kubernetes has a configuration; ``gpus`` name devices
    this host has (:func:`check_devices`). Each refusal is the one line ``run`` would give."""
    check_devices(spec)
    if spec.kind == "scheduler":
        with connect(spec, timeout=timeout):
            pass
    elif spec.creates:
        _kind_module(spec.kind).check(spec, spec.gpu == "yes")


def _kind_module(kind: str) -> Any:
    """The module that makes clusters of ``kind`` (imported only when a job asks for it)."""
    if kind == "slurm":
        from segpipe.runtime import slurm as module
    elif kind == "gateway":
        from segpipe.runtime import gateway as module
    else:
        from segpipe.runtime import kubernetes as module
    return module


def client_at(address: str, timeout: str = "15s") -> Client:
    """A new client of the running cluster at ``address``, with the certificate the run's cluster requires
    (a flow's tasks open their own clients by address)."""
    return Client(address, timeout=timeout, security=security_for(address))


def describe(spec: ClusterSpec, in_process: bool = False) -> str:
    """What a run is about to start or reach, said before the seconds that takes."""
    if spec.kind == "scheduler":
        return f"connecting to the Dask scheduler at {spec.scheduler}"
    if spec.kind == "local":
        if in_process:
            return f"starting {spec.n_workers * spec.threads_per_worker} worker thread(s) in this process"
        return f"starting a local Dask cluster of {spec.n_workers} worker process(es)"
    size = (f"adapting between {spec.adapt.minimum} and {spec.adapt.maximum} workers" if spec.adapt is not None
            else f"{spec.n_workers} worker(s)")
    where = {"slurm": lambda: f"SLURM partition {spec.slurm.queue or '(default)'}",
             "gateway": lambda: f"the Dask Gateway at {spec.gateway.address}",
             "kubernetes": lambda: f"Kubernetes namespace {spec.kubernetes.namespace}"}[spec.kind]()
    tls = ", TLS" if wants_tls(spec) or spec.kind == "gateway" else ""
    return f"creating a {spec.kind} cluster on {where}: {size} of {spec.threads_per_worker} core(s){tls}"


@contextmanager
def connect(spec: ClusterSpec, in_process: bool = False, timeout: str = "15s",
            say: Callable[[str], None] = lambda _line: None) -> Iterator[Client]:
    """Yield a client for the job; a cluster made here is closed on exit (on failure and Ctrl-C too).

    ``in_process``: one worker whose threads (n_workers x threads_per_worker of them) run in this process;
    no worker process is spawned or stopped, which on a small job is most of its wall time.
    """
    if spec.kind == "scheduler":
        security = run_security(spec) if spec.tls_files else None
        try:
            client = Client(spec.scheduler, timeout=timeout, security=security)
        except OSError as exc:
            raise InputError(f"cannot reach Dask scheduler {spec.scheduler}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return
    if spec.creates:
        with _created(spec, say) as client:
            yield client
        return
    # The scheduler's HTTP server (health checks) runs in any case: without a dashboard it is kept on loopback
    dashboard = spec.dashboard or LOOPBACK
    pages = {"dashboard": spec.dashboard is not None}
    if in_process:
        threads = spec.n_workers * spec.threads_per_worker
        _trim_freed_heap()
        gpu = {"resources": {"GPU": 1}} if use_gpu(spec) else {}  # model tasks ask for it (cuda:0 here)
        with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, memory_limit=0,
                          dashboard_address=dashboard, worker_dashboard_address=LOOPBACK, scheduler_kwargs=pages,
                          **gpu) as cluster, Client(cluster) as client:
            yield client
        return
    gpu = use_gpu(spec)
    if gpu:
        check_devices(spec)
    with _worker_spawn_env(WORKER_MALLOC_ENV):
        if gpu:
            cluster = SpecCluster(workers=worker_layout(spec, gpu=True), name="segpipe-gpu",
                                  scheduler={"cls": Scheduler,
                                             "options": {"host": "127.0.0.1", "dashboard_address": dashboard,
                                                         **pages}})
        else:
            cluster = LocalCluster(n_workers=spec.n_workers, threads_per_worker=spec.threads_per_worker,
                                   processes=True, memory_limit=spec.memory_limit, host="127.0.0.1",
                                   dashboard_address=dashboard, scheduler_kwargs=pages)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _run_folder(spec: ClusterSpec) -> Path:
    """A private folder of this run's on a filesystem the nodes share: the workers' copy of the temporary TLS
    certificate and the SLURM jobs' logs (removed at teardown when the run succeeded)."""
    s = spec.slurm
    root = Path(s.shared_directory).expanduser() if s is not None and s.shared_directory else Path.home() / ".segpipe"
    folder = root / "runs" / f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}"
    folder.mkdir(parents=True, mode=0o700)
    folder.chmod(0o700)
    return folder


@contextmanager
def _created(spec: ClusterSpec, say: Callable[[str], None]) -> Iterator[Client]:
    """Create the job's SLURM, gateway or Kubernetes cluster, scale or adapt it, wait for its first worker,
    yield a client, and tear it all down however the block ends."""
    module = _kind_module(spec.kind)
    gpu = spec.gpu == "yes"
    module.check(spec, gpu)  # refused in one line before anything starts
    say(describe(spec))
    closing: list[Callable[[], Any]] = []
    run_folder: Path | None = None
    ok = False
    try:
        if spec.kind == "slurm":
            run_folder = _run_folder(spec)
            security = run_security(spec) if wants_tls(spec) else None
            cluster = module.create(spec, gpu, security, run_folder)
            closing += [lambda: module.drop_certificates(cluster), lambda: module.close(cluster)]
            client = Client(cluster, security=security)
        elif spec.kind == "gateway":
            gw, cluster = module.create(spec, gpu, say)
            closing += [lambda: module.close(gw), cluster.shutdown]
            client = cluster.get_client()  # the default client, as Client(cluster) makes one for the others
        else:
            cluster = module.create(spec, gpu, module.cluster_name(f"{socket.gethostname()}-{os.getpid()}"))
            closing.append(cluster.close)
            client = Client(cluster)
        closing.append(client.close)
        if spec.adapt is not None:
            cluster.adapt(minimum=spec.adapt.minimum, maximum=spec.adapt.maximum)
        else:
            cluster.scale(spec.n_workers)
        address = client.scheduler.address
        remember(address, client.security if spec.kind != "kubernetes" else None)
        closing.append(lambda: remember(address, None))
        first = 1 if spec.adapt is None or spec.adapt.minimum > 0 else 0
        if first:
            try:
                client.wait_for_workers(first, timeout=spec.start_timeout)
            except TimeoutError:
                why = module.describe_waiting(cluster) if hasattr(module, "describe_waiting") else ""
                raise InputError(f"no worker of the {spec.kind} cluster started within {spec.start_timeout:g} s"
                                 + (f" ({why})" if why else "")) from None
        say(f"{spec.kind} cluster up: scheduler {address}"
            + (f", dashboard {client.dashboard_link}" if spec.dashboard else ""))
        yield client
        ok = True
    finally:
        for close in reversed(closing):
            try:
                close()
            except Exception:  # noqa: BLE001, S110 - every later step of the teardown must still run
                pass
        if run_folder is not None and ok:  # on failure the worker logs stay for the person reading it
            shutil.rmtree(run_folder, ignore_errors=True)
