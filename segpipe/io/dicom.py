"""DICOM series discovery: which series a folder (or a folder tree) holds, and how one of them is named.

Why by SeriesInstanceUID rather than by folder: PACS exports and scanner media nest ``patient/study/series``
folders, and one folder may hold several series (a localiser beside the axial CT, two reconstructions of one
scan). As dcm2niix does, slices are grouped by their SeriesInstanceUID, read from the headers only (pydicom's
``stop_before_pixels``); objects without an image (a DICOMDIR, structured reports, presentation states) are
not slices of any series and are left out.

A series in a folder that holds several is named by its folder and a selector, ``<folder>#series=<UID or
description>`` (:func:`segpipe.io.paths.with_series`): one string that every reader, fingerprint and Dask
worker receives, just as a folder path names the series of a folder that holds one. A job writes it as
``input: <folder>`` with the key ``series: <UID or description>``; an archive gives each series its own item.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.errors import InputError
from segpipe.io.extras import require

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index of the media, not an image
HEADER_TAGS = ("SeriesInstanceUID", "SeriesDescription", "PatientID", "Rows")


def is_dicom_file(p: Path) -> bool:
    """Carries the DICOM magic (``DICM`` at byte 128)."""
    if not p.is_file() or p.stat().st_size <= 132:
        return False
    with open(p, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


@dataclass(frozen=True)
class Series:
    """One series of a folder: its UID, description, patient and slice files (sorted by name)."""

    folder: str
    uid: str
    description: str
    patient: str
    files: tuple[str, ...]

    def describe(self) -> str:
        """``UID 'description' (N slices)``, as refusals list the series of a folder."""
        return f"{self.uid or '(no SeriesInstanceUID)'} {self.description!r} ({len(self.files)} slices)"


def is_dicomdir(header: Any) -> bool:
    """Whether a header is a DICOMDIR's (an index of the media, no slice of any series)."""
    meta = getattr(header, "file_meta", None)
    return meta is not None and str(getattr(meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS


def is_image(header: Any) -> bool:
    """Whether a header is a slice of a series: anything but a DICOMDIR and a whole object without an image (a
    SeriesInstanceUID but no Rows: a report, a presentation state). A header cut short before its
    SeriesInstanceUID counts as a slice, so that reading the series names the file instead of passing over it."""
    return not is_dicomdir(header) and ("Rows" in header or "SeriesInstanceUID" not in header)


def group_series(folder: str, headers: Iterable[tuple[Path, Any]]) -> dict[str, tuple[Series, list[tuple[Path, Any]]]]:
    """The image slices of ``headers`` (file, pydicom dataset) by SeriesInstanceUID, each with its summary."""
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f, h in headers:
        if is_image(h):
            groups.setdefault(str(h.get("SeriesInstanceUID", "")), []).append((f, h))
    out = {}
    for uid, members in sorted(groups.items()):
        first = members[0][1]
        s = Series(folder, uid, str(first.get("SeriesDescription", "") or ""), str(first.get("PatientID", "") or ""),
                   tuple(sorted(str(f) for f, _ in members)))
        out[uid] = (s, members)
    return out


def listing(series: Iterable[Series]) -> str:
    """The series of a folder, one after another, for a one-line refusal."""
    return "; ".join(s.describe() for s in series)


def pick(found: list[Series], source: str, selector: str | None) -> Series:
    """The series that ``selector`` names (its UID, or its description, case aside); without a selector, the
    folder's only series. Anything else is refused, listing the series found so that the job can name one."""
    how = "name one with the job key series: <UID or description>"
    if not found:
        raise InputError(f"folder holds no DICOM image series: {source}")
    if selector is None:
        if len(found) == 1:
            return found[0]
        raise InputError(f"folder holds {len(found)} DICOM series ({listing(found)}); {how}: {source}")
    by_uid = [s for s in found if s.uid == selector]
    named = by_uid or [s for s in found if s.description.casefold() == selector.casefold()]
    if len(named) == 1:
        return named[0]
    if named:
        raise InputError(f"{len(named)} DICOM series are described {selector!r} ({listing(named)}); name one by "
                         f"its UID: {source}")
    raise InputError(f"no DICOM series {selector!r} in the folder, which holds {listing(found)}; {how}: {source}")


def read_headers(files: Iterable[Path]) -> tuple[list[tuple[Path, Any]], list[Path]]:
    """The headers of ``files`` (no pixel data), as far as grouping needs them; and the files that could not
    be read (left to reading the series, which names them)."""
    pydicom = require("pydicom", "medical", "reading DICOM series")
    out, bad = [], []
    for f in files:
        try:
            out.append((f, pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))))
        except Exception:  # noqa: BLE001 - pydicom raises many types for bad files
            bad.append(f)
    return out, bad


def folder_series(folder: Path) -> list[Series]:
    """The image series whose slices lie directly in ``folder`` (none when it holds no DICOM file).

    A folder whose DICOM files are all unreadable still gives one (nameless) series, so that an archive has
    an item for it that fails naming the file, rather than passing over it in silence; an unreadable file
    beside readable series fails those series when they are read, for the same reason.
    """
    files = [p for p in sorted(folder.iterdir()) if is_dicom_file(p)]
    if not files:
        return []
    headers, bad = read_headers(files)
    found = [s for s, _ in group_series(str(folder), headers).values()]
    return found or ([Series(str(folder), "", "", "", tuple(str(f) for f in bad))] if bad else [])


def find_series(root: Path, skip: Path | None = None) -> list[Series]:
    """Every DICOM series in the tree under ``root`` (``root`` included), wherever it sits; hidden folders and
    the folder ``skip`` (an archive's output) are not entered."""
    return series_in(folders_under(root, skip))


def series_in(folders: Iterable[Path]) -> list[Series]:
    """The series of each of ``folders``, folder by folder."""
    return [s for folder in folders for s in folder_series(folder)]


def scattered(series: Iterable[Series]) -> dict[str, list[str]]:
    """SeriesInstanceUIDs whose slices lie in more than one folder, with those folders. Why it matters: each
    folder's part would be read as a volume of its own, a part of the scan passing for the whole."""
    where: dict[str, list[str]] = {}
    for s in series:
        if s.uid:
            where.setdefault(s.uid, []).append(s.folder)
    return {uid: folders for uid, folders in where.items() if len(folders) > 1}


def folders_under(root: Path, skip: Path | None) -> list[Path]:
    """``root`` and every folder below it, sorted, leaving out hidden ones and ``skip`` (and what is below)."""
    out = []
    for here, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip is None or Path(here, d).resolve() != skip))
        out.append(Path(here))
    return out
