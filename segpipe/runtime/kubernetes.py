"""A DaskCluster resource for the dask-kubernetes operator (``KubeCluster``, the library built for it).

The spec starts from the operator's own ``make_cluster_spec`` and gets what every segpipe worker gets
(:mod:`segpipe.runtime.workers`): the environment, requests and limits of ``threads_per_worker`` cores'
worth of ``cpu`` and ``memory``, one ``nvidia.com/gpu`` per GPU worker, and no worker dashboard. No Kubernetes
cluster runs in segpipe's tests: the spec is checked against the operator's CRD schema there, and this kind is
untested against a live cluster (README).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.errors import InputError
from segpipe.runtime.workers import worker_environment

if TYPE_CHECKING:
    from segpipe.config import ClusterSpec


def cluster_name(label: str) -> str:
    """A DNS-1035 name (what Kubernetes accepts for the cluster and its services) made from ``label``."""
    name = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")[:40].strip("-")
    return f"segpipe-{name}" if name else "segpipe"


def cluster_spec(spec: ClusterSpec, gpu: bool, name: str) -> dict[str, Any]:
    """The DaskCluster resource for the job's cluster section."""
    from dask_kubernetes.operator import make_cluster_spec

    k = spec.kubernetes
    assert k is not None
    env = {**worker_environment(gpu, spec.threads_per_worker), **k.env}
    limits: dict[str, Any] = {"cpu": k.cpu, "memory": k.memory}
    if gpu:
        limits["nvidia.com/gpu"] = 1
    resources = {"requests": {"cpu": k.cpu, "memory": k.memory}, "limits": limits}
    n = spec.adapt.minimum if spec.adapt is not None else spec.n_workers
    doc = make_cluster_spec(name, image=k.image, n_workers=n, resources=resources, env=env)
    worker = doc["spec"]["worker"]["spec"]["containers"][0]
    worker["args"] = ["dask-worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", str(spec.threads_per_worker),
                      "--no-dashboard"]
    worker.pop("ports", None)
    scheduler = doc["spec"]["scheduler"]["spec"]["containers"][0]
    scheduler["env"] = [e for e in scheduler["env"] if not e["name"].startswith("DASK_DISTRIBUTED__WORKER")]
    scheduler["resources"] = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    return doc


def check(spec: ClusterSpec, gpu: bool) -> None:
    """The spec builds and this host has a Kubernetes configuration to reach a cluster with; starts nothing."""
    cluster_spec(spec, gpu, "segpipe-check")
    in_cluster = os.environ.get("KUBERNETES_SERVICE_HOST")
    config = [Path(p) for p in os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")).split(":") if p]
    if not in_cluster and not any(p.is_file() for p in config):
        raise InputError("cluster kind kubernetes: no Kubernetes configuration here (no $KUBECONFIG, ~/.kube/config "
                         "or in-cluster service account)")


def create(spec: ClusterSpec, gpu: bool, name: str) -> Any:
    """The KubeCluster, its scheduler pod up (the caller scales or adapts the workers)."""
    from dask_kubernetes.operator import KubeCluster

    k = spec.kubernetes
    assert k is not None
    return KubeCluster(custom_cluster_spec=cluster_spec(spec, gpu, name), namespace=k.namespace,
                       shutdown_on_close=True, quiet=True)
