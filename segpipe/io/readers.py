"""Source formats in one registry: how each is recognised, inspected, and read window by window.

Why a registry: ingest asked "a volume? a slide? else a raster?" in several places (inspecting the input,
preparing the ingest on the client, reading each row's windows). Everything that differs between formats now
stands together, one :class:`Format` each, and ingest looks the format up once: by detection for an input
path (:func:`detect`), by the ``kind`` it recorded after that (:func:`format_of`).

Detection order is fixed and matters: a local volume (NIfTI file or DICOM folder) first, then a slide (vendor
suffix, or a pyramidal TIFF without GeoTIFF tags), and everything else is a raster for GDAL. The raster is the
fallback, so a file nobody recognises gets the raster reader's one-line error.

The modules behind the formats import their heavy optional libraries (openslide, tifffile, nibabel, pydicom,
scikit-image) inside the functions that need them, so a raster job never loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.enums import MaskFlags

from segpipe.geometry import Box, SceneGeometry
from segpipe.io.mosaic import BLOCK, block_of, load_block
from segpipe.io.paths import is_remote
from segpipe.io.raster import RasterInfo, open_raster, raster_info
from segpipe.io.slide import is_slide, read_window, slide_info, tissue_mask, upsample_mask
from segpipe.io.volume import is_volume, read_volume, volume_info


def not_nodata(data: np.ndarray, nodata: float) -> np.ndarray:
    """Pixels where no band holds the nodata value (NaN compared as NaN)."""
    return ~np.any(np.isnan(data) if np.isnan(nodata) else data == nodata, axis=0)


def finite_only(data: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Validity ``ok`` with every pixel that has a NaN or infinite band taken out.

    Why: a float source (a NIfTI of float32, a float GeoTIFF) marks "no value" with NaN whatever its nodata says,
    and such a pixel has no place in statistics, segmentation or metrics. Ingest applies this to every reader's
    validity, so it holds for every format alike, in this one place.
    """
    if not np.issubdtype(data.dtype, np.floating):
        return ok
    return ok & np.all(np.isfinite(data), axis=0)


