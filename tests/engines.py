"""Real SLURM and Dask Gateway engines for the tests, started and stopped by process id.

Why: segpipe hands work to SLURM (dask-jobqueue calls ``sbatch``) and to Dask Gateway; a mocked ``sbatch`` or a
fake gateway REST API would only test what we believe those engines do. Both run fine on one machine (see
../shared/ENGINES.md for the measured recipe), so the tests start the real daemons, each in its own temporary
folder, and stop exactly what they started:

* every daemon is found by its own pid (a pid file, or the ``Popen`` we hold), never by name, so a test cannot
  kill an engine some other test (or a person) runs on the same machine;
* what the daemons spawn is found by what ties it to this one engine: descendants of its pids, a marker variable
  (``SEGPIPE_TEST_ENGINE=<random token>``) in the environment it inherits, SLURM job processes carrying this
  engine's ``SLURM_CONF``, and ``slurmstepd`` (which SLURM detaches and strips of its environment) holding this
  engine's slurmd log open;
* ports are picked free for each start, and munged is a private instance on its own socket (slurm.conf's
  ``AuthInfo=socket=...``), so parallel test processes (``pytest -n 2``) and leftovers of a crashed run never
  clash or stop one another's daemons;
* an engine left running by a test process that died (killed, crashed) is stopped when the next engine starts:
  the marker's token begins with the pid of the test process that owns the engine (:func:`reap_orphans`).

Both engines need no network beyond loopback. SLURM needs root (``slurmd`` runs jobs as their user) and Debian's
``slurm-wlm`` and ``munge``, which ``make test`` installs; CI runs as root, so there the tests fail rather than
skip when an engine is unavailable (see :func:`require`).
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

#: The environment variable that marks the processes of one engine: ``<pid of the test process>-<random>``.
MARKER = "SEGPIPE_TEST_ENGINE"

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "munged")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


# ---------------------------------------------------------------------------------------------------------------
# Processes and ports


def free_port() -> int:
    """A TCP port free right now on every interface (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (daemons are reparented to pid 1, which need not reap them)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, ValueError):
        return None


def _with_descendants(procs: Iterable[psutil.Process]) -> set[psutil.Process]:
    out: set[psutil.Process] = set()
    for p in procs:
        out.add(p)
        with contextlib.suppress(psutil.Error):
            out.update(p.children(recursive=True))
    return out


def _marked(token: str, conf: Path | None = None, log_dir: Path | None = None) -> set[psutil.Process]:
    """Processes that belong to the engine with this ``token``: marked in their environment, or (SLURM) a job
    process with this engine's ``SLURM_CONF``, or a process holding a file under ``log_dir`` open (slurmstepd)."""
    me = os.getpid()
    out: set[psutil.Process] = set()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            env = p.environ()
            if env.get(MARKER) == token or (conf is not None and env.get("SLURM_CONF") == str(conf)
                                           and "SLURM_JOB_ID" in env):
                out.add(p)
            elif log_dir is not None and any(f.path.startswith(f"{log_dir}{os.sep}") for f in p.open_files()):
                out.add(p)
        except (psutil.Error, OSError):
            continue
    return out


def _new_token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(12)}"


def _owner_gone(token: str) -> bool:
    """Whether the test process that started the engine with ``token`` is gone (so the engine is an orphan)."""
    try:
        owner = _process(int(token.split("-", 1)[0]))
    except ValueError:
        return False
    return owner is None or not _alive(owner)


def reap_orphans() -> list[int]:
    """Stop the processes of engines whose test process died without stopping them (killed, crashed): those
    marked with a token whose owner pid is gone. Returns their pids. Called before each engine starts."""
    orphans = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            token = p.environ().get(MARKER)
            if token and _owner_gone(token):
                orphans.append(p)
    terminate(orphans)
    return [p.pid for p in orphans]


def terminate(procs: Iterable[psutil.Process], timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to each process still alive, wait up to ``timeout`` s for all to exit, then SIGKILL the rest
    (and wait for those too). Works for processes that are not our children (daemons)."""
    me = os.getpid()
    procs = [p for p in procs if p.pid != me and _alive(p)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)
    for final in (False, True):
        deadline = time.monotonic() + (timeout if not final else 10.0)
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if _alive(p)]
            if procs:
                time.sleep(0.1)
        if final or not procs:
            break
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
    if procs:
        raise RuntimeError(f"processes still alive after SIGKILL: {[p.pid for p in procs]}")


def _read_pid(path: Path, deadline: float) -> psutil.Process:
    """The process named by a daemon's pid file, waiting (until ``deadline``, monotonic) for the file to appear."""
    while True:
        with contextlib.suppress(OSError, ValueError):
            proc = _process(int(path.read_text().split()[0]))
            if proc is not None:
                return proc
        if time.monotonic() > deadline:
            raise RuntimeError(f"no live pid in {path}")
        time.sleep(0.1)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def require(reason: str | None) -> None:
    """Skip the test when an engine is unavailable (``reason``) -- except in CI (``CI`` set), where ``make test``
    installs the engines and runs as root, so a missing engine is a failure, not a skip."""
    import pytest

    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"engine unavailable in CI: {reason}")
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------------------
# SLURM


