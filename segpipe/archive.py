"""Many scenes in one run: item discovery, per-item output folders and item completion marks.

Items are GeoTIFFs, whole-slide images, NIfTI volumes or DICOM series (one folder per series).
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

from segpipe.config import JobSpec, load_job
from segpipe.errors import InputError
from segpipe.io.fingerprint import source_fingerprint
from segpipe.io.lease import LOCK_NAME
from segpipe.io.store import write_atomic
from segpipe.io.volume import NIFTI_SUFFIXES, is_dicom_series, volume_stem

ITEM_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", *NIFTI_SUFFIXES)
NAME_FIELD = "{name}"

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
    return {"source": str(Path(source).resolve()), **source_fingerprint(source)}


def _is_item(p: Path) -> bool:
    return (p.is_file() and p.name.lower().endswith(ITEM_SUFFIXES)) or is_dicom_series(p)


def discover(pattern: str, output_root: str | Path) -> list[Item]:
    """Items matching ``pattern``, sorted.

    ``pattern`` is a glob, or a folder meaning every image, slide and NIfTI file in it and every
    subfolder holding a DICOM series.
    """
    p = Path(pattern)
    if p.is_dir() and not is_dicom_series(p):
        paths = sorted(str(q) for q in p.iterdir() if not q.name.startswith(".") and _is_item(q))
    else:
        paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise InputError(f"no input files match {pattern}")
    names: dict[str, str] = {}
    items = []
    for src in paths:
        name = volume_stem(src)
        if name in names:
            raise InputError(f"two inputs would share the output folder {name!r}: {names[name]} and {src}")
        names[name] = src
        items.append(Item(str(Path(src).resolve()), str(Path(output_root).resolve() / name)))
    return items


def item_job(template: str | Path, item: Item) -> JobSpec:
    """The job template applied to one item; ``{name}`` in the truth path becomes the item's name.

    So per-item labels (``labels/{name}.nii.gz``, as in nnU-Net's ``labelsTr``) are found for
    every item of an archive.
    """
    job = load_job(template, {"input": item.source, "output": item.output})
    if job.store is not None:  # a shared store prefix (s3://...) gets one sub-prefix per item
        job.store = f"{job.store.rstrip('/')}/{item.name}"
    if job.truth is not None and NAME_FIELD in str(job.truth.path):
        job.truth.path = Path(str(job.truth.path).replace(NAME_FIELD, item.name))
    return job


def is_done(item: Item) -> bool:
    """Finished before, from the very same input file."""
    try:
        mark = json.loads(item.mark.read_text())
    except (OSError, ValueError):
        return False
    return mark.get("input") == _fingerprint(item.source)


def begin(item: Item) -> Path | None:
    """Make the item's folder ready for this input; returns where stale results were moved, if any.

    Results made from an earlier version of the input are never overwritten or deleted: the folder's
    contents move to ``<root>/.superseded/<name>-<time>``. A partial run of the same input stays in
    place and resumes. Called under the item's lease (:mod:`segpipe.io.lease`), whose lock file stays.
    """
    moved = None
    out = Path(item.output)
    if out.exists():
        try:
            previous = json.loads(item.started.read_text()).get("input")
        except (OSError, ValueError):
            previous = None
        stale = [p for p in out.iterdir() if p.name != LOCK_NAME]
        if previous != _fingerprint(item.source) and stale:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            moved = out.parent / SUPERSEDED / f"{item.name}-{stamp}-{os.getpid()}"
            moved.mkdir(parents=True)
            for p in stale:
                os.replace(p, moved / p.name)
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
