"""Many scenes in one run: item discovery, per-item output folders and item completion marks.

Items are the GeoTIFFs, whole-slide images and NIfTI volumes of the archive folder, and every DICOM series
found anywhere in its tree (:mod:`segpipe.io.dicom`: slices grouped by SeriesInstanceUID, one item per series,
so a ``patient/study/series`` tree or a folder holding two series is handled as dcm2niix would). Each item
gets its own output folder named after it, so items never share stores. A finished item leaves a small JSON
mark: its input fingerprint, the settings its results were made with (:func:`item_settings`) and its global
scores. A rerun skips an item only when both are unchanged, without looking at its stores; a changed input
file is processed again (earlier results moved aside), and changed settings are refused naming what differs,
as the CLI refuses them, unless the job says ``overwrite``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.config import JobSpec, load_job
from segpipe.errors import InputError
from segpipe.io.dicom import Series, find_series, folders_under, is_dicom_file, scattered, series_in
from segpipe.io.fingerprint import source_fingerprint
from segpipe.io.layout import RunLayout
from segpipe.io.lease import LOCK_NAME
from segpipe.io.paths import is_remote, with_series
from segpipe.io.store import differences, write_atomic
from segpipe.io.volume import NIFTI_SUFFIXES, volume_stem
from segpipe.tiling.ingest import job_source

ITEM_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", *NIFTI_SUFFIXES)
NAME_FIELD = "{name}"

DONE_MARK = "_segpipe_done/item.json"
STARTED_MARK = "_segpipe_done/item-input.json"
SUPERSEDED = ".superseded"


@dataclass(frozen=True)
class Item:
    """One scene of an archive run; ``problem`` says why it cannot run, where discovery found out already."""

    source: str
    output: str
    problem: str | None = None

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


@dataclass(frozen=True)
class _Found:
    """A source and the names its output folder may take: the first unless it clashes, then longer ones."""

    source: str
    names: tuple[str, ...]
    problem: str | None = None


def discover(pattern: str, output_root: str | Path) -> list[Item]:
    """Items matching ``pattern``, sorted by source.

    ``pattern`` is a folder, meaning every image, slide and NIfTI file in it and every DICOM series anywhere
    below it; or a glob, whose matching files are items, and whose matching folders and DICOM slices stand for
    the series they hold. Nothing under ``output_root`` is an item.
    """
    root = Path(output_root).resolve()
    p = Path(pattern)
    found = _in_folder(p.resolve(), root) if p.is_dir() else _in_glob(pattern, root)
    if not found:
        raise InputError(f"no input files match {pattern}")
    items = [Item(f.source, str(root / name), f.problem)
             for f, name in zip(found, _unique_names(found), strict=True)]
    return sorted(items, key=lambda i: i.source)


def _in_folder(folder: Path, root: Path) -> list[_Found]:
    """The folder's own item files (not those of subfolders: labels may live there), and its tree's series."""
    files = [q for q in sorted(folder.iterdir())
             if not q.name.startswith(".") and q.is_file() and q.name.lower().endswith(ITEM_SUFFIXES)]
    series = find_series(folder, skip=root)
    return [_file(q) for q in files] + _series_found(series, series, folder)


def _in_glob(pattern: str, root: Path) -> list[_Found]:
    """Matching files as items, except DICOM slices: those and matching folders give the series they hold
    (each series once, however many of its slices or folders match). A pattern that names no file type
    (``archive/**``) takes only image, slide and NIfTI files, not every file it meets (notes, DICOMDIRs)."""
    typed = Path(pattern).suffix and not glob.has_magic(Path(pattern).suffix)
    files: list[Path] = []
    walked: set[Path] = set()  # matching folders and those below them: all their series
    slices: set[str] = set()  # matching DICOM slices: the series they belong to
    for m in sorted(glob.glob(pattern, recursive=True)):
        q = Path(m).resolve()
        if q == root or root in q.parents:
            continue
        if q.is_dir():
            walked.update(folders_under(q, root))
        elif is_dicom_file(q):
            slices.add(str(Path(m).parent.resolve() / Path(m).name))
        elif typed or q.name.lower().endswith(ITEM_SUFFIXES):
            files.append(q)
    folders = walked | {Path(f).parent for f in slices}
    named = {str(f) for f in walked}
    every = series_in(sorted(folders))
    series = [s for s in every if s.folder in named or slices.intersection(s.files)]
    return [_file(q) for q in files] + _series_found(series, every, _glob_base(pattern))


def _file(path: Path) -> _Found:
    return _Found(str(path), (volume_stem(path),))


def _series_found(series: list[Series], every: list[Series], base: Path) -> list[_Found]:
    """Sources and output names of DICOM series. Where its folder holds one series (of ``every`` series
    found), the folder is the source and its name the output's; where it holds several, the source names the
    series by UID and the output is ``PatientID_SeriesDescription`` (then ``PatientID_UID``). The folder's
    path below ``base`` is the name where those clash."""
    per_folder = Counter(s.folder for s in every)
    split = scattered(every)
    out = []
    for s in series:
        folder = Path(s.folder)
        where = _below(folder, base)
        problem = (f"DICOM series {s.uid} is split across the folders {', '.join(split[s.uid])}; put its slices in "
                   "one folder") if s.uid in split else None
        if per_folder[s.folder] == 1:
            out.append(_Found(s.folder, (_clean(folder.name), _clean(where)), problem))
            continue
        who = s.patient or folder.name
        names = (f"{who}_{s.description or s.uid}", f"{who}_{s.uid}", f"{where}_{s.uid}")
        out.append(_Found(with_series(s.folder, s.uid), tuple(_clean(n) for n in names), problem))
    return out


def _below(folder: Path, base: Path) -> str:
    """The folder's path below ``base`` as one name (``patient_study_series``)."""
    try:
        parts = folder.relative_to(base).parts
    except ValueError:
        parts = folder.parts[1:]
    return "_".join(parts) or folder.name


def _clean(name: str) -> str:
    """A name usable as an output folder: letters, digits, ``.``, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "series"


def _glob_base(pattern: str) -> Path:
    """The folder a glob starts from (its parts before the first wildcard)."""
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts).resolve() if parts else Path.cwd()


def _unique_names(found: list[_Found]) -> list[str]:
    """Each source's first name, or the next of its own names while it clashes with another's; a clash that
    no longer name resolves (two files named alike) is refused."""
    level = [0] * len(found)
    while True:
        names = [f.names[k] for f, k in zip(found, level, strict=True)]
        clashes = [[i for i, n in enumerate(names) if n == name] for name, c in Counter(names).items() if c > 1]
        if not clashes:
            return names
        for ids in clashes:
            longer = [i for i in ids if level[i] + 1 < len(found[i].names)]
            if not longer:
                a, b = ids[:2]
                raise InputError(f"two inputs would share the output folder {names[a]!r}: {found[a].source} and "
                                 f"{found[b].source}")
            for i in longer:
                level[i] += 1


def item_job(template: str | Path, item: Item) -> JobSpec:
    """The job template applied to one item; ``{name}`` in the truth path becomes the item's name.

    So per-item labels (``labels/{name}.nii.gz``, as in nnU-Net's ``labelsTr``) are found for
    every item of an archive. A ``tile_size`` larger than the item is clipped to it (:func:`fit_tile`).
    """
    job = load_job(template, {"input": item.source, "output": item.output})
    if job.store is not None:  # a shared store prefix (s3://...) gets one sub-prefix per item
        job.store = f"{job.store.rstrip('/')}/{item.name}"
    if job.truth is not None and NAME_FIELD in str(job.truth.path):
        job.truth.path = Path(str(job.truth.path).replace(NAME_FIELD, item.name))
    return fit_tile(job)


MIN_TILE = 64  # JobSpec's smallest tile_size


def fit_tile(job: JobSpec) -> JobSpec:
    """The job with a ``tile_size`` larger than its scene clipped to the scene: the item is one tile.

    Why for archive items only: one template serves items of many sizes, so a tile larger than a small item is
    no mistake of that item's, whereas a single job asking for a tile larger than its scene probably is one,
    and :func:`segpipe.pipeline.check` refuses it. The clipped tile is the smallest one covering the item
    that JobSpec allows (at least 64, a whole number of ``chunk_size``), so the results are those the larger
    tile would give.
    """
    if "tile_size" not in job.model_fields_set:
        return job  # the default tile is simply one tile on a small scene
    edge = max(job_source(job, job.level or 0).shape)
    step = job.chunk_size or 1
    clipped = -(-max(edge, MIN_TILE) // step) * step
    if clipped >= job.tile_size:
        return job
    job.tile_size = clipped
    job.model_fields_set.discard("tile_size")  # the item's size now, not a tile size the template asked for
    return job


# Settings whose change makes the stores another result: the CLI refuses to reuse such stores unless told to
# overwrite, and an archive refuses such an item the same way. The other settings only change what is written
# from the stores (exports, scores), so a change there redoes the item from its stores.
STORE_SETTINGS = ("result", "instances")


def item_settings(job: JobSpec, layout: RunLayout) -> dict[str, Any]:
    """What an item's results are made from besides its input file, as its done mark records it.

    ``result`` is the result store's fingerprint (:attr:`RunLayout.result_fp`: method and parameters, model,
    tile size, bands, nodata, chunks); then the instance settings, the exports, the class names and the ground
    truth (its settings and its file's fingerprint: new labels give new scores).
    """
    truth = None
    if job.truth is not None:
        path = str(job.truth.path)
        truth = job.truth.model_dump(mode="json")
        if not is_remote(path) and Path(path).exists():
            truth["file"] = source_fingerprint(path)
    return _jsonable({"result": layout.result_fp,
                      "instances": None if job.instances is None else job.instances.model_dump(mode="json"),
                      "exports": list(layout.exports), "class_names": job.class_names, "truth": truth})


@dataclass(frozen=True)
class Before:
    """An item finished earlier from this very input, compared with this run's settings."""

    stores: list[str]  # ``key: old -> new`` of the settings its stores were made from: redone only with overwrite
    outputs: list[str]  # of what was written from the stores: redone from them
    summary: dict[str, Any] | None  # its global scores then

    @property
    def changes(self) -> list[str]:
        return [*self.stores, *self.outputs]


def done_before(item: Item, settings: dict[str, Any]) -> Before | None:
    """How the item was finished before, against ``settings`` (:func:`item_settings`).

    None where it was not finished from this very input file, or was marked by a segpipe that recorded no
    settings: it is then run again, and its stores compared with the job as any run's are. Differences are
    named as the CLI names them (``method.params.classes: 2 -> 3``).
    """
    mark = _read_mark(item)
    if mark is None or mark.get("input") != _fingerprint(item.source) or not isinstance(mark.get("settings"), dict):
        return None
    old, new = mark["settings"], _jsonable(settings)

    def changed(key: str) -> list[str]:
        return differences(old.get(key), new.get(key), "" if key == "result" else f"{key}.")

    others = sorted((set(old) | set(new)) - set(STORE_SETTINGS))
    return Before([d for k in STORE_SETTINGS for d in changed(k)], [d for k in others for d in changed(k)],
                  mark.get("summary"))


def verdict(before: Before | None, overwrite: bool) -> str | None:
    """The item's status when it is not to run: ``skipped (done before)`` (same input, same settings) or
    ``refused: ...`` (its results were made with other store settings and the job does not say ``overwrite``);
    None when it runs."""
    if before is None:
        return None
    if not before.changes:
        return "skipped (done before)"
    if before.stores and not overwrite:
        return (f"refused: made with other settings ({'; '.join(before.stores[:4])}); set overwrite: true in the "
                "job to redo it")
    return None


def ran(before: Before | None) -> str:
    """The status of an item that ran: ``done``, or ``redone (settings changed: ...)``."""
    if before is None or not before.changes:
        return "done"
    return f"redone (settings changed: {'; '.join(before.changes[:4])})"


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


def mark_done(item: Item, summary: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """Record the item as finished (atomically): its input, the settings it was made with, its global scores."""
    write_atomic(item.mark, json.dumps({"input": _fingerprint(item.source), "settings": _jsonable(settings),
                                        "summary": summary}))


def _read_mark(item: Item) -> dict[str, Any] | None:
    try:
        mark = json.loads(item.mark.read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def read_summary(item: Item) -> dict[str, Any] | None:
    return (_read_mark(item) or {}).get("summary")


def _jsonable(value: Any) -> Any:
    """``value`` as its JSON round trip gives it back (tuples as lists), so a recorded value compares equal."""
    return json.loads(json.dumps(value, default=str))
