"""Identity of a source on disk, cheap to compute: decides whether stored results still belong to it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from segpipe.io.paths import split_series


def source_fingerprint(path: str | Path) -> dict:
    """Size and modification time of a file, or of every file of a folder (a DICOM series).

    One series of a folder holding several (``<folder>#series=...``) is identified by the whole folder: cheap
    (no header is read), and a change to a sibling series only makes it be done again.
    """
    p = Path(split_series(path)[0])
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file())
        h = hashlib.sha256()
        for q in files:
            st = q.stat()
            h.update(f"{q.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return {"size": sum(q.stat().st_size for q in files), "mtime_ns": h.hexdigest()}
    st = os.stat(p)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
