"""Which workers a stage's tasks may run on.

A mixed cluster has GPU workers (``resources={'GPU': 1}``) and CPU workers (``resources={'CPU': threads}``,
see :func:`segpipe.runtime.cluster.worker_layout`, or ``dask worker --resources CPU=N`` on a remote cluster).
Dask would otherwise hand any task to any worker, so ingest, statistics, classical tiles, stitching,
metrics and export could land on a GPU worker and take the CPU its device loop needs. Inside
:func:`on_cpu_workers` every task submitted without resources of its own asks for one ``CPU``; model
tasks keep asking for their ``GPU``. A cluster without both kinds is left alone: there any worker runs
anything, and a task asking for a resource no worker has would wait forever.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import dask
from distributed import Client


def worker_infos(client: Client) -> list[dict[str, Any]]:
    return list(client.scheduler_info(n_workers=-1)["workers"].values())


def is_mixed(workers: Iterable[dict[str, Any]]) -> bool:
    """Whether some workers advertise GPU and others CPU resources."""
    kinds = {r for w in workers for r in (w.get("resources") or {}) if r in ("GPU", "CPU")}
    return kinds == {"GPU", "CPU"}


def has_gpu_workers(client: Client) -> bool:
    """Whether some worker advertises a ``GPU`` resource: only then may a task ask for one. A job whose
    ``gpu: auto`` found a device but that runs on a client without GPU workers (a plain LocalCluster passed to
    the API, say) would otherwise wait forever for a worker that never comes."""
    return any("GPU" in (w.get("resources") or {}) for w in worker_infos(client))


@contextmanager
def on_cpu_workers(client: Client) -> Iterator[None]:
    """Tasks submitted in this block go to CPU workers when the cluster is mixed."""
    if is_mixed(worker_infos(client)):
        with dask.annotate(resources={"CPU": 1}):
            yield
    else:
        yield


F = TypeVar("F", bound=Callable[..., Any])


def cpu_stage(fn: F) -> F:
    """A pipeline stage (a function taking ``client``) whose tasks go to CPU workers on a mixed cluster."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def stage(*args: Any, **kwargs: Any) -> Any:
        with on_cpu_workers(signature.bind(*args, **kwargs).arguments["client"]):
            return fn(*args, **kwargs)

    return stage  # type: ignore[return-value]
