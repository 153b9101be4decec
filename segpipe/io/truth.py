"""Ground truth onto the scene grid: a raster or volume on the same grid, or vectors rasterised per tile.

Rasters must already be on the scene's CRS and grid: silently resampling labels would change
what is being measured, so a mismatch is an input error. Vector labels (any OGR format, GeoParquet:
:mod:`segpipe.io.vector`) are reprojected into the scene CRS (as Raster Vision does) and burned in tile
by tile, so memory stays bounded. Class attributes may hold ids or names.

Which values are ignored, exactly: the raster's own nodata tag, the values ``truth.ignore`` lists (after
``remap``), NaN in float truth, and nothing else. Any other value the method does not have as a class (255 of a
0/255 mask, a negative id, 256 in uint16 labels) is an error naming the values found and the settings that
would read them (``binarize``, ``remap``, ``ignore``): taken as "ignore" it would silently drop the foreground
out of the counts. Float truth must hold whole numbers unless ``truth.threshold`` says where to cut it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from shapely.geometry import box, shape

from segpipe.config import TruthSpec
from segpipe.errors import InputError
from segpipe.geometry import Box
from segpipe.io.raster import RasterInfo, open_raster, raster_info
from segpipe.io.result import NODATA
from segpipe.io.vector import is_vector, read_features
from segpipe.io.volume import is_volume, read_volume, volume_info

# Raster labels are scanned for their values in windows of about this many pixels (bounded memory).
SCAN_PIXELS = 2**22


@dataclass
class Truth:
    """Checked ground truth, cheap to send to workers (vector shapes are in scene CRS)."""

    kind: str  # "raster" | "vector" | "volume"
    path: str
    shapes: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    nodata: float | None = None
    all_touched: bool = False
    remap: dict[int, int] = field(default_factory=dict)
    binarize: bool = False
    instances: bool = False
    ignore: list[int] = field(default_factory=list)  # truth ids left out of the metrics
    threshold: float | None = None  # float truth: class 1 above it
    values: list[int] = field(default_factory=list)  # vector truth: the class ids its features give, as given

    @property
    def is_image(self) -> bool:
        """Whether the labels are read from a raster or volume; vector labels are burned in from ``shapes``."""
        return truth_kind(self.kind).read_raw is not None

    def _read_raw(self, window: Box) -> np.ndarray:
        return truth_kind(self.kind).read_raw(self.path, window)

    def has_ids(self) -> bool:
        """Whether true objects can be told apart: vector features, or a raster of instance IDs."""
        return not self.is_image or self.instances

    def read_ids(self, window: Box, transform: rasterio.Affine) -> np.ndarray:
        """True object IDs (uint32, 0 = none) for ``window``: feature number + 1, or the raster's own IDs."""
        if self.is_image:
            a = self._read_raw(window)
            ok = (a > 0) if self.nodata is None else (a > 0) & (a != self.nodata)
            return np.where(ok, a, 0).astype(np.uint32)
        return self._burn([(g, k + 1) for k, (g, _) in enumerate(self.shapes)], window, transform, "uint32")

    def _burn(self, shapes: list[tuple[dict[str, Any], int]], window: Box, transform: rasterio.Affine,
              dtype: str) -> np.ndarray:
        """Rasterise ``shapes`` (scene CRS) onto ``window`` of the scene grid."""
        if not shapes:
            return np.zeros(window.shape, dtype)
        t = transform @ rasterio.Affine.translation(window.col0, window.row0)
        return rasterize(shapes, out_shape=window.shape, transform=t, fill=0, all_touched=self.all_touched,
                         dtype=dtype)

    def labels(self, window: Box) -> tuple[np.ndarray, np.ndarray]:
        """A raster or volume truth's class ids (int64, after threshold, binarize and remap) for ``window``, and
        where they are ignored (the nodata tag, NaN, ``ignore``): nothing else is ignored (module docstring)."""
        raw = self._read_raw(window)
        ignore = np.zeros(raw.shape, bool) if self.nodata is None else (raw == self.nodata)
        if raw.dtype.kind == "f":
            ignore |= np.isnan(raw)
            raw = raw > self.threshold if self.threshold is not None else np.where(ignore, 0, raw)
        a = raw.astype(np.int64)
        if self.binarize or self.instances:
            a = (a > 0).astype(np.int64)
        if self.remap:
            mapped = a.copy()
            for src, dst in self.remap.items():
                mapped[a == src] = dst
            a = mapped
        if self.ignore:
            ignore |= np.isin(a, self.ignore)
        return a, ignore

    def read(self, window: Box, transform: rasterio.Affine) -> np.ndarray:
        """Labels (uint8, 255 = ignore) for ``window`` of the scene. Ids beyond uint8 never reach here: the
        check refuses them (:func:`check_truth`)."""
        if self.is_image:
            a, ignore = self.labels(window)
            return np.where(ignore | (a < 0) | (a >= NODATA), NODATA, a).astype(np.uint8)
        return self._burn(self.shapes, window, transform, "uint8")


