"""One run per output: an exclusive lease, taken before a run's first write and held to its end.

Why: two runs writing one output at once (a schedule firing again before the last run ended, a user rerunning
with ``--overwrite`` while a run is in progress) can delete each other's stores mid-write and leave an output
that no later run can open. A second run into a leased output is refused before it writes anything, naming the
holder (host, process, start time, job).

Two kinds of lease, both taken when a run's stores live on object storage:

* **The output folder**: ``<output>/.segpipe.lock`` locked with ``flock(2)``. The kernel drops the lock when the
  holder dies (SIGKILL included), so a lock that cannot be taken is held by a live run, and a lock file that can
  be taken but still names a holder was left by one that is gone: that run is taken over, said once, and the new
  run resumes from its completion marks. Supported where ``flock`` is honoured across every machine that may run
  into the folder: local filesystems (ext4, XFS, Btrfs, tmpfs), NFSv3/v4 (Linux maps ``flock`` to the NFS lock
  manager), Lustre mounted with ``-o flock``, GPFS/Spectrum Scale, CephFS. Not on Lustre mounted
  ``localflock``/``noflock`` (each node then locks alone) nor on FUSE object-store mounts (s3fs-fuse, gcsfuse).
* **Object storage** (``store: s3://...``): a lease object ``<store>/.segpipe.lease`` created with a
  conditional put (``If-None-Match: *``), renewed by a thread every quarter of the timeout with ``If-Match`` on
  its last ETag, and taken over once its last renewal is older than the timeout (``SEGPIPE_LEASE_TIMEOUT``
  seconds, default 120) with ``If-Match`` on the stale ETag, so of two runs taking over only one wins. Age is
  measured against the object's ``LastModified`` (the server's clock); a clock on this host more than the
  timeout off the server's could take over a live lease.

Why not a library: ``filelock`` and ``portalocker`` lock but record no holder and never report a stale one, and
none of them leases objects on S3; the two system calls and three conditional requests are written out here.

A process may take the lease of one output more than once (an archive item's task, then the run inside it):
the lease is counted and released by the outermost holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from segpipe.errors import InputError
from segpipe.io.paths import is_remote

LOCK_NAME = ".segpipe.lock"
LEASE_OBJECT = ".segpipe.lease"
TIMEOUT_ENV = "SEGPIPE_LEASE_TIMEOUT"
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lease: enough for a person to find the run."""

    host: str
    pid: int
    started: str  # UTC, ISO 8601
    job: str
    token: str = ""

    @classmethod
    def me(cls, job: str) -> Holder:
        return cls(socket.gethostname(), os.getpid(), datetime.now(UTC).isoformat(timespec="seconds"), job,
                   uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str | bytes) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d["started"]), str(d["job"]), str(d.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        return f"host {self.host}, process {self.pid}, started {self.started}, job {self.job}"


class OutputBusy(InputError):
    """Another run holds the output's lease; ``holder`` says which (None while it is still writing its name)."""

    def __init__(self, where: str, holder: Holder | None) -> None:
        self.where, self.holder = where, holder
        who = holder.describe() if holder is not None else "a run that is starting"
        super().__init__(f"{where} is in use by another run ({who}); wait for it to end, or use another "
                         "output folder")


def lease_timeout() -> float:
    """Seconds after its last renewal that an object-storage lease counts as abandoned."""
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds, not {os.environ[TIMEOUT_ENV]!r}") from None


class FolderLease:
    """``<output>/.segpipe.lock`` under ``flock`` (see the module docstring)."""

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self.path = self.output / LOCK_NAME
        self.fd: int | None = None
        self.made: list[Path] = []  # the folders acquire made, removed again on release while empty

    def peek(self) -> Holder | None:
        """The live holder, or None when the lease is free (a gone holder's file is free). Writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        self._lock_or_refuse(fd, fcntl.LOCK_SH)
        os.close(fd)  # closing drops the shared lock
        return None

    def _lock_or_refuse(self, fd: int, mode: int) -> None:
        """Lock ``fd`` without waiting; held by a live run: close it and raise :class:`OutputBusy` naming it."""
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputBusy(f"output {self.output}", holder) from None

    def acquire(self, me: Holder) -> Holder | None:
        """Take the lease or raise :class:`OutputBusy`; returns the gone holder it took over, if any."""
        self.made = [d for d in (self.output, *self.output.parents) if not d.exists()]  # innermost first
        self.output.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._lock_or_refuse(fd, fcntl.LOCK_EX)
            try:  # the file a releasing holder unlinked is locked in vain: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        gone = Holder.parse(os.pread(fd, 4096, 0))
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.dumps().encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return gone

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiting run then finds no file or a new one, never ours
        os.close(self.fd)
        self.fd = None
        with contextlib.suppress(OSError):  # a run refused or failed before writing leaves no new empty folder
            for d in self.made:
                d.rmdir()


class ObjectLease:
    """``<store>/.segpipe.lease`` on object storage, renewed while held (see the module docstring)."""

    def __init__(self, root: str) -> None:
        import fsspec

        self.root = root.rstrip("/")
        self.fs, path = fsspec.core.url_to_fs(self.root)
        self.bucket, _, prefix = path.strip("/").partition("/")
        self.key = f"{prefix}/{LEASE_OBJECT}" if prefix else LEASE_OBJECT
        self.timeout = lease_timeout()
        self.etag: str | None = None
        self.lost: Holder | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._body = b""

    def _call(self, op: str, **kw: object) -> dict:
        return self.fs.call_s3(op, Bucket=self.bucket, Key=self.key, **kw)

    def _read(self) -> tuple[Holder | None, str, float] | None:
        """The lease object's holder, ETag and age in seconds by the server's clock; None when there is none."""
        try:  # one GET gives body, ETag and time together: a head and a read could see two versions
            got = self._call("get_object")
            data = _read_body(self.fs, got["Body"])
        except FileNotFoundError:
            return None
        age = (datetime.now(UTC) - got["LastModified"]).total_seconds()
        return Holder.parse(data), got["ETag"], age

    def peek(self) -> None:
        found = self._read()
        if found is not None and found[2] <= self.timeout:
            raise OutputBusy(f"the stores at {self.root}", found[0])

    def acquire(self, me: Holder) -> Holder | None:
        self._body = me.dumps().encode()
        gone = None
        try:
            self.etag = self._call("put_object", Body=self._body, IfNoneMatch="*")["ETag"]
        except (FileExistsError, PermissionError, OSError) as exc:
            if not _precondition(exc):
                raise
            found = self._read()
            if found is None:
                return self.acquire(me)  # released in between
            holder, etag, age = found
            if age <= self.timeout:
                raise OutputBusy(f"the stores at {self.root}", holder) from None
            try:
                self.etag = self._call("put_object", Body=self._body, IfMatch=etag)["ETag"]
            except OSError as again:
                if _precondition(again):
                    raise OutputBusy(f"the stores at {self.root}", (self._read() or (None,))[0]) from None
                raise
            gone = holder
        self._renewer = threading.Thread(target=self._renew, name="segpipe-lease", daemon=True)
        self._renewer.start()
        return gone

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                self.etag = self._call("put_object", Body=self._body, IfMatch=self.etag)["ETag"]
            except OSError as exc:
                if _precondition(exc):  # taken over while this run lived (renewals failed for too long)
                    self.lost = (self._read() or (None,))[0]
                    return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.etag is not None and self.lost is None:
            with contextlib.suppress(OSError):
                self._call("delete_object", IfMatch=self.etag)
        self.etag = None


def _read_body(fs: object, body: object) -> bytes:
    """The bytes of an aiobotocore streaming body, read on s3fs's own event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body:  # type: ignore[attr-defined]
            return await body.read()  # type: ignore[attr-defined]

    return sync(fs.loop, read)  # type: ignore[attr-defined]


def _precondition(exc: BaseException) -> bool:
    """Whether an error from s3fs is S3's 412 PreconditionFailed (or the object exists, for If-None-Match)."""
    return isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "pre-conditions" in str(exc)


@dataclass
class _Held:
    leases: list[FolderLease | ObjectLease]
    count: int = 1


_HELD: dict[str, _Held] = {}
_LOCK = threading.Lock()


def _key(output: str | Path) -> str:
    return str(Path(output).resolve())


def check_free(output: str | Path, store_root: str | None = None) -> None:
    """Refuse (:class:`OutputBusy`) an output, or its object-storage stores, that another run holds; writes
    nothing. This process's own lease is free to it."""
    if _key(output) in _HELD:
        return
    FolderLease(Path(output)).peek()
    if store_root is not None and is_remote(store_root):
        ObjectLease(store_root).peek()


@contextlib.contextmanager
def output_lease(output: str | Path, store_root: str | None, job: str,
                 say: Callable[[str], None] = lambda _line: None) -> Iterator[None]:
    """Hold the lease of ``output`` (and of ``store_root`` when it is on object storage) for the block.

    Raises :class:`OutputBusy` before anything is written when another run holds it; says so when it takes over
    from a run that is gone. Re-entered in the same process, it is counted, not taken twice.
    """
    key = _key(output)
    with _LOCK:
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
    if held is None:
        held = _take(Path(output), store_root, job, say)
        with _LOCK:
            _HELD[key] = held
    try:
        yield
    finally:
        with _LOCK:
            held.count -= 1
            last = held.count == 0
            if last:
                del _HELD[key]
        if last:
            lost = next((lease.lost for lease in held.leases if isinstance(lease, ObjectLease) and lease.lost),
                        None)
            for lease in reversed(held.leases):
                lease.release()
            if lost is not None:
                raise InputError(f"the lease on {store_root} was taken over during this run by {lost.describe()}: "
                                 "its renewals failed for longer than the lease timeout; check the results")


def _take(output: Path, store_root: str | None, job: str, say: Callable[[str], None]) -> _Held:
    me = Holder.me(job)
    leases: list[FolderLease | ObjectLease] = [FolderLease(output)]
    if store_root is not None and is_remote(store_root):
        leases.append(ObjectLease(store_root))
    taken: list[FolderLease | ObjectLease] = []
    try:
        for lease in leases:
            gone = lease.acquire(me)
            taken.append(lease)
            if gone is not None:
                where = output if isinstance(lease, FolderLease) else lease.root
                say(f"taking over {where} from a run that is gone ({gone.describe()}); resuming from its "
                    "completion marks")
    except BaseException:
        for lease in reversed(taken):
            lease.release()
        raise
    return _Held(taken)


def wait_free(output: str | Path, store_root: str | None, poll: float = 5.0,
              say: Callable[[str], None] = lambda _line: None) -> None:
    """Block until no other run holds ``output`` (for ``busy: wait``), saying once whom it waits for."""
    told = False
    while True:
        try:
            check_free(output, store_root)
            return
        except OutputBusy as busy:
            if not told:
                say(f"waiting: {busy.where} is in use by another run "
                    f"({busy.holder.describe() if busy.holder else 'starting'})")
                told = True
            time.sleep(poll)
