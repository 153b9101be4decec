"""TLS between the client, the scheduler and the workers of a cluster that spans machines.

A scheduler on a SLURM cluster listens on an address every node can reach, so anyone on that network could
submit work to it or read its data: with TLS and ``require_encryption`` only holders of the run's certificate
get in. Unless the job names its own (``cluster.tls_files``), each run gets a temporary self-signed
certificate (distributed's ``Security.temporary()``, held in memory; dask-jobqueue writes the workers' copy to
a private folder of the run's and segpipe removes it at teardown). A Dask Gateway brings its own TLS.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from distributed.security import Security

if TYPE_CHECKING:
    from segpipe.config import ClusterSpec

# scheduler address -> the security its clients need: a flow's tasks open clients of their own by address
_BY_ADDRESS: dict[str, Security] = {}
_LOCK = threading.Lock()


def wants_tls(spec: ClusterSpec) -> bool:
    """Whether segpipe itself secures the cluster with TLS (SLURM unless ``tls: no``)."""
    return spec.kind == "slurm" and spec.tls != "no"


def run_security(spec: ClusterSpec) -> Security:
    """The job's own certificate files, or a temporary certificate for this run only."""
    if spec.tls_files:
        f = spec.tls_files
        return Security(tls_ca_file=f["ca"], tls_client_cert=f["cert"], tls_client_key=f["key"],
                        tls_scheduler_cert=f["cert"], tls_scheduler_key=f["key"], tls_worker_cert=f["cert"],
                        tls_worker_key=f["key"], require_encryption=True)
    return Security.temporary()


def remember(address: str, security: Security | None) -> None:
    """Clients opened by address during the run (:func:`security_for`) get the run's certificate."""
    with _LOCK:
        if security is None:
            _BY_ADDRESS.pop(address, None)
        else:
            _BY_ADDRESS[address] = security


def security_for(address: str) -> Security | None:
    with _LOCK:
        return _BY_ADDRESS.get(address)