def _read_volume(path: str, window: Box) -> np.ndarray:
    return read_volume(path, window)[0]


def _read_raster(path: str, window: Box) -> np.ndarray:
    with open_raster(path) as ds:
        return ds.read(1, window=((window.row0, window.row1), (window.col0, window.col1)))


def _check_volume(spec: TruthSpec, scene: RasterInfo, class_names: list[str] | None) -> Truth:  # noqa: ARG001
    """Label volumes must share the scene's voxel grid: same shape and the same affine (to 1e-4 mm)."""
    if not scene.grid.is_volume:
        raise InputError(f"ground truth is a volume but the input is a 2-D image: {spec.path}")
    v = volume_info(spec.path)
    scene_affine = scene.grid.affine
    if v.shape != scene.shape:
        raise InputError(f"ground-truth volume is on another voxel grid ({'x'.join(map(str, v.shape[::-1]))} "
                         f"voxels) than the input ({scene.describe()}): {spec.path}")
    if not np.allclose(np.asarray(v.affine), scene_affine, atol=1e-4):
        what = _affine_difference(v.affine, scene_affine)
        raise InputError(f"ground-truth volume has another affine than the input ({what}): {spec.path}")
    return Truth("volume", v.path, remap=dict(spec.remap), binarize=spec.binarize, instances=spec.instances,
                 threshold=spec.threshold)


def _affine_difference(truth: object, scene: object) -> str:
    """What differs between two 4x4 voxel-to-world affines, in words: spacing, origin or axis directions."""
    t, s = np.asarray(truth, float), np.asarray(scene, float)
    spacing_t, spacing_s = np.linalg.norm(t[:3, :3], axis=0), np.linalg.norm(s[:3, :3], axis=0)
    parts = []
    if not np.allclose(spacing_t, spacing_s, atol=1e-4):
        parts.append(f"voxel size {_mm(spacing_t)} vs {_mm(spacing_s)} mm")
    if not np.allclose(t[:3, 3], s[:3, 3], atol=1e-4):
        parts.append(f"origin {_mm(t[:3, 3])} vs {_mm(s[:3, 3])} mm")
    if not np.allclose(t[:3, :3] / spacing_t, s[:3, :3] / spacing_s, atol=1e-4):
        parts.append("axis directions (flipped or rotated)")
    return "; ".join(parts) or "differences below 1e-4"


def _mm(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:g}" for x in np.round(v, 4)) + ")"


