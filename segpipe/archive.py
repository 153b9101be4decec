"""Many scenes in one run: item discovery, per-item output folders and item completion marks.

Each item gets its own output folder named after its file, so items never share stores, and a
finished item leaves a small JSON mark (its input fingerprint and global scores): a rerun of the
archive skips it without opening anything else, and a changed input file is processed again.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.errors import InputError
from segpipe.io.store import write_atomic

DONE_MARK = "_segpipe_done/item.json"
STARTED_MARK = "_segpipe_done/item-input.json"
SUPERSEDED = ".superseded"


@dataclass(frozen=True)
class Item:
    """One scene of an archive run."""

    source: str
    output: str

    @property
    def name(self) -> str:
        return Path(self.output).name

    @property
    def mark(self) -> Path:
        return Path(self.output) / DONE_MARK

    @property
    def started(self) -> Path:
        return Path(self.output) / STARTED_MARK


def _fingerprint(source: str) -> dict[str, Any]:
    st = os.stat(source)
    return {"source": str(Path(source).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def discover(pattern: str, output_root: str | Path) -> list[Item]:
    """Items matching ``pattern`` (a glob, or a folder meaning every .tif/.tiff in it), sorted."""
    p = Path(pattern)
    if p.is_dir():
        paths = sorted(str(q) for q in p.iterdir() if q.suffix.lower() in (".tif", ".tiff"))
    else:
        paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise InputError(f"no input files match {pattern}")
    names: dict[str, str] = {}
    items = []
    for src in paths:
        name = Path(src).stem
        if name in names:
            raise InputError(f"two inputs would share the output folder {name!r}: {names[name]} and {src}")
        names[name] = src
        items.append(Item(str(Path(src).resolve()), str(Path(output_root).resolve() / name)))
    return items


def is_done(item: Item) -> bool:
    """Finished before, from the very same input file."""
    try:
        mark = json.loads(item.mark.read_text())
    except (OSError, ValueError):
        return False
    return mark.get("input") == _fingerprint(item.source)


def begin(item: Item) -> Path | None:
    """Make the item's folder ready for this input; returns where stale results were moved, if any.

    Results made from an earlier version of the input are never overwritten or deleted: the whole
    folder moves to ``<root>/.superseded/<name>-<time>``. A partial run of the same input stays in
    place and resumes.
    """
    moved = None
    out = Path(item.output)
    if out.exists():
        try:
            previous = json.loads(item.started.read_text()).get("input")
        except (OSError, ValueError):
            previous = None
        if previous != _fingerprint(item.source):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            moved = out.parent / SUPERSEDED / f"{item.name}-{stamp}-{os.getpid()}"
            moved.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, moved)
    write_atomic(item.started, json.dumps({"input": _fingerprint(item.source)}))
    return moved


def mark_done(item: Item, summary: dict[str, Any] | None) -> None:
    """Record the item as finished (atomically), with its global scores if any."""
    write_atomic(item.mark, json.dumps({"input": _fingerprint(item.source), "summary": summary}))


def read_summary(item: Item) -> dict[str, Any] | None:
    try:
        return json.loads(item.mark.read_text()).get("summary")
    except (OSError, ValueError):
        return None
