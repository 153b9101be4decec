"""Vector files as people have them: any OGR format through pyogrio, GeoParquet through pyarrow.

Ground truth arrives as a GeoPackage (often with several layers), a Shapefile, FlatGeobuf, GeoParquet or
GeoJSON. Each is read once on the client into plain GeoJSON-like geometries, their attributes and their
CRS; nothing here knows about classes (:mod:`segpipe.io.truth` decides those).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rasterio.crs import CRS

from segpipe.errors import InputError

PARQUET_SUFFIXES = {".parquet", ".geoparquet"}


@dataclass
class Features:
    """Geometries (GeoJSON mappings, ``None`` where a feature has none), per-feature attributes, and the CRS."""

    geometries: list[dict[str, Any] | None]
    attributes: list[dict[str, Any]]
    crs: CRS | None


def is_vector(path: str | Path) -> bool:
    """Whether ``path`` holds vector features: GeoParquet, or any source OGR opens with a spatial layer (a
    GeoTIFF or a raster GeoPackage has none)."""
    p = Path(path)
    if p.suffix.lower() in PARQUET_SUFFIXES:
        return True
    import pyogrio

    try:
        return any(geometry_type is not None for _, geometry_type in pyogrio.list_layers(str(p)))
    except Exception:  # noqa: BLE001 - not a vector source OGR knows
        return False


def read_features(path: str | Path, layer: str | int | None = None, what: str = "ground-truth") -> Features:
    """Every feature of ``layer`` (a file of one layer needs none); bad files and layers are one-line errors
    that say ``what`` the file is for (ground truth, an aoi)."""
    p = Path(path)
    if p.suffix.lower() in PARQUET_SUFFIXES:
        if layer is not None:
            raise InputError(f"{what} GeoParquet has no layers; remove truth.layer: {p}")
        return _read_geoparquet(p, what)
    import pyogrio
    import shapely
    from pyogrio.errors import DataLayerError, DataSourceError

    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(str(p))]
    except (DataSourceError, OSError) as exc:
        raise InputError(f"{what} vector is not readable ({str(exc).splitlines()[0]}): {p}") from None
    if layer is None and len(layers) > 1:
        raise InputError(f"{what} vector has layers {layers}: choose one with truth.layer: {p}")
    if isinstance(layer, str) and layer not in layers:
        raise InputError(f"{what} vector has no layer {layer!r} (layers: {layers}): {p}")
    if isinstance(layer, int) and not 0 <= layer < len(layers):
        raise InputError(f"{what} vector has no layer {layer} (layers 0..{len(layers) - 1}): {p}")
    try:
        meta, _, wkb, values = pyogrio.raw.read(str(p), layer=layer)[:4]
    except (DataSourceError, DataLayerError, OSError) as exc:
        raise InputError(f"{what} vector is not readable ({str(exc).splitlines()[0]}): {p}") from None
    names = [str(n) for n in meta["fields"]]
    geoms = [None if g is None else shapely.geometry.mapping(shapely.from_wkb(g)) for g in wkb]
    attrs = [{n: _plain(col[k]) for n, col in zip(names, values, strict=True)} for k in range(len(geoms))]
    return Features(geoms, attrs, _crs(meta.get("crs"), p))


def _read_geoparquet(path: Path, what: str = "ground-truth") -> Features:
    """A GeoParquet file (its ``geo`` metadata: primary WKB column and PROJJSON CRS, OGC:CRS84 when absent)."""
    import shapely

    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError:
        raise InputError(f"GeoParquet {what} needs pyarrow: pip install 'segpipe[geoparquet]'") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
        raise InputError(f"{what} GeoParquet is not readable ({type(exc).__name__}): {path}") from None
    try:
        geo = json.loads((table.schema.metadata or {})[b"geo"])
        column = geo["primary_column"]
        info = geo["columns"][column]
    except (KeyError, ValueError):
        raise InputError(f"{what} Parquet file has no GeoParquet 'geo' metadata: {path}") from None
    if info.get("encoding", "WKB").upper() != "WKB":
        raise InputError(f"{what} GeoParquet geometry encoding {info['encoding']!r} is not read (WKB is): "
                         f"{path}")
    crs = _crs(json.dumps(info["crs"]) if info.get("crs") else "OGC:CRS84", path)
    rows = table.to_pylist()
    geoms = [None if r[column] is None else shapely.geometry.mapping(shapely.from_wkb(r[column])) for r in rows]
    attrs = [{k: v for k, v in r.items() if k != column} for r in rows]
    return Features(geoms, attrs, crs)


def _crs(value: Any, path: Path) -> CRS | None:
    if not value:
        return None
    try:
        return CRS.from_user_input(value)
    except Exception:  # noqa: BLE001
        raise InputError(f"ground-truth vector has an unknown CRS {str(value)[:80]!r}: {path}") from None


def _plain(value: Any) -> Any:
    """NumPy scalars as Python values (attributes are compared with YAML values)."""
    return value.item() if hasattr(value, "item") else value
