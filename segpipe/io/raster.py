"""GeoTIFF/COG reading with the checks that turn bad files into one-line errors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from segpipe.errors import InputError
from segpipe.geometry import SceneGeometry
from segpipe.io.paths import is_remote, local_or_remote


@dataclass(frozen=True)
class RasterInfo:
    """What the pipeline needs to know about a source, read without loading pixels: its grid (the one value
    :class:`~segpipe.geometry.SceneGeometry`, which every reader returns) and its bands."""

    path: str
    grid: SceneGeometry
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str | None, ...]
    level: int = 0  # slides: the pyramid level read
    block: tuple[int, int] | None = None  # a GeoTIFF's internal tile (None: strips, or bands of mixed types)
    mosaic: Any = None  # a mosaic input: the resolved segpipe.io.mosaic.Mosaic its pixels are composited from

    @property
    def source_format(self) -> str:
        """The reader's format: a mosaic is a raster scene whose pixels come from many items."""
        return "mosaic" if self.mosaic is not None else self.kind

    # The grid's parts, named as rasterio names them, for the code that reads a source like a dataset.
    kind = property(lambda self: self.grid.kind)  # "raster", "slide" (no CRS, µm) or "volume" ((z, y, x), mm)
    shape = property(lambda self: self.grid.shape)  # (height, width), or (depth, height, width) for volumes
    height = property(lambda self: self.grid.shape[-2])
    width = property(lambda self: self.grid.shape[-1])
    crs = property(lambda self: self.grid.crs)
    transform = property(lambda self: self.grid.transform)
    mpp = property(lambda self: self.grid.mpp)
    pixel_size = property(lambda self: self.grid.pixel_size)
    bounds = property(lambda self: self.grid.bounds)

    def describe(self) -> str:
        """The size for messages (:meth:`SceneGeometry.describe`)."""
        return self.grid.describe()


def quiet_not_georeferenced() -> None:
    """Ignore rasterio's NotGeoreferencedWarning in this process (idempotent).

    Rasters in pixel units (slides, microscopy labels, plain images, COG staging files) are legitimate here,
    and the checks that need a CRS raise their own one-line errors; the warning would only be noise on a normal
    run. Process-wide on purpose: ``warnings.catch_warnings`` swaps the global filter list and is not
    thread-safe, so with worker threads (an in-process cluster) one thread leaving it restored the filters while
    another opened a raster, and the warning leaked (seen on a slide job's metrics stage, now and then).
    """
    if not any(f[2] is NotGeoreferencedWarning and f[0] == "ignore" for f in warnings.filters):
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


def open_raster(path: str | Path) -> rasterio.DatasetReader:
    """Open ``path`` for reading without rasterio's NotGeoreferencedWarning (see :func:`quiet_not_georeferenced`)."""
    quiet_not_georeferenced()
    return rasterio.open(path)


def open_checked(path: str | Path, what: str = "input raster") -> rasterio.DatasetReader:
    """Open ``path`` with rasterio or raise :class:`InputError` naming the file and the reason."""
    if not is_remote(path):
        p = Path(path)
        if not p.exists():
            raise InputError(f"{what} not found: {p}")
        if p.is_dir():
            raise InputError(f"{what} is a directory, not a raster file: {p}")
    try:
        return open_raster(path)
    except RasterioIOError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise InputError(f"{what} is not a readable raster ({reason}): {path}") from None


def raster_info(path: str | Path, what: str = "input raster", require_crs: bool = True) -> RasterInfo:
    """Inspect a raster; refuse one without a CRS because its results could not be georeferenced."""
    with open_checked(path, what) as ds:
        if require_crs and ds.crs is None:
            raise InputError(f"{what} has no CRS, so results could not be georeferenced: {path}")
        if ds.transform == Affine.identity() and ds.crs is not None and not ds.gcps[0]:
            raise InputError(f"{what} has a CRS but no geotransform: {path}")
        if ds.transform.b or ds.transform.d:  # result.zarr's x/y coordinates and every tile assume north-up
            raise InputError(f"{what} has a rotated or sheared geotransform; warp it to a north-up grid first "
                             f"(gdalwarp): {path}")
        try:
            # Decode one block so that a truncated or corrupt file fails here, before any output exists.
            ds.read(1, window=((0, min(ds.height, 1)), (0, min(ds.width, 1))))
            ds.read(1, window=((ds.height - 1, ds.height), (ds.width - 1, ds.width)))
        except RasterioIOError as exc:
            raise InputError(f"{what} is corrupt ({str(exc).splitlines()[0]}): {path}") from None
        tiled = ds.driver == "GTiff" and ds.profile.get("tiled", False) and len(set(ds.dtypes)) == 1
        return RasterInfo(
            path=local_or_remote(path), grid=SceneGeometry("raster", (ds.height, ds.width), ds.transform, ds.crs),
            count=ds.count, dtype=ds.dtypes[0], nodata=ds.nodata, descriptions=tuple(ds.descriptions),
            block=tuple(ds.block_shapes[0]) if tiled else None,
        )
