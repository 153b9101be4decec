"""Where a path points: a local file, or a URL / GDAL virtual path that only its reader can open.

Its own module because configuration, readers, stores and the API all ask it, and none of them should
import another's module (a raster reader, a store) just for a string test.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote


def is_remote(path: str | Path) -> bool:
    """URLs (https://, s3://, ...) and GDAL virtual paths (/vsizip/, /vsicurl/, ...) are not local files."""
    s = str(path)
    return "://" in s or s.startswith("/vsi")


def local_or_remote(path: str | Path, base: Path | None = None) -> str:
    """Local paths made absolute (relative to ``base``), remote ones left exactly as given."""
    if is_remote(path):
        return str(path)
    p = Path(path)
    return str((p if p.is_absolute() or base is None else base / p).resolve())


# One DICOM series of a folder that holds several: ``<folder>#series=<UID or description>`` (segpipe.io.dicom).
SERIES_MARK = "#series="


def split_series(path: str | Path) -> tuple[str, str | None]:
    """``(folder, selector)`` of a path written by :func:`with_series`; the selector is None for a plain path."""
    text = str(path)
    folder, mark, selector = text.rpartition(SERIES_MARK)
    return (folder, unquote(selector)) if mark else (text, None)


def with_series(folder: str | Path, selector: str) -> str:
    """The path naming DICOM series ``selector`` (a SeriesInstanceUID or a SeriesDescription) of ``folder``.

    Why a path: readers, fingerprints and Dask workers all receive a source as one string. The selector is
    percent-encoded, so a description with ``/`` or spaces stays one path component that resolving the path
    (``Path.resolve``) leaves alone.
    """
    return f"{folder}{SERIES_MARK}{quote(selector, safe='')}"
