"""``item.json``: the run's STAC Item, written beside its outputs when a run with a CRS has finished.

Why: "results open where users work" (DESIGN.md). A STAC Item lets odc-stac, stackstac, STAC Browser and QGIS's
STAC plugin find the class map, its probabilities, the result store and the scores without knowing segpipe's
layout, and the folder can be copied to object storage as it is (every link and asset href is relative).

What it holds (pystac 1.15's extension classes make every field, so the extension versions are pystac's):
* geometry and bbox in EPSG:4326 from the scene's footprint: its bounds densified to 21 points per side (as
  GDAL does) and reprojected by odc-geo (``GeoBox.footprint``), so a curved edge in lon/lat is followed;
* the projection extension on the Item (``proj:code``, or ``proj:wkt2`` where the CRS has no EPSG code;
  ``proj:transform``, ``proj:shape``, ``proj:bbox`` in the scene's CRS): the COGs share the scene's grid;
* the raster extension on each GeoTIFF asset (data type, nodata, spatial resolution in metres; the
  probabilities' 1/254 scale), read from the files' headers, and the classification extension on the class
  map's band (value, name, the class name as title and the colour the COG's palette shows as ``color_hint``);
* the file extension (``file:size``, ``file:checksum`` as a sha2-256 multihash) on every file asset: the
  checksums cost one read of each file (measured: see :data:`CHECKSUM_NOTE`); folders
  (Zarr stores) get neither, since a checksum names one file's bytes;
* ``created``, the run's method and main settings and its global scores as ``segpipe:`` properties. Nothing
  from the cluster section or the environment; the source is named by its file name only (a URL's query may
  hold a signature).

``datetime``: a mosaic's items give its range (``start_datetime``/``end_datetime``); a single raster names no
acquisition time segpipe can trust, so its ``datetime`` is the run's end (the same as ``created``).

No Item for a volume or a slide (neither has a CRS; rasters without one are refused): a STAC Item is a GeoJSON Feature
that clients place on Earth; ``geometry: null`` is allowed, but the projection fields of a microscope's or a
scanner's grid would be read as a map's by the very tools the Item is for. Their outputs (NIfTI, OME-Zarr) carry
their own world placement.

rio-stac is not used: 0.12 writes projection v1.1.0 (``proj:epsg``, gone from v2.0.0, which pystac writes), no
``spatial_resolution``, and its raster statistics read the pixels; odc-geo (already here through odc-stac) makes
the densified footprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from segpipe.config import JobSpec
from segpipe.geometry import SceneGeometry
from segpipe.io.layout import ITEM
from segpipe.io.store import write_atomic

# Measured (2 cores): the demo's item (900² otsu with truth: 6 files, 0.6 MB checksummed) took 9 ms, 0.42 s in a
# fresh process (importing pystac and odc-geo); sha2-256 ran at 1.1 GB/s on cached data, so a class COG of a few
# hundred MB costs well under a second, or a read of the file at disk speed when it is no longer cached.
CHECKSUM_NOTE = "9 ms for the demo's item (0.42 s with first imports); sha2-256 at ~1.1 GB/s"
DENSIFY = 21  # points per side of the footprint before reprojection (GDAL's choice for transform_bounds)
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
ZARR_TYPE = "application/vnd+zarr"
# Known files of a run: asset key, media type, roles, title. Other exports get their file name as key.
KNOWN: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "segmentation.tif": ("segmentation", COG_TYPE, ("data",), "class map"),
    "probabilities.tif": ("probabilities", COG_TYPE, ("data",), "class probabilities (x254) and confidence"),
    "image.ome.zarr": ("ome-zarr", ZARR_TYPE, ("data",), "class map as OME-Zarr"),
    "segmentation.nii.gz": ("nifti", "application/x-nifti", ("data",), "class map as NIfTI"),
    "objects.gpkg": ("objects", "application/geopackage+sqlite3", ("data",), "objects' polygons"),
    "class_polygons.parquet": ("class-polygons", "application/vnd.apache.parquet", ("data",),
                               "class regions as polygons (GeoParquet)"),
    "class_polygons.gpkg": ("class-polygons", "application/geopackage+sqlite3", ("data",),
                            "class regions as polygons (GeoPackage)"),
    "class_polygons.fgb": ("class-polygons", "application/vnd.flatgeobuf", ("data",),
                           "class regions as polygons (FlatGeobuf)"),
    "result.zarr": ("result", ZARR_TYPE, ("data",), "result store (classes, probabilities, truth)"),
    "metrics/summary.json": ("summary", "application/json", ("metadata",), "global scores and stage times"),
    "metrics/report.html": ("report", "text/html", ("overview",), "HTML report"),
    "metrics/tiles.csv": ("tiles", "text/csv", ("metadata",), "scores per tile"),
    "metrics/tiles.geojson": ("tiles-geojson", "application/geo+json", ("metadata",), "scores per tile"),
    "metrics/objects.csv": ("objects-table", "text/csv", ("metadata",), "object measures"),
    "metrics/classes.csv": ("classes", "text/csv", ("metadata",), "area of each class"),
    "metrics/classes.json": ("classes-json", "application/json", ("metadata",), "area of each class"),
    "mosaic.json": ("mosaic", "application/json", ("metadata",), "the mosaic's items and grid"),
    "change/transitions.tif": ("change", COG_TYPE, ("data",), "class transitions since the previous period"),
    "change/change.json": ("change-summary", "application/json", ("metadata",), "change matrices and areas"),
    "change/transitions.csv": ("change-pixels", "text/csv", ("metadata",), "transition matrix (pixels)"),
    "change/transitions_area.csv": ("change-area", "text/csv", ("metadata",), "transition matrix (hectares)"),
    "change/change.md": ("change-report", "text/markdown", ("metadata",), "change report"),
    "change/change.zarr": ("change-store", ZARR_TYPE, ("data",), "transition codes store"),
}


@dataclass(frozen=True)
class RunFacts:
    """What the Item says about a run besides its files: the grid, the classes, the settings and scores (as
    plain values, so that this layer needs nothing of the pipeline's)."""

    id: str
    grid: SceneGeometry
    class_names: list[str]
    settings: dict[str, Any]  # segpipe:* properties (method and main settings)
    scores: dict[str, Any] = field(default_factory=dict)  # the summary's global figures
    times: tuple[str, ...] = ()  # ISO datetimes of the source items (a mosaic), if any


def wants_item(grid: SceneGeometry) -> bool:
    """Whether a run on this grid gets an Item: images placed on Earth (a CRS), not volumes or slides."""
    return grid.crs is not None and not grid.is_volume


def item_id(output: Path) -> str:
    """The Item's id: the output folder's name, characters outside ``[A-Za-z0-9._-]`` as ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(output).resolve().name) or "segpipe-run"


def multihash(path: Path, block: int = 1 << 22) -> str:
    """The file's sha2-256 as a multihash in hex (``1220`` + digest), as the file extension specifies."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return "1220" + h.hexdigest()


def global_scores(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The summary's global figures (``global_*``, pixels, objects' AP) as ``segpipe:`` properties."""
    s = (summary or {}).get("summary") or {}
    out = {f"segpipe:{k}": v for k, v in s.items() if k.startswith("global_") or k == "pixels"}
    objects = s.get("objects")
    if isinstance(objects, dict):
        out.update({f"segpipe:objects_{k}": v for k, v in objects.items() if isinstance(v, int | float | str)})
    return out


def source_name(source: str) -> str:
    """A source's file name, without a URL's query or fragment (which may hold a signature or a token)."""
    return re.split(r"[?#]", source, maxsplit=1)[0].rstrip("/").rsplit("/", 1)[-1]


def _version() -> str:
    """segpipe's version as installed (importing the package here would close a cycle through its lazy API)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segpipe")
    except PackageNotFoundError:
        return "unknown"


def job_settings(job: JobSpec, method: str, class_names: list[str], exports: Iterable[str]) -> dict[str, Any]:
    """The run's method and main settings as ``segpipe:`` properties: what a reader needs to tell two runs
    apart. Never the cluster section (addresses, credentials' paths) nor anything from the environment."""
    m = job.method
    s: dict[str, Any] = {"segpipe:version": _version(), "segpipe:method": method,
                         "segpipe:tile_size": job.tile_size, "segpipe:classes": list(class_names),
                         "segpipe:exports": list(exports), "segpipe:probabilities": job.probabilities}
    if isinstance(job.input, str):
        s["segpipe:source"] = source_name(job.input)
    if job.chunk_size is not None:
        s["segpipe:chunk_size"] = job.chunk_size
    if job.bands is not None:
        s["segpipe:bands"] = list(job.bands)
    if m.model is not None:
        s.update({"segpipe:model": Path(m.model).name, "segpipe:patch_size": m.patch_size,
                  "segpipe:overlap": m.overlap, "segpipe:batch_size": m.batch_size, "segpipe:tta": m.tta})
    if m.params:
        s["segpipe:params"] = json.loads(json.dumps(m.params, default=str))
    if job.instances is not None:
        s["segpipe:instances"] = job.instances.model_dump(mode="json", exclude_none=True)
    return s


def footprint(grid: SceneGeometry) -> tuple[dict[str, Any], list[float]]:
    """The scene's footprint in EPSG:4326 (GeoJSON geometry) and its bbox, its edges densified first."""
    from odc.geo.geobox import GeoBox

    box = GeoBox(grid.shape[-2:], grid.transform, grid.crs)
    geom = box.footprint("epsg:4326", npoints=DENSIFY, wrapdateline=True)
    west, south, east, north = geom.boundingbox
    return geom.json, [west, south, east, north]


def spatial_resolution(grid: SceneGeometry) -> float:
    """The pixel size in metres: CRS units times their size for a projected CRS; for degrees, the mean of the
    two axes' lengths at the scene's centre latitude."""
    crs = grid.crs
    xres, yres = abs(grid.transform.a), abs(grid.transform.e)
    if crs.is_projected:
        return float((xres + yres) / 2 * (crs.linear_units_factor[1] or 1.0))
    lat = math.radians((grid.bounds[1] + grid.bounds[3]) / 2)
    metres = 6378137.0 * math.pi / 180
    return float((xres * metres * math.cos(lat) + yres * metres) / 2)


def _time_range(times: Iterable[str]) -> tuple[datetime, datetime] | None:
    from pystac.utils import str_to_datetime

    parsed = sorted(str_to_datetime(t) for t in times if t)
    return (parsed[0], parsed[-1]) if parsed else None


def build_item(output: Path, facts: RunFacts, files: list[Path | str], created: datetime | None = None) -> Any:
    """The Item (a ``pystac.Item``, hrefs relative to ``output``) for a run's ``files``: files and folders under
    ``output``, or elsewhere (a Zarr store under the job's ``store:``; a URL string for a remote one)."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension

    created = created or datetime.now(UTC)
    geometry, bbox = footprint(facts.grid)
    span = _time_range(facts.times)
    props: dict[str, Any] = {**facts.settings, **facts.scores}
    if span is not None:
        item = pystac.Item(facts.id, geometry, bbox, None, props, start_datetime=span[0], end_datetime=span[1])
    else:
        item = pystac.Item(facts.id, geometry, bbox, created, props)
    item.common_metadata.created = created
    crs = facts.grid.crs
    epsg = crs.to_epsg()
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.apply(code=f"EPSG:{epsg}" if epsg else None, wkt2=None if epsg else crs.to_wkt(version="WKT2_2019"),
               bbox=list(facts.grid.bounds), shape=list(facts.grid.shape[-2:]),
               transform=list(facts.grid.transform)[:6])
    item.set_self_href(str(Path(output).resolve() / ITEM))
    classes = {"segmentation.tif": dict(enumerate(facts.class_names))}
    for path in files:
        if isinstance(path, str) and "://" in path:  # a remote store: its URL as it is
            key, media, roles, title = KNOWN[source_name(path)] if source_name(path) in KNOWN else (
                "result", ZARR_TYPE, ("data",), source_name(path))
            item.add_asset(key, pystac.Asset(path, title=title, media_type=media, roles=list(roles)))
        else:
            add_asset(item, Path(output), Path(path), classes)
    item.make_asset_hrefs_relative()
    return item


def add_asset(item: Any, output: Path, path: Path, classes: dict[str, dict[int, str]] | None = None) -> None:
    """Add ``path`` (under ``output``, the Item's folder) as an asset: its key, media type and roles from
    :data:`KNOWN`, size and checksum for a file, raster bands for a GeoTIFF; ``classes`` names the values of
    class maps, by file name."""
    import pystac
    from pystac.extensions.file import FileExtension

    try:
        name = path.resolve().relative_to(output.resolve()).as_posix()
    except ValueError:  # a store outside the output (the job's store:)
        name = path.name
    key, media, roles, title = KNOWN.get(name) or KNOWN.get(path.name) or (
        re.sub(r"[^A-Za-z0-9._-]+", "-", name), None, ("data",), path.name)
    asset = pystac.Asset(str(path.resolve()), title=title, media_type=media, roles=list(roles))
    item.add_asset(key, asset)
    if path.is_file():
        FileExtension.ext(asset, add_if_missing=True).apply(size=path.stat().st_size, checksum=multihash(path))
    if path.suffix == ".tif":
        _raster_bands(asset, path, (classes or {}).get(path.name))


def _raster_bands(asset: Any, path: Path, classes: dict[int, str] | None) -> None:
    """The raster extension's bands from the GeoTIFF's header; a class map's band gets its ``classes``."""
    import rasterio
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    from segpipe.io.probabilities import SCALE

    bands = []
    with rasterio.open(path) as src:
        res = spatial_resolution(SceneGeometry("raster", (src.height, src.width), src.transform, src.crs))
        for i, dtype in enumerate(src.dtypes, start=1):
            band = RasterBand.create(data_type=DataType(dtype), nodata=src.nodata, spatial_resolution=res)
            if path.name == "probabilities.tif":
                band.scale, band.offset = 1 / SCALE, 0.0
            if classes is not None and src.count == 1:
                try:
                    colours = src.colormap(i)
                except ValueError:  # no palette (a uint16 map)
                    colours = {}
                ClassificationExtension.ext(band).apply(_classes(classes, colours, src.nodata))
            bands.append(band)
    RasterExtension.ext(asset, add_if_missing=True).apply(bands=bands)
    if classes is not None:
        ClassificationExtension.add_to(asset.owner)


def _classes(names: dict[int, str], colours: dict[int, tuple[int, ...]], nodata: float | None) -> list[Any]:
    from pystac.extensions.classification import Classification

    out = []
    for value, name in names.items():
        rgb = colours.get(value)
        out.append(Classification.create(value=value, name=re.sub(r"[^0-9A-Za-z_-]+", "_", name) or f"class_{value}",
                                         title=name, color_hint=None if rgb is None else
                                         "{:02X}{:02X}{:02X}".format(*rgb[:3])))
    if nodata is not None:
        out.append(Classification.create(value=int(nodata), name="nodata", title="no data", nodata=True))
    return out


def item_document(item: Any) -> dict[str, Any]:
    """The Item as JSON, its links relative and without a self link (a self-contained catalog's way)."""
    return item.to_dict(include_self_link=False, transform_hrefs=True)


def write_item(path: Path, facts: RunFacts, files: list[Path | str], created: datetime | None = None) -> Path:
    """Write ``item.json`` at ``path`` atomically for the run's ``files`` (those that exist; URLs as given)."""
    present = [f for f in files if (isinstance(f, str) and "://" in f) or Path(f).exists()]
    item = build_item(path.parent, facts, present, created)
    write_atomic(path, json.dumps(item_document(item), indent=2))
    return path
