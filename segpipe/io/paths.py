"""Where a path points: a local file, or a URL / GDAL virtual path that only its reader can open.

Its own module because configuration, readers, stores and the API all ask it, and none of them should
import another's module (a raster reader, a store) just for a string test.
"""

from __future__ import annotations

from pathlib import Path


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
