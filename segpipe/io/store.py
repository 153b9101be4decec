"""Zarr v3 store layout: arrays, georeferencing attributes and completion marks.

Why marks are files beside the arrays: workers finish tiles concurrently, and updating one shared
attribute document from many processes would race. One empty file per finished unit of work is
atomic on every filesystem, lets a rerun skip done work, and costs nothing to list.
Stores are never reopened with mode ``'w'``: an existing store is either resumed (same
fingerprint) or refused with an :class:`InputError`, so nothing written is lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from affine import Affine
from rasterio.crs import CRS

from segpipe.errors import InputError

MARKS_DIR = "_segpipe_done"


def geo_attrs(crs: CRS | None, transform: Affine, mpp: tuple[float, float] | None = None) -> dict[str, Any]:
    """CRS and transform in the forms today's readers look for.

    ``proj:wkt2``/``spatial:transform`` follow the GeoZarr conventions; ``crs_wkt`` and
    ``transform`` (rasterio order a, b, c, d, e, f) are what :func:`read_geo` uses. Slides have no
    CRS: their transform is in micrometres and ``mpp`` gives the pixel size.
    """
    t = [transform.a, transform.b, transform.c, transform.d, transform.e, transform.f]
    if crs is None:
        return {"crs_wkt": None, "transform": t, "mpp": list(mpp) if mpp else None, "spatial:transform": t,
                "spatial:dimensions": ["y", "x"], "spatial:units": "micrometre" if mpp else None}
    return {
        "crs_wkt": crs.to_wkt(),
        "transform": t,
        "proj:wkt2": crs.to_wkt(),
        "proj:code": f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else None,
        "spatial:transform": t,
        "spatial:dimensions": ["y", "x"],
    }


def read_geo(attrs: dict[str, Any]) -> tuple[CRS | None, Affine]:
    """Inverse of :func:`geo_attrs` (CRS is None for slides)."""
    wkt = attrs.get("crs_wkt")
    return (CRS.from_wkt(wkt) if wkt else None), Affine(*attrs["transform"][:6])


def open_or_create(path: str | Path, fingerprint: dict[str, Any], what: str) -> zarr.Group:
    """Open the group at ``path`` for resuming, or create it; refuse one made from other input.

    The fingerprint records what the store was made from. A store whose fingerprint differs was
    made by another job: overwriting it would destroy results, so this is an input error.
    """
    p = Path(path)
    if p.exists():
        try:
            group = zarr.open_group(str(p), mode="r+")
        except Exception:  # noqa: BLE001 - any failure to open means it's not ours
            raise InputError(f"{what} exists but is not a segpipe Zarr store: {p}") from None
        found = group.attrs.get("segpipe_fingerprint")
        if found != _jsonable(fingerprint):
            raise InputError(
                f"{what} at {p} was made from different input or settings; "
                "use another output folder or delete it"
            )
        return group
    group = zarr.open_group(str(p), mode="w-")
    group.attrs["segpipe_fingerprint"] = _jsonable(fingerprint)
    return group


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def ensure_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: Any, fill_value: Any, dims: tuple[str, ...],
                 attrs: dict[str, Any] | None = None, compress: bool = True) -> zarr.Array:
    """Create ``name`` in ``group`` unless it already exists with the same geometry (resume)."""
    if name in group:
        arr = group[name]
        if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
            raise InputError(f"array {name!r} in {group.store} has another shape or dtype; "
                             "use another output folder")
        return arr
    extra = {} if compress else {"compressors": None}
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
                             dimension_names=dims, **extra)
    if attrs:
        arr.attrs.update(attrs)
    return arr


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path`` and rename it into place.

    Readers see the old file or the new one, never half of either, even if the writer is killed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Marks:
    """Completion marks for one stage of one store."""

    def __init__(self, store_path: str | Path, stage: str) -> None:
        p = Path(store_path)
        # Beside the store, not inside it: Zarr readers warn about foreign objects in a hierarchy.
        self.dir = p.parent / MARKS_DIR / p.name / stage

    def done(self, key: str) -> bool:
        return (self.dir / key).exists()

    def mark(self, key: str) -> None:
        write_atomic(self.dir / key, "")

    def keys(self) -> set[str]:
        if not self.dir.exists():
            return set()
        return {p.name for p in self.dir.iterdir() if not p.name.startswith(".")}

    def clear(self) -> None:
        """Forget this stage's marks (used when a stage's inputs changed and it must be redone)."""
        if self.dir.exists():
            for p in self.dir.iterdir():
                p.unlink()
