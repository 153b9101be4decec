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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client

# The grid's kinds (segpipe.geometry.KINDS, tied to these by a test): not imported from there, since the config
# reads this module and must not load rasterio and numpy to parse a job file.
KINDS = frozenset({"raster", "slide", "volume"})
IMAGES = frozenset({"raster", "slide"})


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

    def path(self, name: str) -> Path:
        return self.output / name


@dataclass(frozen=True)
class Export:
    """One export: its name in the job, the kinds of input it applies to, the kinds that get it when the job
    names no exports, the files it may write in the output, and the module whose ``write(run) -> [paths]``
    writes them (each file renamed into place only when complete)."""

    name: str
    applies_to: frozenset[str]
    default_for: frozenset[str]
    files: tuple[str, ...]
    module: str

    def write(self, run: ExportRun) -> list[Path]:
        return importlib.import_module(self.module).write(run)


# In the order they are written.
EXPORTS: dict[str, Export] = {e.name: e for e in (
    Export("cog", IMAGES, IMAGES, ("segmentation.tif", "probabilities.tif"), "segpipe.io.exports.cog"),
    Export("nifti", frozenset({"volume"}), frozenset({"volume"}), ("segmentation.nii.gz",),
           "segpipe.io.exports.nifti"),
    Export("ome-zarr", KINDS, frozenset({"slide"}), ("image.ome.zarr",), "segpipe.io.exports.omezarr"),
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


def output_files() -> tuple[str, ...]:
    """Every file any export may write in the output folder."""
    return tuple(f for e in EXPORTS.values() for f in e.files)


def write(names: list[str], run: ExportRun) -> list[Path]:
    """Write the named exports in registry order; returns every file written."""
    return [path for name, e in EXPORTS.items() if name in names for path in e.write(run)]
