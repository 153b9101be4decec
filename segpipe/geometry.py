"""One description of where a scene's pixels lie, in the spirit of odc-geo's GeoBox: the grid value, and the boxes
(``Box``, ``Index``) that address windows of it.

It sits at the package's root, below every stage: readers return it, stores record it in their attributes
(:func:`geo_attrs`, :func:`read_geo`), tiling, the report and the exports read it back. It imports no other
segpipe module, so no stage reaches another through it.

Why: "is this a volume, an image or a slide?" decides the tile word, the pixel unit (and, through the
exports' registry, :mod:`segpipe.io.exports`, which exports apply), whether objects get polygons, and how
tile footprints and centroids are placed. Asked
in each stage from array ranks and attribute names, the answers drift apart; asked of one object built
from the input's metadata (or a store's attributes), they cannot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS

KINDS = ("raster", "slide", "volume")


# A position or size over the spatial axes: (row, col) of an image, (z, y, x) of a volume.
Index = tuple[int, ...]


@dataclass(frozen=True)
class Box:
    """A half-open box ``[start, stop)`` over the spatial axes."""

    start: Index
    stop: Index

    @classmethod
    def of(cls, shape: Index) -> Box:
        """The whole of an array of ``shape``."""
        return cls((0,) * len(shape), tuple(shape))

    @classmethod
    def rc(cls, row0: int, col0: int, row1: int, col1: int) -> Box:
        """A 2-D window from row/column bounds."""
        return cls((row0, col0), (row1, col1))

    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def shape(self) -> Index:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    # Row/column accessors: the last two axes, as rasters and slides use them.
    row0 = property(lambda self: self.start[-2])
    col0 = property(lambda self: self.start[-1])
    row1 = property(lambda self: self.stop[-2])
    col1 = property(lambda self: self.stop[-1])
    height = property(lambda self: self.stop[-2] - self.start[-2])
    width = property(lambda self: self.stop[-1] - self.start[-1])

    def grow(self, halo: int, shape: Index) -> Box:
        """This box enlarged by ``halo`` on every side, clipped to an array of ``shape``."""
        return Box(tuple(max(0, a - halo) for a in self.start),
                   tuple(min(n, b + halo) for b, n in zip(self.stop, shape, strict=True)))

    def overlaps(self, other: Box) -> bool:
        """Whether the two boxes share at least one pixel."""
        return all(a < d and c < b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop, strict=True))

    def intersect(self, other: Box) -> Box:
        """The overlap of two boxes (assumed to intersect)."""
        return Box(tuple(map(max, self.start, other.start)), tuple(map(min, self.stop, other.stop)))

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Slices that cut this box out of an array holding ``outer``."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, outer.start, strict=True))


def image_kind(crs: CRS | None, mpp: Any = None) -> str:
    """The kind of a 2-D grid known only by its placement (a store's attributes, a COG's tags): a slide has no
    CRS and a pixel size in micrometres (``mpp``); anything else is a raster, in CRS units or in pixels."""
    return "slide" if crs is None and mpp else "raster"


def geo_attrs(crs: CRS | None, transform: Affine, mpp: tuple[float, float] | None = None) -> dict[str, Any]:
    """CRS and transform in the forms today's readers look for.

    ``proj:wkt2``/``spatial:transform`` follow the GeoZarr conventions; ``crs_wkt`` and
    ``transform`` (rasterio order a, b, c, d, e, f) are what :func:`read_geo` uses. Slides have no
    CRS: their transform is in micrometres and ``mpp`` gives the pixel size.
    """
    t = [transform.a, transform.b, transform.c, transform.d, transform.e, transform.f]
    if crs is None:
        slide = image_kind(crs, mpp) == "slide"
        return {"crs_wkt": None, "transform": t, "mpp": list(mpp) if slide else None, "spatial:transform": t,
                "spatial:dimensions": ["y", "x"], "spatial:units": "micrometre" if slide else None}
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


# A volume affine's off-axis terms below this share of its column's length are float noise (a DICOM series' direction
# cosines, written to a few digits): its axes still run along the world's.
AXIS_ALIGNED = 1e-6
# A pixel size within 1 % of the model's is the model's: no resampling (a rounding of the GSD in metadata).
SAME_SIZE = 0.01
# Farther apart than this, a pixel size is far more likely in other units (degrees against metres, mm
# against µm) than a real difference of scale; refused rather than resampled.
MAX_RATIO = 16.0


def scale_for(model_size: list[float] | None, pixel_size: tuple[float, ...] | None,
              name: str) -> tuple[float, ...] | None:
    """Per axis, the model's pixel size over the scene's; None when they agree (or either is unknown).

    Raises a ValueError naming both sizes when they cannot be compared (axes, or an implausible factor).
    """
    if not model_size or pixel_size is None:
        return None
    wanted = list(model_size) * len(pixel_size) if len(model_size) == 1 else list(model_size)
    if len(wanted) != len(pixel_size):
        raise ValueError(f"model {name} gives a resolution for {len(wanted)} axes; the scene has {len(pixel_size)}")
    ratio = tuple(float(m) / float(s) for m, s in zip(wanted, pixel_size, strict=True))
    if all(abs(r - 1.0) <= SAME_SIZE for r in ratio):
        return None
    if any(not 1 / MAX_RATIO <= r <= MAX_RATIO for r in ratio):
        have = " x ".join(f"{v:g}" for v in pixel_size)
        raise ValueError(f"model {name} was trained at {' x '.join(f'{v:g}' for v in wanted)} per pixel, this "
                         f"scene has {have}: more than {MAX_RATIO:g}x apart, so probably in other units "
                         f"(reproject the scene, or correct the model card's resolution)")
    return ratio


@dataclass(frozen=True)
class SceneGeometry:
    """Shape, placement and units of a scene grid.

    ``transform`` places (row, col) of an image: CRS units for a raster, micrometres for a slide (no CRS).
    Volumes are ``(z, y, x)`` and placed by ``affine``, NIfTI's 4x4 from voxel ``(i, j, k) = (x, y, z)`` to
    RAS+ millimetres (``transform`` then holds their in-plane part, for code that only needs a 2-D one).
    """

    kind: str
    shape: tuple[int, ...]
    transform: Affine
    crs: CRS | None = None
    affine: np.ndarray | None = field(default=None, compare=False)
    mpp: tuple[float, float] | None = field(default=None, compare=False)  # slides: µm per pixel (x, y)
    # volumes: the NIfTI sform code of the affine's world frame (1 scanner, 2 aligned, 3 Talairach, 4 MNI)
    xform_code: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if (self.kind == "volume") != (len(self.shape) == 3) or (self.kind == "volume") != (self.affine is not None):
            raise ValueError(f"a {self.kind} needs {'3' if self.kind == 'volume' else '2'} axes"
                             f"{' and an affine' if self.kind == 'volume' else ''}: shape {self.shape}")

    @classmethod
    def volume(cls, shape: tuple[int, int, int], affine: Any, xform_code: int = 1) -> SceneGeometry:
        """A ``(z, y, x)`` volume placed by its RAS+ affine; ``transform`` is its in-plane voxel size."""
        a = np.asarray(affine, dtype=float)
        _, sy, sx = _spacing(a)
        return cls("volume", tuple(shape), Affine(sx, 0.0, 0.0, 0.0, sy, 0.0), None, a, None, int(xform_code))

    @classmethod
    def of_attrs(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> SceneGeometry:
        """From a scene or result store's attributes (the inverse of how ingest records them)."""
        crs, transform = read_geo(attrs)
        affine, mpp = attrs.get("affine"), attrs.get("mpp")
        # result and derived stores record no kind: a volume has its affine, a slide no CRS and a pixel size
        kind = attrs.get("kind") or ("volume" if affine is not None and len(shape) == 3 else image_kind(crs, mpp))
        return cls(str(kind), tuple(shape), transform, crs, None if affine is None else np.asarray(affine, dtype=float),
                   None if not mpp else tuple(mpp), int(attrs.get("nifti_xform_code", 1)))

    @classmethod
    def snapped(cls, bounds: Iterable[float], res: float, crs: CRS | None,
                anchor: tuple[float, float] = (0.0, 0.0), through: tuple[float, float] | None = None) -> SceneGeometry:
        """The north-up image grid of ``res`` pixels covering ``bounds`` (west, south, east, north), its pixel
        edges on ``anchor`` fractions of a pixel past multiples of ``res`` (odc-geo's anchors: (0, 0) is
        ``edge``, (0.5, 0.5) ``center``): every grid of an area with one anchor lands on the very same pixels.

        ``through``, a pixel corner (x, y) of another grid, puts the edges exactly on that grid's instead (a
        mosaic's native grid: its items' pixels are then copied, not resampled); exact, where a fraction would
        carry the rounding of dividing a coordinate by the pixel size."""
        west, south, east, north = bounds
        ax, ay = through if through is not None else (anchor[0] * res, anchor[1] * res)
        x0, y1 = math.floor((west - ax) / res + 1e-9) * res + ax, math.ceil((north - ay) / res - 1e-9) * res + ay
        x1, y0 = math.ceil((east - ax) / res - 1e-9) * res + ax, math.floor((south - ay) / res + 1e-9) * res + ay
        width, height = max(1, round((x1 - x0) / res)), max(1, round((y1 - y0) / res))
        return cls("raster", (height, width), Affine(res, 0.0, x0, 0.0, -res, y1), crs)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """West, south, east, north of an image grid, in its CRS's units (pixel edges, not centres)."""
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.shape[-2], self.shape[-1], self.transform)
        return west, south, east, north

    def attrs(self) -> dict[str, Any]:
        """The grid as a store records it, the inverse of :meth:`of_attrs`: CRS, transform and pixel size
        (:func:`geo_attrs`); for a volume its affine with the spacing, origin and direction cosines that NIfTI,
        ITK and OME-Zarr readers want."""
        if not self.is_volume:
            return geo_attrs(self.crs, self.transform, self.mpp)
        a = self.affine
        spacing = self.pixel_size
        return {"crs_wkt": None, "transform": [spacing[2], 0.0, 0.0, 0.0, spacing[1], 0.0],
                "affine": [[float(v) for v in r] for r in a], "affine_space": "RAS+ mm, voxel (i, j, k) = (x, y, z)",
                "spacing": list(spacing), "origin": [float(v) for v in a[:3, 3]],
                "direction": (a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)).tolist(),
                "nifti_xform_code": self.xform_code,
                "spatial:dimensions": ["z", "y", "x"], "spatial:units": "millimetre"}

    @property
    def pixel_size(self) -> tuple[float, ...]:
        """Per spatial axis ((z,) y, x): CRS units (metres for projected scenes), µm (slides), mm (volumes)."""
        if self.is_volume:
            return _spacing(self.affine)
        return (abs(self.transform.e), abs(self.transform.a))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_volume(self) -> bool:
        return self.kind == "volume"

    @property
    def is_slide(self) -> bool:
        return self.kind == "slide"

    @property
    def georeferenced(self) -> bool:
        """Whether world coordinates are a CRS's, so that vector data can be placed on the grid (not slides,
        volumes, or images in pixels)."""
        return self.crs is not None

    @property
    def has_levels(self) -> bool:
        """Whether the source is a pyramid read at a chosen level (``level:``): whole-slide images."""
        return self.is_slide

    @property
    def units(self) -> str:
        """Unit of the pixel size and of world coordinates: mm (volumes), µm (slides), the CRS's linear unit,
        or px for an image placed in pixels only."""
        if self.is_volume:
            return "mm"
        if self.kind == "slide":
            return "µm"
        if self.crs is None:
            return "px"
        return self.crs.linear_units or "unknown"

    @property
    def tile_word(self) -> str:
        """What a tile is called in messages and reports: a block of a volume, a tile of an image."""
        return "block" if self.is_volume else "tile"

    @property
    def row_word(self) -> str:
        """What one ingest task copies: a slab of chunk thickness along z of a volume, a row of chunks of an image."""
        return "slab" if self.is_volume else "row"

    @property
    def small_edge(self) -> int:
        """A window edge of about 65,000 values: 256 pixels of an image, 64 voxels of a volume (the smallest
        pyramid level of an export, the windows statistics are sampled in)."""
        return 64 if self.is_volume else 256

    def describe(self) -> str:
        """The size for messages, x first: ``512x512 px``, ``256x256x120 voxels``."""
        return "x".join(str(n) for n in self.shape[::-1]) + (" voxels" if self.is_volume else " px")

    @property
    def pixel_word(self) -> str:
        """What the counted elements are called: voxels of a volume, pixels of an image."""
        return "voxels" if self.is_volume else "pixels"

    @property
    def score(self) -> str:
        """The per-class overlap score the terminal shows per tile: Dice for volumes (as medical imaging
        reports), IoU for images; both are always written."""
        return "dice" if self.is_volume else "iou"

    @property
    def has_polygons(self) -> bool:
        """Whether objects can be written as polygons (objects.gpkg): images only."""
        return not self.is_volume

    def world(self, index: np.ndarray) -> np.ndarray:
        """Pixel (row, col) or voxel (z, y, x) index coordinates, shape (ndim, n), to world coordinates
        (x, y) in CRS units / µm, or (x, y, z) RAS+ mm; an index is a pixel centre at +0.5 of its corner."""
        index = np.asarray(index, dtype=float)
        if self.is_volume:
            ijk = np.vstack([index[2], index[1], index[0], np.ones(index.shape[1])])
            return (self.affine @ ijk)[:3]
        t = self.transform
        row, col = index[0] + 0.5, index[1] + 0.5
        return np.vstack([t.c + t.a * col + t.b * row, t.f + t.d * col + t.e * row])

    def world_axes(self) -> tuple[tuple[float, float], ...] | None:
        """Per array axis (z, y, x) of a volume, ``(start, step)``: the world coordinate (mm) of its first voxel
        centre along S, A, R and the signed mm per voxel (negative where the axis runs backwards).

        Only when the array axes run along the world's, x along R, y along A, z along S (each possibly reversed):
        then one number per index places a voxel, as xarray coordinates and OME-Zarr scale/translation need.
        None for an oblique affine or one that swaps axes, whose positions only the full ``affine`` gives
        (:meth:`world`); inventing per-axis positions for it would put voxels in the wrong place."""
        if not self.is_volume:
            return None
        m = self.affine[:3, :3]
        off = np.abs(m - np.diag(np.diag(m)))
        if (off > AXIS_ALIGNED * np.linalg.norm(m, axis=0)).any():
            return None
        return tuple((float(self.affine[w, 3]), float(m[w, w])) for w in (2, 1, 0))


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """A volume's voxel size along (z, y, x) in millimetres: the lengths of its affine's i, j, k columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)[::-1])
