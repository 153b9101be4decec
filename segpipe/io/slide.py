"""Whole-slide images (Aperio SVS, Hamamatsu, MIRAX, ...) through OpenSlide.

Slides have no CRS: their georeferencing is the pixel size in micrometres, carried as an affine
``Affine.scale(mpp_x, mpp_y)`` (units: µm) plus ``mpp`` attributes, so the rest of the pipeline
(tiles, patch grid, stitching, metrics) treats a slide like any other 2-D scene.
Background (no tissue) is marked invalid at ingest from a low-resolution tissue mask: patches and
tiles with no tissue are then never computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from segpipe.errors import InputError
from segpipe.geometry import Box
from segpipe.io.extras import require

SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
THUMB_DOWNSAMPLE = 16


GEOTIFF_TAGS = (33550, 33922, 34264, 34735)  # ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeys


def is_slide(path: str | Path) -> bool:
    """A vendor slide format, or a tiled, pyramidal TIFF without georeferencing (generic slide TIFF)."""
    p = Path(str(path))
    if p.suffix.lower() in SLIDE_SUFFIXES:
        return True
    return p.suffix.lower() in (".tif", ".tiff") and p.is_file() and is_pyramidal_plain_tiff(p)


def is_pyramidal_plain_tiff(path: Path) -> bool:
    """Tiled, with reduced-resolution levels, and no GeoTIFF tags: a slide, not a map."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            first = tif.pages.first
            geo = any(t in first.tags for t in GEOTIFF_TAGS)
            return not geo and first.is_tiled and (len(tif.pages) > 1 or bool(first.subifds))
    except (tifffile.TiffFileError, OSError, ValueError):
        return False  # not a TIFF tifffile can parse: leave the verdict to the raster reader


@dataclass(frozen=True)
class SlideInfo:
    """Geometry and pixel size of one pyramid level of a slide (level 0 unless chosen otherwise)."""

    path: str
    height: int
    width: int
    mpp_x: float
    mpp_y: float
    vendor: str
    level: int = 0

    @property
    def transform(self) -> Affine:
        return Affine.scale(self.mpp_x, self.mpp_y)


def _open(path: str | Path):
    openslide = require("openslide", "slides", "reading whole-slide images")
    p = Path(path)
    if not p.exists():
        raise InputError(f"input slide not found: {p}")
    try:
        return openslide.OpenSlide(str(p))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
        raise InputError(f"input slide is not readable by OpenSlide ({exc}): {p}") from None


def slide_info(path: str | Path, level: int = 0, mpp: tuple[float, float] | None = None) -> SlideInfo:
    """Inspect a slide at pyramid ``level``; refuse one without a pixel size, because results could not be
    measured. A level's pixel size is level 0's scaled by the level's extent (what OpenSlide reports)."""
    with _open(path) as s:
        if not 0 <= level < s.level_count:
            raise InputError(f"level {level} is not a level of this slide (0..{s.level_count - 1}): {path}")
        mpp_x, mpp_y = _level_mpp(s, path, mpp)[level]
        w, h = s.level_dimensions[level]
        return SlideInfo(str(Path(path).resolve()), h, w, mpp_x, mpp_y, s.properties.get("openslide.vendor", ""),
                         level)


def _level_mpp(s, path: str | Path,  # noqa: ANN001 - an OpenSlide handle
               mpp: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """µm per pixel (x, y) of every pyramid level: level 0's (the job's ``mpp``, else what the file declares)
    scaled by each level's extent."""
    found = tuple(mpp) if mpp else declared_mpp(dict(s.properties))
    if found is None:
        raise InputError("input slide has no microns-per-pixel metadata (no vendor mpp, OME PhysicalSizeX/Y or "
                         f"TIFF resolution tags in cm or inch); give it with the job's mpp: [x, y]: {path}")
    mpp_x, mpp_y = found
    (w0, h0) = s.dimensions
    return [(mpp_x, mpp_y) if k == 0 else (mpp_x * w0 / w, mpp_y * h0 / h)
            for k, (w, h) in enumerate(s.level_dimensions)]


def level0_size(path: str | Path) -> tuple[int, int]:
    """Level 0's (height, width): the frame slide viewers (QuPath) place objects in, whatever level a run read."""
    with _open(path) as s:
        width, height = s.dimensions
    return height, width


# OME length units as micrometres (the OME schema's UnitsLength, the ones a slide would use).
OME_UNITS = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
TIFF_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0}