def _check_raster(spec: TruthSpec, scene: RasterInfo, class_names: list[str] | None) -> Truth:  # noqa: ARG001
    geometry = scene.grid
    if geometry.is_volume:
        raise InputError(f"ground truth for a volume must be a NIfTI file or DICOM series: {spec.path}")
    info = raster_info(spec.path, "ground-truth raster", require_crs=geometry.georeferenced)
    if not geometry.georeferenced:  # a slide (or an image in pixels): labels must be on its pixel grid
        if (info.height, info.width) != (scene.height, scene.width):
            raise InputError(f"ground-truth raster is on another grid ({info.width}x{info.height}) than the "
                             f"slide ({scene.width}x{scene.height}): {spec.path}")
    else:
        if info.crs != scene.crs:
            raise InputError(f"ground-truth raster is on another CRS ({info.crs.to_string()}) than the scene "
                             f"({scene.crs.to_string()}): {spec.path}")
        same_grid = (info.height, info.width) == (scene.height, scene.width) and \
            info.transform.almost_equals(scene.transform, precision=1e-9 * max(1.0, abs(scene.transform.a)))
        if not same_grid:
            raise InputError(f"ground-truth raster is on another grid ({info.width}x{info.height}, "
                             f"{tuple(info.transform)[:6]}) than the scene ({scene.width}x{scene.height}, "
                             f"{tuple(scene.transform)[:6]}): {spec.path}")
    return Truth("raster", info.path, nodata=info.nodata, remap=dict(spec.remap), binarize=spec.binarize,
                 instances=spec.instances, threshold=spec.threshold)


def _class_id(value: object, spec: TruthSpec, class_names: list[str] | None, where: str) -> int:
    """A feature's class from its attribute: an id (an integer, or a string of one), or a name looked up in
    ``truth.classes``, else in the job's class names."""
    if isinstance(value, bool) or value is None:
        raise InputError(f"ground-truth feature has no class in attribute {spec.attribute!r}: {where}")
    if isinstance(value, int | np.integer) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    names = spec.classes if spec.classes is not None else {n: k for k, n in enumerate(class_names or [])}
    if text not in names:
        source = "truth.classes" if spec.classes is not None else "class_names"
        raise InputError(f"ground-truth class {text!r} (attribute {spec.attribute!r}) is not in {source} "
                         f"{sorted(names)}: map it with truth.classes: {where}")
    return int(names[text])


def _check_vector(spec: TruthSpec, scene: RasterInfo, class_names: list[str] | None) -> Truth:
    p = Path(spec.path)
    if not scene.grid.georeferenced:
        raise InputError(f"vector ground truth needs a georeferenced scene; give slides and volumes label "
                         f"images: {p}")
    features = read_features(p, spec.layer)
    src_crs = features.crs or CRS.from_epsg(4326)  # GeoJSON without a crs member: RFC 7946
    shapes = []
    values: set[int] = set()
    for geom, props in zip(features.geometries, features.attributes, strict=True):
        if not geom:
            continue
        if src_crs != scene.crs:
            geom = transform_geom(src_crs, scene.crs, geom)
        if spec.attribute is not None:
            if spec.attribute not in props:
                raise InputError(f"ground-truth feature lacks attribute {spec.attribute!r}: {p}")
            value = _class_id(props[spec.attribute], spec, class_names, str(p))
        else:
            value = spec.value
        shapes.append((geom, NODATA if value in spec.ignore else value))
        values.add(value)
    if shapes:
        scene_box = box(*scene.bounds)
        if not any(shape(g).intersects(scene_box) for g, _ in shapes):
            raise InputError(f"ground-truth vector does not overlap the scene: {p}")
    return Truth("vector", str(p.resolve()), shapes=shapes, all_touched=spec.all_touched, values=sorted(values))


