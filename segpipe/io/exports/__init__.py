"""The exports' registry: every file format a run can write its result as, each one module here plus one entry.

Why a registry that owns its entries: the job's choices (``exports:`` in the config), each kind's defaults,
the refusal of an export that does not apply to the input, the writing order and the files an overwrite may
have to clean up are all read from :data:`EXPORTS`, so adding an export touches this folder only (its module
and its entry), as xarray's backends or MONAI's inferers are added. The entry names its module, which is
imported only when the export is written: OME-Zarr's dask.array alone costs over a second, and a job that
never asks for an export should not pay for it. This module itself imports nothing heavy (the config reads it).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client

# The grid's kinds (segpipe.geometry.KINDS, tied to these by a test): not imported from there, since the config
# reads this module and must not load rasterio and numpy to parse a job file.
KINDS = frozenset({"raster", "slide", "volume"})
IMAGES = frozenset({"raster", "slide"})
# Source formats, where an export needs more than the kind: a NIfTI file and a DICOM series are both volumes.
SOURCE_WORDS = {"dicom": "a DICOM series", "nifti": "a NIfTI file"}


@dataclass(frozen=True)
class ExportRun:
    """What a writer gets: where the result and scene stores are, where the output goes, and the few job
    settings writers read. One value, so that no writer takes arguments it does not use."""

    result: str
    scene: str
    output: Path
    class_names: list[str]
    probabilities: bool = False
    client: Client | None = None
    source: str = ""  # the input as the readers take it (a DICOM series folder, with its series selector)
    method: str = ""  # the job's method name
    model: bool = False  # the method runs a model (as against a classical method)
    settings: Mapping[str, Any] = field(default_factory=dict)  # export name -> the job's settings for it
    objects: Path | None = None  # the objects' polygons (objects.gpkg) where this run wrote them (instances)

    def path(self, name: str) -> Path:
        return self.output / name


@dataclass(frozen=True)
class Export:
    """One export: its name in the job, the kinds of input it applies to, the kinds that get it when the job
    names no exports, the files it may write in the output, and the module whose ``write(run) -> [paths]``
    writes them (each file renamed into place only when complete). Where the kind alone cannot tell, ``sources``
    names the source formats it applies to (None: any of its kinds'); ``checked`` says its module has
    ``check(settings, class_names) -> str | None``, the one line refusing the job's settings for it;
    ``reads_objects`` that its writer reads the objects' polygons (:attr:`ExportRun.objects`), so the run writes
    it after the objects stage rather than with the other exports; ``warms`` that its module has ``warm()``,
    which loads what the writer would load on first use (see :func:`warm`)."""

    name: str
    applies_to: frozenset[str]
    default_for: frozenset[str]
    files: tuple[str, ...]
    module: str
    sources: frozenset[str] | None = None
    checked: bool = False
    reads_objects: bool = False
    warms: bool = False

    def write(self, run: ExportRun) -> list[Path]:
        return importlib.import_module(self.module).write(run)

    def check(self, settings: Mapping[str, Any], class_names: list[str]) -> str | None:
        return importlib.import_module(self.module).check(settings, class_names) if self.checked else None


# In the order they are written.
EXPORTS: dict[str, Export] = {e.name: e for e in (
    Export("cog", IMAGES, IMAGES, ("segmentation.tif", "probabilities.tif"), "segpipe.io.exports.cog"),
    Export("nifti", frozenset({"volume"}), frozenset({"volume"}), ("segmentation.nii.gz",),
           "segpipe.io.exports.nifti"),
    Export("ome-zarr", KINDS, frozenset({"slide"}), ("image.ome.zarr",), "segpipe.io.exports.omezarr"),
    Export("dicom-seg", frozenset({"volume"}), frozenset(), ("segmentation.seg.dcm",), "segpipe.io.exports.dicom_seg",
           sources=frozenset({"dicom"}), checked=True, warms=True),
    Export("polygons", IMAGES, frozenset(), ("class_polygons.parquet", "class_polygons.gpkg", "class_polygons.fgb"),
           "segpipe.io.exports.polygons"),
    Export("qupath", frozenset({"slide"}), frozenset(), ("qupath.geojson",), "segpipe.io.exports.qupath",
           reads_objects=True),
)}
NAMES = tuple(EXPORTS)


def defaults(kind: str) -> list[str]:
    """The exports a job of this kind of input gets when it names none."""
    return [name for name, e in EXPORTS.items() if kind in e.default_for]


def foreign(kind: str) -> set[str]:
    """Exports that do not apply to this kind of input."""
    return {name for name, e in EXPORTS.items() if kind not in e.applies_to}


def refusal(name: str, kind: str) -> str:
    """The one line for an export the job names that does not apply to its input."""
    takes = "; ".join(f"{k}s: {', '.join(n for n, e in EXPORTS.items() if k in e.applies_to)}" for k in sorted(KINDS))
    return f"export {name!r} does not apply to a {kind} input ({takes})"


def misfit(names: list[str], kind: str, source: str) -> str | None:
    """The one line for the first export the job names that does not fit its input (its kind, then its source
    format: ``dicom``, ``nifti`` or the reader's format), or None."""
    wrong = sorted(foreign(kind) & set(names))
    if wrong:
        return refusal(wrong[0], kind)
    for name in names:
        wants = EXPORTS[name].sources
        if wants is not None and source not in wants:
            takes = " or ".join(SOURCE_WORDS.get(s, s) for s in sorted(wants))
            return f"export {name!r} needs {takes} as input; this input is {SOURCE_WORDS.get(source, 'a ' + source)}"
    return None


def settings_problem(names: list[str], settings: Mapping[str, Any], class_names: list[str]) -> str | None:
    """The one line refusing the job's settings for one of the exports it names (e.g. a coded concept for a class
    the job does not have), or None. Asked before anything is written."""
    return next((p for n in names if (p := EXPORTS[n].check(settings.get(n, {}), class_names))), None)


def warm(names: list[str]) -> threading.Thread | None:
    """Start loading, in a daemon thread of this process, what the named exports' writers load on first use
    (their modules' ``warm()``), or None when none of them has any.

    Why: a writer's fixed cost is paid in the export stage, when nothing else runs, while during ingest and
    segmentation this process mostly waits on the workers. DICOM-SEG's is highdicom's import and the standard's
    IOD tables it parses on first use, 0.8 s of a 10 s CT run (benchmarks/RESULTS.md). A writer that comes before
    the thread is done waits on Python's import lock for a module, or parses a table again: never wrong, at worst
    no head start."""
    modules = [EXPORTS[n].module for n in names if EXPORTS[n].warms]
    if not modules:
        return None

    def load() -> None:
        for module in modules:
            try:
                importlib.import_module(module).warm()
            except Exception:  # noqa: BLE001 - a head start only: the writer loads (and reports) it for real
                return

    thread = threading.Thread(target=load, name="segpipe-warm-exports", daemon=True)
    thread.start()
    return thread


def output_files() -> tuple[str, ...]:
    """Every file any export may write in the output folder."""
    return tuple(f for e in EXPORTS.values() for f in e.files)


def write(names: list[str], run: ExportRun) -> list[Path]:
    """Write the named exports in registry order; returns every file written."""
    return [path for name, e in EXPORTS.items() if name in names for path in e.write(run)]