def declared_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    """Level 0's µm per pixel from what the file declares, first found: the vendor's (OpenSlide's ``mpp``), an
    OME-TIFF's ``PhysicalSizeX/Y`` (OpenSlide reads OME-TIFF as a generic TIFF and leaves its XML unread), or
    TIFF resolution tags in centimetres or inches. None when it declares none."""
    try:
        return float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        pass
    ome = _ome_mpp(props.get("tiff.ImageDescription", ""))
    if ome is not None:
        return ome
    unit = TIFF_UNIT_UM.get(props.get("tiff.ResolutionUnit", ""))
    try:
        xres, yres = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
    except (KeyError, ValueError):
        return None
    return (unit / xres, unit / yres) if unit and xres > 0 and yres > 0 else None


def _ome_mpp(description: str) -> tuple[float, float] | None:
    """``PhysicalSizeX/Y`` of the first image of an OME-XML description, in µm (their units honoured)."""
    if "<OME" not in description:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(description.encode())
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in OME_UNITS or float(value) <= 0:
            return None
        sizes.append(float(value) * OME_UNITS[unit])
    return sizes[0], sizes[1]


def level_for(path: str | Path, mpp: float, level0: tuple[float, float] | None = None) -> int:
    """The coarsest pyramid level still at least as fine as ``mpp`` µm/px (1 % tolerance): the fewest pixels
    to read for a model trained at ``mpp``, which is then reached by resampling down, never up. ``level0``: the
    job's own pixel size of level 0, if it gives one."""
    with _open(path) as s:
        fine = [k for k, (mpp_x, _) in enumerate(_level_mpp(s, path, level0)) if mpp_x <= mpp * 1.01]
    return max(fine, default=0)


# Regions of a level above 0 are read from corners on this lattice (level pixels), see :func:`read_window`.
LEVEL_LATTICE = 512


def read_window(path: str, window: Box, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB (3, h, w) uint8 and scanned-area mask (alpha > 0) of a window of pyramid ``level``.

    OpenSlide places a region by its level-0 corner; where a level's downsample is not a whole number (a
    level 0 of odd size: 2967 rows over 1484), that corner falls between the level's pixels and OpenSlide
    interpolates. So a level above 0 is read in blocks whose corners lie on a fixed lattice of
    :data:`LEVEL_LATTICE` level pixels: every pixel is then read at one phase whatever window asks for it,
    and the scene, hence the result, stays the same for any tile or chunk size.
    """
    with _open(path) as s:
        if level == 0:
            rgba = np.asarray(s.read_region((window.col0, window.row0), 0, (window.width, window.height)))
        else:
            down = s.level_downsamples[level]
            rgba = np.zeros((window.height, window.width, 4), np.uint8)
            lat = LEVEL_LATTICE
            for r0 in range(window.row0 // lat * lat, window.row1, lat):
                for c0 in range(window.col0 // lat * lat, window.col1, lat):
                    r1, c1 = min(r0 + lat, window.row1), min(c0 + lat, window.col1)
                    block = np.asarray(s.read_region((round(c0 * down), round(r0 * down)), level, (c1 - c0, r1 - r0)))
                    top, left = max(r0, window.row0), max(c0, window.col0)
                    rgba[top - window.row0:r1 - window.row0, left - window.col0:c1 - window.col0] = \
                        block[top - r0:, left - c0:]
    return np.moveaxis(rgba[..., :3], -1, 0).copy(), rgba[..., 3] > 0


def tissue_mask(path: str, min_fraction: float = 0.002, level: int = 0) -> tuple[np.ndarray, float]:
    """Low-resolution tissue mask and its downsample factor relative to pyramid ``level``.

    Tissue is saturated, background glass is not: Otsu on the thumbnail's saturation, then a
    closing and removal of specks smaller than ``min_fraction`` of the thumbnail.
    """
    from skimage import color, filters, morphology  # here, not at import: only slide jobs pay for it

    with _open(path) as s:
        w, h = s.dimensions
        size = (max(1, w // THUMB_DOWNSAMPLE), max(1, h // THUMB_DOWNSAMPLE))
        thumb = np.asarray(s.get_thumbnail(size).convert("RGB"))
        level_w = s.level_dimensions[level][0]
    sat = color.rgb2hsv(thumb)[..., 1]
    t = filters.threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0
    mask = morphology.closing(sat > t, morphology.disk(2))
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(min_fraction * mask.size)))
    return mask, level_w / mask.shape[1]


def upsample_mask(mask: np.ndarray, factor: float, window: Box) -> np.ndarray:
    """The pixels of ``window`` (of the level the factor is relative to) looked up in the low-resolution mask."""
    rows = np.minimum((np.arange(window.row0, window.row1) / factor).astype(int), mask.shape[0] - 1)
    cols = np.minimum((np.arange(window.col0, window.col1) / factor).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]