def _slabs(shape_: tuple[int, ...]) -> list[Box]:
    """The scene in slabs of whole rows (slices) of about :data:`SCAN_PIXELS`: bounded memory for a scan."""
    rows = max(1, SCAN_PIXELS // max(1, int(np.prod(shape_[1:]))))
    return [Box((r, *(0,) * (len(shape_) - 1)), (min(shape_[0], r + rows), *shape_[1:]))
            for r in range(0, shape_[0], rows)]


def _check_values(truth: Truth, spec: TruthSpec, scene: RasterInfo, n_classes: int | None) -> None:
    """Scan a raster or volume truth once: float values that are not whole numbers (without a threshold) and
    class ids the method does not have (which would silently drop out of the counts) are named and refused."""
    found: set[int] = set()
    for window in _slabs(scene.shape):
        if truth.threshold is None:
            raw = truth._read_raw(window)
            if raw.dtype.kind == "f":
                frac = raw[np.isfinite(raw) & (raw != np.round(raw))]
                if frac.size:
                    raise InputError(f"ground truth holds values that are not whole numbers (e.g. {frac[0]:g}); "
                                     "give truth.threshold to cut a soft mask, or store class ids: "
                                     f"{spec.path}")
        a, ignore = truth.labels(window)
        found.update(int(v) for v in np.unique(a[~ignore]))
    if n_classes is not None:
        _refuse_beyond(sorted(v for v in found if not 0 <= v < n_classes), n_classes, spec)


def _refuse_beyond(bad: list[int], n_classes: int, spec: TruthSpec) -> None:
    """Ground-truth ids beyond ``0..n_classes - 1`` are an error naming them and the settings that read them."""
    if not bad:
        return
    shown = bad if len(bad) <= 8 else [*bad[:8], "..."]
    hint = (f"a 0/{bad[-1]} mask? truth.binarize: true (segpipe train --binarize) or truth.remap: {{{bad[-1]}: 1}}"
            if n_classes == 2 and len(bad) == 1 and bad[0] > 0 else "map them with truth.remap")
    raise InputError(f"ground truth holds value(s) {shown} beyond the method's classes 0..{n_classes - 1} ({hint}; "
                     f"or list them in truth.ignore to leave them out of the metrics): {spec.path}")


def check_truth(spec: TruthSpec, scene: RasterInfo, class_names: list[str] | None = None,
                n_classes: int | None = None) -> Truth:
    """Validate ground truth against the scene (and, given ``n_classes``, the method's classes) before anything
    is written; ``class_names`` resolve class attributes that hold names."""
    p = Path(spec.path)
    if not p.exists():
        raise InputError(f"ground truth not found: {p}")
    truth = next(k for k in TRUTH_KINDS if k.recognises(p)).check(spec, scene, class_names)
    truth.ignore = list(spec.ignore)
    if spec.threshold is not None and not truth.is_image:
        raise InputError(f"truth.threshold cuts float raster or volume truth; this truth is a vector file: {p}")
    if truth.is_image:
        _check_values(truth, spec, scene, None if spec.binarize or spec.instances else n_classes)
    elif n_classes is not None:
        _refuse_beyond(sorted(set(truth.values) - set(spec.ignore) - set(range(n_classes))), n_classes, spec)
    return truth


def _any_path(path: Path) -> bool:  # noqa: ARG001 - the fallback: a raster for GDAL, or its one-line error
    return True


@dataclass(frozen=True)
class TruthKind:
    """One kind of ground truth: how its path is recognised, how it is checked against the scene, and how a
    window of its labels is read as stored (None: vector shapes, burned in per tile instead)."""

    kind: str
    recognises: Callable[[Path], bool]
    check: Callable[[TruthSpec, RasterInfo, list[str] | None], Truth]
    read_raw: Callable[[str, Box], np.ndarray] | None = None


TRUTH_KINDS: tuple[TruthKind, ...] = (  # in detection order: the first that recognises a path checks it
    TruthKind("vector", is_vector, _check_vector),
    TruthKind("volume", is_volume, _check_volume, _read_volume),
    TruthKind("raster", _any_path, _check_raster, _read_raster),
)


def truth_kind(kind: str) -> TruthKind:
    """The entry of :data:`TRUTH_KINDS` for a checked truth's ``kind``."""
    return next(k for k in TRUTH_KINDS if k.kind == kind)
