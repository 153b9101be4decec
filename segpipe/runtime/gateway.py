"""A cluster asked of a Dask Gateway (dask-gateway's ``Gateway().new_cluster()``, the library built for it).

The gateway starts the scheduler and workers wherever its backend puts them (Kubernetes, YARN, HPC, local
processes) and secures them with TLS of its own; segpipe authenticates, sets the cluster options the job
gives, and hands the workers their environment (:mod:`segpipe.runtime.workers`) through the ``environment``
option when the gateway offers one (daskhub's and most deployments' configuration does). Secrets come from the
environment only (``password_env``, ``token_env``): a job file names the variable, never the value.
"""

from __future__ import annotations

import contextlib
import getpass
import os
from typing import TYPE_CHECKING, Any

from segpipe.errors import InputError
from segpipe.runtime.workers import worker_environment

if TYPE_CHECKING:
    from dask_gateway import Gateway, GatewayCluster

    from segpipe.config import ClusterSpec, GatewaySpec


def _auth(g: GatewaySpec) -> Any:
    from dask_gateway.auth import BasicAuth, JupyterHubAuth, KerberosAuth

    if g.auth == "basic":
        password = os.environ.get(g.password_env)
        if password is None:
            raise InputError(f"cluster.gateway.auth basic: the password is read from ${g.password_env}, which is "
                             "not set")
        return BasicAuth(g.username or getpass.getuser(), password)
    if g.auth == "jupyterhub":
        token = os.environ.get(g.token_env)
        if token is None:
            raise InputError(f"cluster.gateway.auth jupyterhub: the API token is read from ${g.token_env}, which "
                             "is not set")
        return JupyterHubAuth(api_token=token)
    if g.auth == "kerberos":
        return KerberosAuth()
    return None


def gateway(spec: ClusterSpec) -> Gateway:
    from dask_gateway import Gateway

    g = spec.gateway
    assert g is not None
    return Gateway(g.address, proxy_address=g.proxy_address, auth=_auth(g))


def options(spec: ClusterSpec, gw: Gateway, gpu: bool, say: Any = None) -> Any:
    """The gateway's cluster options with the job's set; unknown names refused, listing those offered.

    Also where the gateway reaches it: unreachable, or refusing the credentials, is one line here.
    """
    g = spec.gateway
    assert g is not None
    try:
        opts = gw.cluster_options(use_local_defaults=False)
    except Exception as exc:  # noqa: BLE001 - aiohttp, HTTP and auth errors alike: one line naming the gateway
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot reach the Dask Gateway at {g.address}: {why}") from None
    offered = set(opts)
    unknown = sorted(set(g.options) - offered)
    if unknown:
        raise InputError(f"cluster.gateway.options: the gateway at {g.address} offers no {', '.join(unknown)} "
                         f"(it offers: {', '.join(sorted(offered)) or 'none'})")
    for name, value in g.options.items():
        try:
            opts[name] = value
        except (ValueError, TypeError) as exc:
            raise InputError(f"cluster.gateway.options.{name}: {exc}") from None
    env = worker_environment(gpu, spec.threads_per_worker)
    if "environment" in offered:
        opts["environment"] = {**env, **dict(opts["environment"] or {})}
    elif say is not None:
        say(f"the gateway offers no 'environment' option: its workers start without segpipe's settings "
            f"({', '.join(env)})")
    return opts


def close(gw: Gateway) -> None:
    """Close the gateway client once, for good: dask-gateway 2026.3's ``Gateway.__del__`` closes it again, and a
    second close fails on the stopped loop ("Exception ignored in: Gateway.__del__ ... RuntimeError") at some later
    garbage collection. ``__del__`` closes only a client that still has its loop runner."""
    gw.close()
    with contextlib.suppress(AttributeError):
        del gw._loop_runner


def check(spec: ClusterSpec, gpu: bool) -> None:
    """Reach the gateway, authenticate and check the options; starts no cluster."""
    gw = gateway(spec)
    try:
        options(spec, gw, gpu)
    finally:
        close(gw)


def create(spec: ClusterSpec, gpu: bool, say: Any) -> tuple[Gateway, GatewayCluster]:
    """A new cluster of the gateway's, with no worker asked for yet (the caller scales or adapts it)."""
    gw = gateway(spec)
    try:
        opts = options(spec, gw, gpu, say)
        return gw, gw.new_cluster(opts, shutdown_on_close=True)
    except BaseException:
        close(gw)
        raise