class WindowReader:
    """Reads windows of one source, each with its validity, for one ingest task; a context manager.

    Opened once per task (a row of chunks, or a slab of a volume), so a format that keeps a file open (GDAL)
    opens it once for all of the task's windows. Every reader takes the same arguments; each uses those its
    format needs: ``prepared`` is what :attr:`Format.prepare` computed once on the client.
    """

    dtype: np.dtype | None = None  # the source's pixel type where known without reading (rasters)

    def __init__(self, path: str, bands: list[int], nodata: float | None, level: int, prepared: Any) -> None:
        self.path, self.bands, self.nodata, self.level, self.prepared = path, bands, nodata, level, prepared

    def read(self, window: Box) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``(band, *window.shape)`` of the selected 1-based ``bands`` and validity ``window.shape``."""
        raise NotImplementedError

    def valid_everywhere(self) -> bool:
        """Whether every pixel is known valid without reading any (only a raster's masks can say so)."""
        return False

    def close(self) -> None:
        """Release what the reader holds open."""

    def __enter__(self) -> WindowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RasterReader(WindowReader):
    """GeoTIFF/COG and anything else GDAL reads; validity from GDAL's dataset mask unless the job names nodata.

    The dataset mask honours nodata values, alpha bands and internal masks alike.
    """

    def __init__(self, path: str, bands: list[int], nodata: float | None, level: int, prepared: Any) -> None:
        super().__init__(path, bands, nodata, level, prepared)
        self.ds = open_raster(path)
        self.dtype = np.dtype(self.ds.dtypes[0])

    def read(self, window: Box) -> tuple[np.ndarray, np.ndarray]:
        rwin = ((window.row0, window.row1), (window.col0, window.col1))
        data = self.ds.read(self.bands, window=rwin)
        ok = not_nodata(data, self.nodata) if self.nodata is not None else self.ds.dataset_mask(window=rwin) > 0
        return data, ok  # NaN and infinite values: made invalid by ingest (finite_only)

    def valid_everywhere(self) -> bool:
        """An integer raster without nodata, mask or alpha in any band: GDAL's dataset mask is valid everywhere."""
        ds = self.ds
        return (np.issubdtype(np.dtype(ds.dtypes[0]), np.integer)
                and all(ds.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in range(1, ds.count + 1)))

    def close(self) -> None:
        self.ds.close()


class SlideReader(WindowReader):
    """Whole-slide images through OpenSlide: valid where scanned and where the tissue mask (``prepared``) says
    tissue; background glass is thus never computed. The job's ``nodata`` is not consulted for slides."""

    def read(self, window: Box) -> tuple[np.ndarray, np.ndarray]:
        rgb, scanned = read_window(self.path, window, self.level)
        return rgb[[b - 1 for b in self.bands]], scanned & upsample_mask(*self.prepared, window)


class VolumeReader(WindowReader):
    """NIfTI files and DICOM series: every voxel is valid unless the job names a ``nodata`` value (or it is NaN,
    see :func:`finite_only`)."""

    def read(self, window: Box) -> tuple[np.ndarray, np.ndarray]:
        data = read_volume(self.path, window)[[b - 1 for b in self.bands]]
        return data, np.ones(window.shape, bool) if self.nodata is None else not_nodata(data, self.nodata)


class MosaicReader(WindowReader):
    """Items of a STAC search or a raster list composited onto the output grid (:mod:`segpipe.io.mosaic`).

    ``prepared`` is the resolved mosaic. Pixels are computed per fixed block of the grid and cut to the window;
    the last block is kept, since a window edge may cut through it and the next window then needs the rest.
    """

    def __init__(self, path: str, bands: list[int], nodata: float | None, level: int, prepared: Any) -> None:
        super().__init__(path, bands, nodata, level, prepared)
        self.dtype = np.dtype(prepared.dtype)
        self._last: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None

    def read(self, window: Box) -> tuple[np.ndarray, np.ndarray]:
        m = self.prepared
        data = np.empty((len(self.bands), *window.shape), self.dtype)
        ok = np.empty(window.shape, bool)
        for br in range(window.row0 - window.row0 % BLOCK, window.row1, BLOCK):
            for bc in range(window.col0 - window.col0 % BLOCK, window.col1, BLOCK):
                r0, c0, h, w = block_of(m, br, bc)
                if self._last is None or self._last[0] != (r0, c0):
                    self._last = ((r0, c0), load_block(m, r0, c0, h, w))
                block, valid = self._last[1]
                rows = slice(max(r0, window.row0), min(r0 + h, window.row1))
                cols = slice(max(c0, window.col0), min(c0 + w, window.col1))
                src = (slice(rows.start - r0, rows.stop - r0), slice(cols.start - c0, cols.stop - c0))
                dst = (slice(rows.start - window.row0, rows.stop - window.row0),
                       slice(cols.start - window.col0, cols.stop - window.col0))
                data[(slice(None), *dst)] = block[[b - 1 for b in self.bands]][(slice(None), *src)]
                ok[dst] = valid[src]
        return data, ok


def _raster_source(path: str, level: int = 0) -> RasterInfo:  # noqa: ARG001 - rasters have no pyramid level
    return raster_info(path)


def _slide_source(path: str, level: int = 0, mpp: tuple[float, float] | None = None) -> RasterInfo:
    s = slide_info(path, level, mpp)
    grid = SceneGeometry("slide", (s.height, s.width), s.transform, None, mpp=(s.mpp_x, s.mpp_y))
    return RasterInfo(s.path, grid, 3, "uint8", None, ("red", "green", "blue"), level=s.level)


def _volume_source(path: str, level: int = 0) -> RasterInfo:  # noqa: ARG001 - volumes have no pyramid level
    v = volume_info(path)
    return RasterInfo(v.path, v.grid, v.count, v.dtype, None, (None,) * v.count)


def _is_local_volume(path: str) -> bool:
    return not is_remote(path) and is_volume(path)


def _any_path(path: str) -> bool:  # noqa: ARG001 - the fallback format takes whatever is left
    return True


def _never(path: str) -> bool:  # noqa: ARG001 - a mosaic comes from the job's input mapping, never a path
    return False


def _mosaic_source(path: str, level: int = 0) -> RasterInfo:
    raise ValueError(f"a mosaic is inspected by resolving its spec (segpipe.io.mosaic), not a path: {path}")


def _nothing(info: RasterInfo) -> None:  # noqa: ARG001 - formats whose readers need nothing prepared
    return None


def _tissue(info: RasterInfo) -> tuple[np.ndarray, float]:
    return tissue_mask(info.path, level=info.level)


def _resolved_mosaic(info: RasterInfo) -> Any:
    return info.mosaic


@dataclass(frozen=True)
class Format:
    """One source format: its ``kind`` (as :class:`RasterInfo` and the scene store record it), how a path is
    recognised, how the input is inspected (``inspect(path, level)``; a slide's also takes the job's ``mpp``),
    which reader reads its windows, what is computed once per ingest on the client for every task's reader
    (``prepare(info)``), and whether its pixels may be read in place instead of copied
    (:mod:`segpipe.io.source_pixels` reads GeoTIFFs only)."""

    kind: str
    recognises: Callable[[str], bool]
    inspect: Callable[..., RasterInfo]
    reader: type[WindowReader]
    prepare: Callable[[RasterInfo], Any] = _nothing
    in_place: bool = False


FORMATS: tuple[Format, ...] = (  # in detection order: the first that recognises a path reads it
    Format("volume", _is_local_volume, _volume_source, VolumeReader),
    Format("slide", is_slide, _slide_source, SlideReader, prepare=_tissue),
    Format("mosaic", _never, _mosaic_source, MosaicReader, prepare=_resolved_mosaic),
    Format("raster", _any_path, _raster_source, RasterReader, in_place=True),
)


def detect(path: str) -> Format:
    """The format of an input path (see the module's note on detection order)."""
    return next(f for f in FORMATS if f.recognises(path))


def format_of(kind: str) -> Format:
    """The format of a ``kind`` recorded at inspection (``RasterInfo.kind``)."""
    for f in FORMATS:
        if f.kind == kind:
            return f
    raise ValueError(f"no reader for source kind {kind!r}; known: {[f.kind for f in FORMATS]}")


def open_reader(kind: str, path: str, bands: list[int], nodata: float | None, level: int = 0,
                prepared: Any = None) -> WindowReader:
    """A window reader for a source of ``kind`` (use it as a context manager)."""
    return format_of(kind).reader(path, bands, nodata, level, prepared)
