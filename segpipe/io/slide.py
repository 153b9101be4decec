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
from segpipe.grid import Box

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
    """Level-0 geometry and pixel size of a slide."""

    path: str
    height: int
    width: int
    mpp_x: float
    mpp_y: float
    vendor: str

    @property
    def transform(self) -> Affine:
        return Affine.scale(self.mpp_x, self.mpp_y)


def _open(path: str | Path):
    import openslide

    p = Path(path)
    if not p.exists():
        raise InputError(f"input slide not found: {p}")
    try:
        return openslide.OpenSlide(str(p))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
        raise InputError(f"input slide is not readable by OpenSlide ({exc}): {p}") from None


def slide_info(path: str | Path) -> SlideInfo:
    """Inspect a slide; refuse one without a pixel size, because results could not be measured."""
    with _open(path) as s:
        props = s.properties
        try:
            mpp_x, mpp_y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            raise InputError(f"input slide has no microns-per-pixel metadata: {path}") from None
        w, h = s.dimensions
        return SlideInfo(str(Path(path).resolve()), h, w, mpp_x, mpp_y, props.get("openslide.vendor", ""))


def read_window(path: str, window: Box) -> tuple[np.ndarray, np.ndarray]:
    """RGB (3, h, w) uint8 and scanned-area mask (alpha > 0) of a level-0 window."""
    with _open(path) as s:
        rgba = np.asarray(s.read_region((window.col0, window.row0), 0, (window.width, window.height)))
    return np.moveaxis(rgba[..., :3], -1, 0).copy(), rgba[..., 3] > 0


def tissue_mask(path: str, min_fraction: float = 0.002) -> tuple[np.ndarray, int]:
    """Low-resolution tissue mask and its downsample factor.

    Tissue is saturated, background glass is not: Otsu on the thumbnail's saturation, then a
    closing and removal of specks smaller than ``min_fraction`` of the thumbnail.
    """
    from skimage import color, filters, morphology  # here, not at import: only slide jobs pay for it

    with _open(path) as s:
        w, h = s.dimensions
        size = (max(1, w // THUMB_DOWNSAMPLE), max(1, h // THUMB_DOWNSAMPLE))
        thumb = np.asarray(s.get_thumbnail(size).convert("RGB"))
    sat = color.rgb2hsv(thumb)[..., 1]
    t = filters.threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0
    mask = morphology.closing(sat > t, morphology.disk(2))
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(min_fraction * mask.size)))
    factor = w / mask.shape[1]
    return mask, factor


def upsample_mask(mask: np.ndarray, factor: float, window: Box) -> np.ndarray:
    """The level-0 pixels of ``window`` looked up in the low-resolution mask (nearest)."""
    rows = np.minimum((np.arange(window.row0, window.row1) / factor).astype(int), mask.shape[0] - 1)
    cols = np.minimum((np.arange(window.col0, window.col1) / factor).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]