def slurm_available() -> str | None:
    """Why a real single-node SLURM cannot start here, or None when it can."""
    if os.geteuid() != 0:
        return "SLURM engine needs root (slurmd runs jobs as their user, munged starts as the munge user)"
    missing = [b for b in (*SLURM_BINARIES, "mungekey") if shutil.which(b, path=_SBIN_PATH) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (Debian: apt-get install munge)"
    return None


def _bin(name: str) -> str:
    path = shutil.which(name, path=_SBIN_PATH)
    if path is None:
        raise RuntimeError(f"{name} not found")
    return path


@dataclass
class SlurmEngine:
    """A running single-node SLURM: node ``node`` in partition ``partition``, configured by ``conf``.

    ``SLURM_CONF`` points at ``conf`` in ``os.environ`` while the engine runs, so ``sbatch``/``squeue`` started by
    the test process or its children (dask-jobqueue) reach this engine."""

    conf: Path
    dir: Path
    node: str
    cpus: int
    memory_mb: int
    ctld_port: int
    slurmd_port: int
    munge_socket: Path
    token: str
    partition: str = "debug"
    munged: psutil.Process | None = field(default=None, repr=False)
    _daemons: list[psutil.Process] = field(default_factory=list, repr=False)  # slurmctld, slurmd

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM commands aimed at this engine."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _run(self, *cmd: str, timeout: float = 60) -> str:
        proc = subprocess.run([_bin(cmd[0]), *cmd[1:]], capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str) -> str:
        """Submit with ``sbatch --parsable <args>`` (e.g. ``"--wrap", "sleep 1"``); returns the job id."""
        return self._run("sbatch", "--parsable", *args).strip().split(";")[0]

    def squeue(self, all_states: bool = False) -> list[dict[str, str]]:
        """The jobs SLURM lists, as dicts with ``job_id``, ``name``, ``state`` (e.g. PENDING, RUNNING). By default
        what ``squeue`` shows (pending, running, completing); ``all_states`` adds finished jobs still in memory."""
        args = ["squeue", "-h", "-o", "%i|%j|%T"] + (["-t", "all"] if all_states else [])
        jobs = []
        for line in self._run(*args).splitlines():
            if line.strip():
                job_id, rest = line.split("|", 1)
                name, state = rest.rsplit("|", 1)
                jobs.append({"job_id": job_id, "name": name, "state": state})
        return jobs

    def scancel(self, job_id: str | int) -> None:
        self._run("scancel", str(job_id))

    def node_state(self) -> str:
        """The node's state as ``sinfo -h -o %t`` prints it (``idle``, ``alloc``, ``mix``, ``drain``, ...)."""
        return self._run("sinfo", "-h", "-p", self.partition, "-o", "%t").strip()

    def processes(self) -> set[psutil.Process]:
        """The live processes of this engine: munged, slurmctld, slurmd, their descendants, slurmstepd and job
        processes."""
        procs = _with_descendants(p for p in [*self._daemons, *filter(None, [self.munged])] if _alive(p))
        procs |= _with_descendants(_marked(self.token, self.conf, self.dir / "log"))
        return {p for p in procs if _alive(p)}

    def pids(self) -> set[int]:
        return {p.pid for p in self.processes()}

    def wait_idle(self, timeout: float = 90.0) -> None:
        """Until ``sinfo`` shows the node idle (polls; raises with the daemons' logs after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for p in self._daemons:
                if not _alive(p):
                    raise RuntimeError(f"{p.pid} exited while SLURM started\n{self._logs()}")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                state = self.node_state()
                if state == "idle":
                    return
            time.sleep(0.25)
        raise RuntimeError(f"SLURM node not idle after {timeout:.0f} s (state {state!r})\n{self._logs()}")

    def _logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted((self.dir / "log").glob("*")))


def _slurm_conf(e: SlurmEngine) -> str:
    d = e.dir
    return f"""\
# Written by tests/engines.py: a single-node SLURM whose state, spool, pid and log files live in {d}
ClusterName=segpipe
SlurmctldHost={e.node}(127.0.0.1)
SlurmctldPort={e.ctld_port}
SlurmdPort={e.slurmd_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={e.munge_socket}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The node's CPUs and memory are what this file says (a test may ask for more CPUs than the machine has)
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
SlurmdTimeout=60
MessageTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=60
NodeName={e.node} NodeAddr=127.0.0.1 NodeHostname={e.node} CPUs={e.cpus} RealMemory={e.memory_mb} State=UNKNOWN
PartitionName={e.partition} Nodes={e.node} Default=YES MaxTime=INFINITE State=UP
"""


def _memory_mb(margin_mb: int = 1024) -> int:
    """This machine's memory in MB (from /proc/meminfo) less ``margin_mb``: what the node may offer jobs."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(256, int(line.split()[1]) // 1024 - margin_mb)
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _ensure_munge_key() -> None:
    """Create the munge key if the package left none (munged refuses to start without one)."""
    if MUNGE_KEY.exists():
        return
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("mungekey", path=_SBIN_PATH):
        subprocess.run([_bin("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"], check=True, capture_output=True)
    else:
        subprocess.run([_bin("create-munge-key"), "-f"], check=True, capture_output=True)
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o600)


def _reap_stale_slurm() -> None:
    """Clean up after an earlier run that died without stopping its SLURM engine. Each engine's munged folder
    (``/run/munge/segpipe-<token>``, the token starting with the test process's pid) names the engine's folder;
    when that test process is gone, stop what is left that :func:`reap_orphans` cannot see by its marker --
    slurmstepd and job processes -- and the munged named in the pid file if it is still munged serving that very
    socket (a reused pid is left alone), then remove the folder."""
    for d in MUNGE_RUN.glob("segpipe-*-*"):
        token = d.name.removeprefix("segpipe-")
        if not _owner_gone(token):
            continue
        with contextlib.suppress(OSError):
            engine = Path((d / "engine").read_text())
            terminate(_with_descendants(_marked(token, engine / "slurm.conf", engine / "log")), timeout=5)
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            proc = _process(int((d / "munged.pid").read_text().split()[0]))
            if proc is not None and f"--socket={d / 'munge.socket'}" in proc.cmdline():
                terminate([proc])
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _munged(token: str, engine_dir: Path) -> Iterator[tuple[Path, psutil.Process]]:
    """A private munged (as the munge user, its own socket, pid, log and seed files under /run/munge), stopped by
    its pid afterwards. Yields its socket path and process. Its folder also names ``engine_dir``, for
    :func:`_reap_stale_slurm` should this process die before cleaning up."""
    _ensure_munge_key()
    if not MUNGE_RUN.exists():
        MUNGE_RUN.mkdir(parents=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
    _reap_stale_slurm()
    # munged checks that its socket's folder is its own and not writable by others
    d = MUNGE_RUN / f"segpipe-{token}"
    d.mkdir(mode=0o755)
    shutil.chown(d, "munge", "munge")
    d.chmod(0o755)
    (d / "engine").write_text(str(engine_dir))
    sock, pid_file = d / "munge.socket", d / "munged.pid"
    proc: psutil.Process | None = None
    try:
        subprocess.run([_bin("munged"), f"--socket={sock}", f"--pid-file={pid_file}", f"--log-file={d}/munged.log",
                        f"--seed-file={d}/munged.seed", f"--key-file={MUNGE_KEY}"],
                       user="munge", group=grp.getgrnam("munge").gr_gid, extra_groups=[], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
                       env={**os.environ, MARKER: token})
        proc = _read_pid(pid_file, time.monotonic() + 30)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged made no socket\n{_tail(d / 'munged.log')}")
            time.sleep(0.05)
        yield sock, proc
    finally:
        if proc is not None:
            terminate([proc])
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration, restoring the previous values (or absence) afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop_slurm(engine: SlurmEngine) -> None:
    """Cancel every job, stop slurmd then slurmctld by their pids, then whatever of the engine is left
    (slurmstepd, job processes) but munged, which its own context stops last."""
    ctld_up = bool(engine._daemons) and _alive(engine._daemons[0])
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        if not ctld_up:
            raise RuntimeError("no slurmctld to ask")
        jobs = engine.squeue()
        for job in jobs:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                engine.scancel(job["job_id"])
        deadline = time.monotonic() + 30  # KillWait=5: SIGTERM, 5 s, SIGKILL
        while jobs and time.monotonic() < deadline:
            time.sleep(0.25)
            jobs = engine.squeue()
    left = engine.processes()
    for p in reversed(engine._daemons):  # slurmd before slurmctld
        terminate([p])
    terminate({p for p in left | engine.processes() if p != engine.munged}, timeout=10)  # slurmstepd: SIGKILL


@contextlib.contextmanager
def slurm_engine(tmp: Path, cpus: int = 2) -> Iterator[SlurmEngine]:
    """Start munged, slurmctld and slurmd for a one-node cluster (partition ``debug``, ``cpus`` CPUs) configured
    in ``tmp``/slurm, wait until the node is idle and yield the engine; afterwards cancel its jobs and stop every
    process it started, by pid. ``SLURM_CONF`` names its slurm.conf in ``os.environ`` meanwhile."""
    reason = slurm_available()
    if reason is not None:
        raise RuntimeError(reason)
    d = Path(tmp) / "slurm"
    for sub in ("state", "spool", "run", "log"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    reap_orphans()
    token = _new_token()
    ctld_port = free_port()
    slurmd_port = free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    with contextlib.ExitStack() as stack:
        munge_socket, munged = stack.enter_context(_munged(token, d))
        engine = SlurmEngine(conf=d / "slurm.conf", dir=d, node=socket.gethostname().split(".")[0], cpus=cpus,
                             memory_mb=_memory_mb(), ctld_port=ctld_port, slurmd_port=slurmd_port,
                             munge_socket=munge_socket, token=token, munged=munged)
        engine.conf.write_text(_slurm_conf(engine))
        stack.enter_context(_env(SLURM_CONF=str(engine.conf)))
        stack.callback(_stop_slurm, engine)
        daemon_env = {**engine.env, MARKER: token}
        for daemon, pid_file in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            with open(d / "log" / f"{daemon}.stdout", "wb") as out:  # a file, not a pipe the daemon would hold
                proc = subprocess.run([_bin(daemon), "-f", str(engine.conf)], env=daemon_env, cwd=d,
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"{daemon} exited {proc.returncode}\n{engine._logs()}")
            engine._daemons.append(_read_pid(d / "run" / pid_file, time.monotonic() + 30))
        engine.wait_idle(90)
        yield engine


# ---------------------------------------------------------------------------------------------------------------
# Dask Gateway


def gateway_available() -> str | None:
    """Why a real dask-gateway-server cannot start here, or None when it can."""
    try:
        import dask_gateway  # noqa: F401
        import dask_gateway_server  # noqa: F401
    except ImportError as err:
        return f"{err.name} not installed (pip install dask-gateway dask-gateway-server)"
    if not (Path(sys.executable).parent / "dask").exists() and shutil.which("dask") is None:
        return "no dask command (distributed's CLI)"
    return None


@dataclass
class GatewayEngine:
    """A running dask-gateway-server (UnsafeLocalBackend: clusters are local processes) on loopback.

    Clients use the proxy: ``Gateway(address, proxy_address=proxy_address, auth=BasicAuth(username, password))``
    (any user name works; the password is checked). Cluster options: ``worker_cores`` (1-2), ``worker_memory``
    (GiB) and ``environment`` (variables for the scheduler and workers)."""

    address: str
    proxy_address: str
    api_address: str
    password: str
    dir: Path
    token: str
    username: str = "alice"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.dir / "gateway.log"

    def auth(self) -> Any:
        from dask_gateway import BasicAuth

        return BasicAuth(self.username, self.password)

    def gateway(self, auth: Any = None) -> Any:
        """A ``dask_gateway.Gateway`` client for this server, authenticated as ``username`` unless ``auth`` says
        otherwise; use it with ``with`` or close it."""
        from dask_gateway import Gateway

        _idempotent_gateway_close()
        return Gateway(self.address, proxy_address=self.proxy_address, auth=auth or self.auth())

    def processes(self) -> set[psutil.Process]:
        """The live processes of this engine: the server, its proxy, and the schedulers and workers it started."""
        procs: set[psutil.Process] = set()
        if self.process is not None and self.process.poll() is None:
            server = _process(self.process.pid)
            if server is not None:
                procs.add(server)
        procs = _with_descendants(procs | _marked(self.token))
        return {p for p in procs if _alive(p)}

    def pids(self) -> set[int]:
        return {p.pid for p in self.processes()}


def _idempotent_gateway_close() -> None:
    """Make ``dask_gateway.Gateway.close`` safe to call twice, in this process, for good.

    dask-gateway 2026.3's ``Gateway.close`` fails when called a second time (it asks the stopped loop runner for
    its loop, which distributed refuses), and ``Gateway.__del__`` calls it again after any explicit close, ``with``
    block or ``GatewayCluster.close``: an "Exception ignored in: Gateway.__del__ ... RuntimeError: Accessing the
    loop property while the loop is not running" at some later garbage collection, blamed on whichever test runs
    then. Only a second close changes: it does nothing."""
    from dask_gateway import Gateway

    close = Gateway.close
    if getattr(close, "_segpipe_once", False):
        return

    @functools.wraps(close)
    def close_once(self: Any) -> Any:
        if getattr(self, "_segpipe_closed", False):
            return None
        self._segpipe_closed = True
        return close(self)

    close_once._segpipe_once = True  # type: ignore[attr-defined]
    Gateway.close = close_once


_GATEWAY_CONFIG = """\
# Written by tests/engines.py: dask-gateway-server on loopback, clusters as local processes.
from dask_gateway_server.options import Float, Integer, Mapping, Options

c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.address = {api!r}
c.Proxy.address = {proxy!r}
c.Proxy.tcp_address = {proxy!r}
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.LocalBackend.clusters_directory = {clusters!r}
c.ClusterConfig.scheduler_cmd = [{dask!r}, "scheduler"]
c.ClusterConfig.worker_cmd = [{dask!r}, "worker"]
BASE_ENVIRONMENT = {base_env!r}
c.ClusterConfig.environment = BASE_ENVIRONMENT


def options_handler(options):
    # As daskhub does: the user's choices become ClusterConfig overrides; the environment is merged into
    # the configured one (whose marker the user cannot override: it is how the tests find these processes)
    env = {{str(k): str(v) for k, v in options.environment.items()}}
    return {{
        "worker_cores": options.worker_cores,
        "worker_threads": options.worker_cores,
        "worker_memory": int(options.worker_memory * 2**30),
        "environment": {{**env, **BASE_ENVIRONMENT}},
    }}


c.Backend.cluster_options = Options(
    Integer("worker_cores", default=1, min=1, max=2, label="Worker cores"),
    Float("worker_memory", default=1.0, min=0.25, max={max_gib}, label="Worker memory (GiB)"),
    Mapping("environment", default={{}}, label="Environment variables"),
    handler=options_handler,
)
"""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask-gateway-server exited {proc.returncode}\n{_tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s\n{_tail(log)}")


@contextlib.contextmanager
def gateway_engine(tmp: Path) -> Iterator[GatewayEngine]:
    """Start ``python -m dask_gateway_server`` configured in ``tmp``/gateway (free loopback ports, a generated
    password), wait until its API answers through the proxy, and yield the engine; afterwards stop the server by
    its pid and every scheduler, worker and proxy process it started."""
    reason = gateway_available()
    if reason is not None:
        raise RuntimeError(reason)
    _idempotent_gateway_close()
    d = Path(tmp) / "gateway"
    (d / "clusters").mkdir(parents=True, exist_ok=True)
    api_port, proxy_port = free_port(), free_port()
    while proxy_port == api_port:
        proxy_port = free_port()
    reap_orphans()
    token = _new_token()
    dask = Path(sys.executable).parent / "dask"
    engine = GatewayEngine(address=f"http://127.0.0.1:{proxy_port}", proxy_address=f"gateway://127.0.0.1:{proxy_port}",
                           api_address=f"http://127.0.0.1:{api_port}", password=secrets.token_urlsafe(16), dir=d,
                           token=token)
    config = d / "gateway_config.py"
    config.write_text(_GATEWAY_CONFIG.format(
        api=f"127.0.0.1:{api_port}", proxy=f"127.0.0.1:{proxy_port}", password=engine.password,
        clusters=str(d / "clusters"), dask=str(dask if dask.exists() else _bin("dask")), base_env={MARKER: token},
        max_gib=max(1, _memory_mb(0) // 1024)))
    log = open(engine.log, "wb")  # closed below, after the server is gone
    try:
        engine.process = subprocess.Popen([sys.executable, "-m", "dask_gateway_server", "-f", str(config)], cwd=d,
                                          env={**os.environ, MARKER: token}, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_http(f"{engine.address}/api/health", engine.process, engine.log)
            yield engine
        finally:
            _stop_gateway(engine)
    finally:
        log.close()


def _stop_gateway(engine: GatewayEngine) -> None:
    """SIGTERM the server (it stops its clusters and proxy), then whatever of the engine is left, all by pid."""
    assert engine.process is not None
    left = engine.processes()
    server = _process(engine.process.pid)
    if server is not None:
        terminate([server], timeout=30)
    engine.process.wait(timeout=30)  # reap it: it is our child
    terminate(left | engine.processes())
