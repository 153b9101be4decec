"""Zarr v3 store layout: arrays, georeferencing attributes and completion marks.

Why marks are files beside the arrays: workers finish tiles concurrently, and updating one shared
attribute document from many processes would race. One empty file per finished unit of work is
atomic on every filesystem, lets a rerun skip done work, and costs nothing to list. Where one task finishes
many small items at once (a classical method's run of tiles), they share one mark object listing them
(:meth:`Marks.mark_all`): at 10^5 tiles a mark per tile was a third of a run's objects and S3 requests.
Stores may live on a local filesystem or behind any fsspec URL (``s3://bucket/prefix``, with
credentials and endpoint from the usual AWS environment variables). Stores are never reopened
with mode ``'w'``: an existing store is either resumed (same
fingerprint) or refused with an :class:`InputError`, so nothing written is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr

from segpipe.errors import InputError
from segpipe.io.paths import is_remote

MARKS_DIR = "_segpipe_done"



def open_or_create(path: str | Path, fingerprint: dict[str, Any], what: str) -> zarr.Group:
    """Open the group at ``path`` for resuming, or create it; refuse one made from other input.

    The fingerprint records what the store was made from. A store whose fingerprint differs was
    made by another job: overwriting it would destroy results, so this is an input error naming what
    differs (the job's check refuses it earlier, before any work, unless ``--overwrite`` replaces it).
    """
    p = str(path)
    changed = store_changes(p, fingerprint, what)
    if changed:
        raise changed_store_error(what, p, changed)
    if changed is not None:
        return zarr.open_group(p, mode="r+")
    _forget_marks(p)  # a new store: marks left by one deleted by hand must not skip its work
    group = zarr.open_group(p, mode="w-")
    group.attrs["segpipe_fingerprint"] = _jsonable(fingerprint)
    return group


# What :func:`store_changes` says of a store it cannot compare: whatever left it, ``--overwrite`` replaces it.
UNREADABLE = "no readable Zarr metadata"
UNMARKED = "no segpipe fingerprint"


def store_changes(path: str, fingerprint: dict[str, Any], what: str) -> list[str] | None:  # noqa: ARG001
    """What differs between the store at ``path`` and ``fingerprint`` (empty: the same store); None where
    there is no store. A store that cannot be opened, or has no fingerprint (an interrupted creation or
    removal, a collision, or not segpipe's), differs by :data:`UNREADABLE` or :data:`UNMARKED`."""
    if not _exists(path):
        return None
    try:
        group = zarr.open_group(path, mode="r", use_consolidated=False)
        found = group.attrs.get("segpipe_fingerprint")
    except Exception:  # noqa: BLE001 - any failure to open means it is broken or not ours
        return [UNREADABLE]
    return [UNMARKED] if not found else differences(found, _jsonable(fingerprint))


def changed_store_error(what: str, path: str, changed: list[str]) -> InputError:
    """The refusal to reuse a store made from other input or settings, naming (up to four of) the changes."""
    if changed[0] in (UNREADABLE, UNMARKED):
        return InputError(f"{what} at {path} has {changed[0]} (left by an interrupted run, or not segpipe's); "
                          "rerun with --overwrite to replace it, or use another output folder")
    return InputError(f"{what} at {path} was made from different input or settings ({'; '.join(changed[:4])}); "
                      "rerun with --overwrite to replace it, or use another output folder")


def differences(found: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``key.path: old -> new`` for every setting that differs between two fingerprints."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(found) | set(wanted), key=str)
                for d in differences(found.get(k), wanted.get(k), f"{prefix}{k}.")]
    if found == wanted:
        return []
    def short(v: Any) -> str:
        text = json.dumps(v, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return [f"{prefix.rstrip('.')}: {short(found)} -> {short(wanted)}"]


def _exists(path: str) -> bool:
    """Whether anything is at ``path``: a local file or folder, or an object prefix on a remote store."""
    if not is_remote(path):
        return Path(path).exists()
    fs, root = fsspec.core.url_to_fs(path)
    fs.invalidate_cache(root)
    return fs.exists(root) or fs.exists(f"{root.rstrip('/')}/zarr.json")


def store_in(root: str | Path, name: str) -> str:
    """``name`` inside the folder or fsspec URL prefix ``root``."""
    r = str(root)
    return f"{r.rstrip('/')}/{name}" if is_remote(r) else str(Path(r) / name)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def ensure_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: Any, fill_value: Any, dims: tuple[str, ...],
                 attrs: dict[str, Any] | None = None, compressors: Any = "auto",
                 shards: tuple[int, ...] | None = None) -> zarr.Array:
    """Create ``name`` in ``group`` unless it already exists with the same geometry (resume).

    ``compressors`` as Zarr takes them; the default is Zarr's (zstd). ``shards``: Zarr v3 shards of whole
    ``chunks`` (one object holds a shard's chunks), for arrays whose every shard one task writes; an existing
    array keeps the layout it was made with, so a store made before or without shards resumes as it is.
    """
    if name in group:
        arr = group[name]
        if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
            raise InputError(f"array {name!r} in {group.store} has another shape or dtype; "
                             "use another output folder")
        return arr
    # Attributes at creation, and elsewhere update_attributes(dict): zarr 3.1's ``attrs.update`` rewrites zarr.json
    # once per key (about 40 rewrites per small archive item, 15 ms of its client's CPU).
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
                              dimension_names=dims, compressors=compressors, shards=shards, attributes=attrs or None)


def remove_store(path: str | Path) -> None:
    """Delete a store and its completion marks, local or remote (scratch no longer needed, or ``--overwrite``).

    The marks go first: killed in between, what is left is a store without marks (redone on resume, or refused
    and replaced), never marks that would skip the work of a store made anew.
    """
    p = str(path)
    _forget_marks(p)
    if is_remote(p):
        fs, root = fsspec.core.url_to_fs(p)
        fs.invalidate_cache(root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    local = Path(p)
    if local.is_dir() and not local.is_symlink():
        shutil.rmtree(local)
    elif local.exists() or local.is_symlink():  # a file where a store belongs: replaced all the same
        local.unlink()


def _forget_marks(path: str) -> None:
    """Delete the completion marks of the store at ``path`` (every stage), local or remote."""
    if is_remote(path):
        fs, root = fsspec.core.url_to_fs(path)
        parent, name = root.rstrip("/").rsplit("/", 1)
        marks = f"{parent}/{MARKS_DIR}/{name}"
        fs.invalidate_cache(marks)
        if fs.exists(marks):
            fs.rm(marks, recursive=True)
        return
    local = Path(path)
    shutil.rmtree(local.parent / MARKS_DIR / local.name, ignore_errors=True)
    with contextlib.suppress(OSError):  # the marks folder goes with the last store it served
        (local.parent / MARKS_DIR).rmdir()


def remove_leftovers(dest: Path) -> None:
    """Remove the scratch a killed writer of ``dest`` left beside it (``.NAME.PID.staging``, ``.NAME.PID.tmp``,
    ...), unless that process still runs: an export rerun after a kill leaves the folder clean."""
    import psutil

    for p in Path(dest).parent.glob(f".{Path(dest).name}.*"):
        pid = p.name[len(Path(dest).name) + 2:].split(".", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not psutil.pid_exists(int(pid))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def consolidate(path: str) -> None:
    """Consolidate a finished store's metadata so plain ``xr.open_zarr`` reads it in one request, silently.

    Zarr 3 warns that consolidated metadata is not yet part of its v3 spec; xarray and zarr-python read it,
    and other readers ignore it and list the store instead.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(path)


def drop_consolidated(path: str) -> None:
    """Remove a store's consolidated metadata before it is written again.

    Zarr resolves a group's members from consolidated metadata when it has some, so an array added by this
    run would be invisible to the workers opening the group; :func:`consolidate` writes it anew at the end.
    """
    try:
        group = zarr.open_group(path, mode="r+", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return
    group.attrs.put(dict(group.attrs))  # rewrites zarr.json from metadata read without the consolidated part


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path`` and rename it into place.

    Readers see the old file or the new one, never half of either, even if the writer is killed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


BATCHES = ".batches"  # suffix of the folder beside a stage's marks that holds its batch marks


class Marks:
    """Completion marks for one stage of one store: files beside a local store, objects beside an s3:// one.

    A key marked alone is an empty object named by the key. Keys marked together (:meth:`mark_all`) share one
    batch object, listing them, in a folder beside the stage's (``<stage>.batches``): a plain mark is still
    found by its name alone (:meth:`done` costs one lookup where no batch exists), and a batch costs one
    object and one request instead of one per key. An object PUT is atomic on S3-compatible stores, as a
    rename is on a local filesystem, so a batch is there whole or not at all.
    """

    def __init__(self, store_path: str | Path, stage: str) -> None:
        s = str(store_path)
        self.fs = None
        self._batched_once: set[str] | None = None
        if is_remote(s):
            self.fs, root = fsspec.core.url_to_fs(s)
            parent, name = root.rstrip("/").rsplit("/", 1)
            self.remote_dir = f"{parent}/{MARKS_DIR}/{name}/{stage}"
            self.remote_batches = self.remote_dir + BATCHES
            return
        p = Path(s)
        # Beside the store, not inside it: Zarr readers warn about foreign objects in a hierarchy.
        self.dir = p.parent / MARKS_DIR / p.name / stage
        self.batch_dir = self.dir.with_name(stage + BATCHES)

    def done(self, key: str) -> bool:
        """Whether ``key`` is marked: its own mark is looked up each time (other tasks mark their keys alone
        meanwhile: stitching asks for its neighbours'), the batches are read once per handle (a batch is
        left by a task that finished a whole run, never awaited key by key), so asking costs no listing."""
        if self.fs is not None:
            self.fs.invalidate_cache(self.remote_dir)
            found = self.fs.exists(f"{self.remote_dir}/{key}")
        else:
            found = (self.dir / key).exists()
        if found:
            return True
        if self._batched_once is None:
            self._batched_once = self._batched_keys()
        return key in self._batched_once

    def mark(self, key: str) -> None:
        self.mark_all([key])

    def mark_all(self, keys: list[str]) -> None:
        """Mark each of ``keys`` done: one key as an empty object, several as one batch object listing them.

        An empty mark is already atomic (it exists or it does not): no temporary file and rename, which cost
        more than a small tile's own work. A batch is written to a hidden name and renamed (locally) or PUT
        whole (remote); it is named by its first and last keys and a digest of its list, so writing the same
        batch again replaces it and two different batches never share a name.
        """
        keys = list(keys)
        self._batched_once = None  # this handle's own changes are seen by its next done()
        if len(keys) > 1:
            text = "\n".join(keys)
            name = f"{keys[0]}..{keys[-1]}.{hashlib.sha256(text.encode()).hexdigest()[:12]}"
            if self.fs is not None:
                self.fs.pipe(f"{self.remote_batches}/{name}", text.encode())
                return
            self.batch_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.batch_dir / name, text)
            return
        if self.fs is not None:
            for key in keys:
                self.fs.pipe(f"{self.remote_dir}/{key}", b"")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            os.close(os.open(self.dir / key, os.O_CREAT | os.O_WRONLY, 0o644))

    def keys(self) -> set[str]:
        """Every key marked done, alone or in a batch."""
        return self._plain_keys() | self._batched_keys()

    def _plain_keys(self) -> set[str]:
        if self.fs is not None:
            try:
                return {p.rsplit("/", 1)[1] for p in self.fs.ls(self.remote_dir, detail=False, refresh=True)}
            except FileNotFoundError:
                return set()
        if not self.dir.exists():
            return set()
        return {p.name for p in self.dir.iterdir() if not p.name.startswith(".")}

    def _batches(self) -> dict[str, list[str]]:
        """Each batch object's name and the keys it lists."""
        if self.fs is not None:
            self.fs.invalidate_cache(self.remote_batches)
            try:
                paths = self.fs.ls(self.remote_batches, detail=False, refresh=True)
            except FileNotFoundError:
                return {}
            texts = self.fs.cat(paths) if paths else {}
            return {p.rsplit("/", 1)[1]: texts[p].decode().split("\n") for p in texts}
        if not self.batch_dir.exists():
            return {}
        out = {}
        for p in self.batch_dir.iterdir():
            if not p.name.startswith("."):  # a batch being written
                with contextlib.suppress(FileNotFoundError):  # replaced meanwhile
                    out[p.name] = p.read_text().split("\n")
        return out

    def _batched_keys(self) -> set[str]:
        return {k for keys in self._batches().values() for k in keys}

    def unmark(self, keys: list[str]) -> None:
        """Forget that ``keys`` were done (a tile whose pixels were lost): their plain marks are removed and the
        batches listing them are written again without them (removed first: a kill in between forgets more
        keys, whose work is then redone, never fewer)."""
        gone = set(keys)
        self._batched_once = None
        for name, listed in self._batches().items():
            if gone.intersection(listed):
                if self.fs is not None:
                    self.fs.rm(f"{self.remote_batches}/{name}")
                else:
                    (self.batch_dir / name).unlink(missing_ok=True)
                rest = [k for k in listed if k not in gone]
                if rest:
                    self.mark_all(rest)
        for key in gone:
            if self.fs is not None:
                if self.fs.exists(f"{self.remote_dir}/{key}"):
                    self.fs.rm(f"{self.remote_dir}/{key}")
            else:
                (self.dir / key).unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget this stage's marks (used when a stage's inputs changed and it must be redone)."""
        self._batched_once = None
        if self.fs is not None:
            if self._plain_keys():
                self.fs.rm(self.remote_dir, recursive=True)
            if self._batches():
                self.fs.rm(self.remote_batches, recursive=True)
            return
        if self.dir.exists():
            for p in self.dir.iterdir():
                p.unlink()
        shutil.rmtree(self.batch_dir, ignore_errors=True)
