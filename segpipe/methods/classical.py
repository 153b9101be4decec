"""Classical segmentation methods (scikit-image), made tile-consistent.

Every method splits into ``fit`` (on the client, from scene-wide statistics or a fixed scene-wide
sample: thresholds, cluster centres) and ``predict`` (on a worker, for one tile read with
``halo`` pixels of context). Methods whose output at a pixel depends only on a bounded
neighbourhood (thresholds, k-means, HSV, Sobel, Gabor, adaptive threshold) give exactly the
whole-image answer when ``halo`` covers that neighbourhood. Watershed and Canny's hysteresis are
not bounded: for them ``halo`` is a parameter, and the result equals whole-image processing
wherever basins/edge chains fit inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from scipy import ndimage as ndi
from scipy.cluster.vq import kmeans2
from skimage import color, feature, filters, segmentation

from segpipe.errors import InputError
from segpipe.tiling.stats import SceneStats, grey

State = dict[str, Any]


@dataclass
class FitContext:
    """What ``fit`` may use: scene statistics and deterministic scene-wide samples."""

    stats: SceneStats
    n_bands: int
    sample_pixels: Any  # () -> (N, bands) array
    sample_windows: Any  # (halo) -> list of (img, valid, core slices)


def _normalised_grey(img: np.ndarray, state: State) -> np.ndarray:
    """Grey scaled by scene-wide 1st/99th percentiles to roughly [0, 1]."""
    lo, hi = state["grey_lo"], state["grey_hi"]
    return (grey(img) - lo) / max(hi - lo, 1e-12)


def _grey_range(stats: SceneStats) -> State:
    return {"grey_lo": stats.grey_quantile(0.01), "grey_hi": stats.grey_quantile(0.99)}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def typed_params(method: str, model: type[BaseModel], params: dict[str, Any]) -> Any:
    """``params`` checked and typed by the method's pydantic ``model``, or one :class:`InputError` line.

    Every method's parameters go through here, before anything is written: an unknown name lists the known
    ones, a wrong value names the parameter and what was given.
    """
    known = sorted(model.model_fields)
    unknown = set(params) - set(known)
    if unknown:
        raise InputError(f"method {method!r} has no parameter(s) {sorted(unknown)}; known: {known}")
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "params"
        got = f" (got {first.get('input')!r})" if first["loc"] and first["type"] != "missing" else ""
        raise InputError(f"method {method!r} parameter {where}: {first['msg']}{got}") from None


@dataclass
class ClassicalMethod:
    """Base: parameters come from the job's ``method.params``."""

    params: dict[str, Any] = field(default_factory=dict)
    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]]  # the method's parameters, typed: checked before anything is written
    volumes: ClassVar[bool] = False  # True where predict is N-D (works on (band, z, y, x) volumes)

    def __post_init__(self) -> None:
        self.p = typed_params(self.name, self.Params, self.params).model_dump()

    @property
    def n_classes(self) -> int:
        return 2

    @property
    def halo(self) -> int:
        return 0

    def check_bands(self, n_bands: int) -> None:
        """Raise if the scene's band count cannot be used by this method."""

    def check_dims(self, ndim: int) -> None:
        """Raise if the method cannot segment a scene with ``ndim`` spatial axes."""
        if ndim != 2 and not self.volumes:
            raise InputError(f"method {self.name!r} works on 2-D images only; for volumes use "
                             f"{', '.join(n for n, m in CLASSICAL.items() if m.volumes)} or a 3-D model")

    def fit(self, ctx: FitContext) -> State:
        return {}

    def predict(self, img: np.ndarray, valid: np.ndarray, state: State) -> np.ndarray:
        raise NotImplementedError

    #: True where :meth:`memberships` gives per-class memberships (the job's ``probabilities: true``)
    soft: ClassVar[bool] = False

    def memberships(self, img: np.ndarray, valid: np.ndarray, state: State) -> np.ndarray:
        """(class, *spatial) float32 memberships summing to 1 per pixel, for methods with ``soft``."""
        raise NotImplementedError


def otsu_thresholds(stats: SceneStats, classes: int = 2) -> list[float]:
    """(Multi-)Otsu thresholds of the scene histogram; a flat scene gets one class below its value."""
    counts, centers = stats.hist_counts, stats.hist_centers
    used = np.nonzero(counts)[0]
    if len(used) < classes:
        top = float(centers[used[-1]]) if len(used) else 0.0
        return [top] * (classes - 1)
    lo, hi = used[0], used[-1] + 1  # trim empty tails: skimage needs occupied end bins
    hist = (counts[lo:hi], centers[lo:hi])
    if classes == 2:
        return [float(filters.threshold_otsu(hist=hist))]
    return [float(v) for v in filters.threshold_multiotsu(classes=classes, hist=hist)]


class Otsu(ClassicalMethod):
    """(Multi-)Otsu thresholds from the whole scene's grey histogram."""

    name = "otsu"
    volumes = True

    class Params(_Params):
        classes: int = Field(2, ge=2, le=254, description="classes from (multi-)Otsu thresholds")

    @property
    def n_classes(self) -> int:
        return int(self.p["classes"])

    def fit(self, ctx: FitContext) -> State:
        return {"thresholds": otsu_thresholds(ctx.stats, self.n_classes)}

    def predict(self, img, valid, state):
        return np.digitize(grey(img), state["thresholds"], right=True).astype(np.uint8)


class Adaptive(ClassicalMethod):
    """Local threshold (``skimage.filters.threshold_local``); halo covers the filter support."""

    name = "adaptive"
    volumes = True

    class Params(_Params):
        block_size: int = Field(51, ge=3, description="odd window edge of the local threshold")
        method: Literal["gaussian", "mean", "median"] = "gaussian"
        offset: float = 0.0

        @field_validator("block_size")
        @classmethod
        def _odd(cls, v: int) -> int:
            if v % 2 == 0:
                raise ValueError("must be odd")
            return v

    @property
    def halo(self) -> int:
        b = int(self.p["block_size"])
        if self.p["method"] == "gaussian":
            return int(4.0 * (b - 1) / 6.0 + 0.5) + 1
        return b // 2 + 1

    def fit(self, ctx):
        return _grey_range(ctx.stats)

    def predict(self, img, valid, state):
        g = _normalised_grey(img, state)
        t = filters.threshold_local(g, int(self.p["block_size"]), method=self.p["method"],
                                    offset=float(self.p["offset"]), mode="reflect")
        return (g > t).astype(np.uint8)


class KMeans(ClassicalMethod):
    """k-means on standardised band values, fitted on a scene-wide sample; classes by brightness."""

    name = "kmeans"
    volumes = True

    class Params(_Params):
        k: int = Field(3, ge=2, le=254)
        seed: int = 0

    @property
    def n_classes(self) -> int:
        return int(self.p["k"])

    def fit(self, ctx):
        state, x = _standardised_sample(ctx)
        return {**state, "centres": _ordered_kmeans(x, self.n_classes, int(self.p["seed"])).tolist()}

    def predict(self, img, valid, state):
        return _nearest(_standardised(img, state), np.asarray(state["centres"]))


def _ordered_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster centres sorted by mean value, so class 0 is always the darkest/weakest cluster."""
    if len(x) < k:
        raise InputError(f"scene has {len(x)} valid sample pixel(s), fewer than k={k} clusters")
    centres, _ = kmeans2(x.astype(np.float64), k, seed=seed, minit="++", iter=50)
    return centres[np.argsort(centres.mean(axis=1))]


def _sq_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(centre, *spatial) squared distances of every pixel of a (features, *spatial) array to each centre.

    Features are added one by one (a reduction over the leading axis): a pixel's value never depends on
    the window it is computed in, which tiling invariance needs.
    """
    return ((x[None] - centres[(..., *(None,) * (x.ndim - 1))]) ** 2).sum(axis=1)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for every pixel of a (features, *spatial) array."""
    return np.argmin(_sq_distances(x, centres), axis=0).astype(np.uint8)


def _standardised_sample(ctx: FitContext) -> tuple[State, np.ndarray]:
    """The scene-wide mean and standard deviation per band (a flat band divided by 1e-12), and the fixed
    scene-wide pixel sample standardised by them: what the clustering methods fit on."""
    mean = np.asarray(ctx.stats.mean)
    std = np.maximum(np.asarray(ctx.stats.std), 1e-12)
    return {"mean": mean.tolist(), "std": std.tolist()}, (ctx.sample_pixels() - mean) / std


def _standardised(img: np.ndarray, state: State) -> np.ndarray:
    """Bands standardised by the scene-wide mean and standard deviation of the fit."""
    lead = (slice(None),) + (None,) * (img.ndim - 1)
    return (img - np.asarray(state["mean"])[lead]) / np.asarray(state["std"])[lead]


def fcm_memberships(d2: np.ndarray, m: float) -> np.ndarray:
    """Fuzzy c-means memberships from squared distances (centre first): u_k = 1 / sum_j (d_k / d_j)^(2/(m-1)).

    Written as d_k^(-2/(m-1)) normalised, with the exponent on squared distances (-1/(m-1)). A pixel on a
    centre (d = 0) belongs to it alone (Bezdek's singular case); ties among several such centres share.
    """
    d2 = np.asarray(d2, np.float64)
    zero = d2 <= 0
    with np.errstate(divide="ignore"):
        inv = np.where(zero, 0.0, d2 ** (-1.0 / (m - 1.0)))
    any_zero = zero.any(axis=0)
    inv = np.where(any_zero[None], zero.astype(np.float64), inv)
    total = inv[0].copy()
    for k in range(1, len(inv)):  # centre by centre: the same additions in any window
        total += inv[k]
    return inv / total


def fit_fcm(x: np.ndarray, c: int, m: float, seed: int, max_iter: int, tol: float) -> np.ndarray:
    """Bezdek's fuzzy c-means on ``x`` (N, features); returns the centres sorted by mean value.

    Initial memberships are random (``seed``), as scikit-fuzzy's ``cmeans`` draws them; iterations stop
    when no membership moves by more than ``tol`` or after ``max_iter``.
    """
    if len(x) < c:
        raise InputError(f"scene has {len(x)} valid sample pixel(s), fewer than c={c} clusters")
    x = x.astype(np.float64)
    u = np.random.default_rng(seed).random((c, len(x)))
    u /= u.sum(axis=0)
    centres = np.zeros((c, x.shape[1]))
    for _ in range(max_iter):
        um = u**m
        centres = um @ x / um.sum(axis=1)[:, None]
        new = fcm_memberships(_sq_distances(x.T, centres), m)
        moved = float(np.abs(new - u).max())
        u = new
        if moved < tol:
            break
    return centres[np.argsort(centres.mean(axis=1), kind="stable")]


class FuzzyCMeans(ClassicalMethod):
    """Fuzzy c-means (Bezdek) on standardised band values, fitted on the scene-wide sample like k-means;
    each pixel's memberships come from its distances to the centres alone, so they are tile-exact and, with
    ``probabilities: true``, written as the result's probabilities. Class = largest membership (nearest
    centre); classes ordered by brightness."""

    name = "fcm"
    volumes = True
    soft = True

    class Params(_Params):
        c: int = Field(3, ge=2, le=254, description="clusters (classes)")
        m: float = Field(2.0, gt=1.0, le=10.0, description="fuzzifier: 1 is hard k-means, larger is fuzzier")
        seed: int = 0
        max_iter: int = Field(300, ge=1, le=10_000)
        tol: float = Field(1e-5, gt=0.0, description="stop when no sample membership moves by more than this")

    @property
    def n_classes(self) -> int:
        return int(self.p["c"])

    def fit(self, ctx):
        state, x = _standardised_sample(ctx)
        p = self.p
        centres = fit_fcm(x, self.n_classes, float(p["m"]), int(p["seed"]), int(p["max_iter"]), float(p["tol"]))
        return {**state, "centres": centres.tolist()}

    def predict(self, img, valid, state):
        return np.argmax(self.memberships(img, valid, state), axis=0).astype(np.uint8)

    def memberships(self, img, valid, state):
        d2 = _sq_distances(_standardised(img, state), np.asarray(state["centres"]))
        return fcm_memberships(d2, float(self.p["m"])).astype(np.float32)


class Watershed(ClassicalMethod):
    """Marker watershed on the Sobel gradient; markers from scene-wide Otsu +/- margin x std."""

    name = "watershed"
    volumes = True

    class Params(_Params):
        margin: float = Field(0.5, ge=0.0)
        smooth: float = Field(1.0, ge=0.0)
        halo: int = Field(64, ge=0)

    @property
    def halo(self) -> int:
        return int(self.p["halo"])

    def fit(self, ctx):
        t = otsu_thresholds(ctx.stats)[0]
        spread = float(np.mean(ctx.stats.std)) * float(self.p["margin"])
        return {"low": t - spread, "high": t + spread}

    def predict(self, img, valid, state):
        g = grey(img)
        smooth = ndi.gaussian_filter(g, float(self.p["smooth"])) if self.p["smooth"] else g
        markers = np.zeros(g.shape, np.int32)
        markers[smooth <= state["low"]] = 1
        markers[smooth >= state["high"]] = 2
        if not markers.any():
            return (smooth > (state["low"] + state["high"]) / 2).astype(np.uint8)
        return (segmentation.watershed(filters.sobel(smooth), markers) == 2).astype(np.uint8)


class Edges(ClassicalMethod):
    """Canny or Sobel edges on grey scaled by scene-wide percentiles (absolute thresholds)."""

    name = "edges"

    class Params(_Params):
        operator: Literal["canny", "sobel"] = "canny"
        sigma: float = Field(2.0, gt=0.0)
        low: float = Field(0.05, ge=0.0)
        high: float = Field(0.15, ge=0.0)
        threshold: float = 0.1
        halo: int = Field(32, ge=0)

    @property
    def halo(self) -> int:
        if self.p["operator"] == "sobel":
            return 2
        return max(int(self.p["halo"]), int(4 * float(self.p["sigma"]) + 0.5) + 2)

    def fit(self, ctx):
        return _grey_range(ctx.stats)

    def predict(self, img, valid, state):
        g = _normalised_grey(img, state)
        if self.p["operator"] == "sobel":
            return (filters.sobel(g) > float(self.p["threshold"])).astype(np.uint8)
        return feature.canny(g, sigma=float(self.p["sigma"]), low_threshold=float(self.p["low"]),
                             high_threshold=float(self.p["high"]), mode="reflect").astype(np.uint8)


class HSVRange(ClassicalMethod):
    """Pixels whose hue/saturation/value fall in ranges; hue ranges may wrap (e.g. red)."""

    name = "hsv"

    class Params(_Params):
        hue: tuple[float, float] = (0.0, 1.0)
        saturation: tuple[float, float] = (0.0, 1.0)
        value: tuple[float, float] = (0.0, 1.0)
        scale: float | None = Field(None, gt=0.0)

    def check_bands(self, n_bands):
        if n_bands < 3:
            raise InputError(f"method 'hsv' needs 3 bands (R, G, B), the scene has {n_bands}")

    def fit(self, ctx):
        scale = self.p["scale"] or max(ctx.stats.maximum[:3])
        return {"scale": float(scale) if scale else 1.0}

    def predict(self, img, valid, state):
        rgb = np.clip(np.moveaxis(img[:3], 0, -1) / state["scale"], 0.0, 1.0)
        hsv = color.rgb2hsv(rgb)
        h0, h1 = self.p["hue"]
        h = hsv[..., 0]
        in_h = (h >= h0) & (h <= h1) if h0 <= h1 else (h >= h0) | (h <= h1)
        s0, s1 = self.p["saturation"]
        v0, v1 = self.p["value"]
        s, v = hsv[..., 1], hsv[..., 2]
        return (in_h & (s >= s0) & (s <= s1) & (v >= v0) & (v <= v1)).astype(np.uint8)


class GaborTexture(ClassicalMethod):
    """Gabor filter-bank energy, smoothed, clustered by k-means fitted on fixed scene windows."""

    name = "gabor"

    class Params(_Params):
        frequencies: list[float] = Field([0.1, 0.25], min_length=1)
        orientations: int = Field(4, ge=1)
        k: int = Field(2, ge=2, le=254)
        smooth: float = Field(4.0, ge=0.0)
        seed: int = 0

    @property
    def n_classes(self) -> int:
        return int(self.p["k"])

    @property
    def halo(self) -> int:
        r = max(max(k.shape) // 2 for k in self._kernels())
        return r + int(4 * float(self.p["smooth"]) + 0.5) + 2

    def _kernels(self) -> list[np.ndarray]:
        thetas = np.arange(int(self.p["orientations"])) * np.pi / int(self.p["orientations"])
        return [filters.gabor_kernel(f, theta=t) for f in self.p["frequencies"] for t in thetas]

    def _features(self, g: np.ndarray) -> np.ndarray:
        feats = []
        for k in self._kernels():
            re = ndi.convolve(g, np.real(k), mode="reflect")
            im = ndi.convolve(g, np.imag(k), mode="reflect")
            energy = np.hypot(re, im)
            if self.p["smooth"]:
                energy = ndi.gaussian_filter(energy, float(self.p["smooth"]))
            feats.append(energy)
        return np.stack(feats)

    def fit(self, ctx):
        rng = _grey_range(ctx.stats)
        samples = []
        for img, valid, core in ctx.sample_windows(self.halo):
            f = self._features(_normalised_grey(img, rng))[:, core[0], core[1]]
            samples.append(f[:, valid[core]].T)
        x = np.concatenate(samples)
        mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-12)
        centres = _ordered_kmeans((x - mean) / std, self.n_classes, int(self.p["seed"]))
        return {**rng, "mean": mean.tolist(), "std": std.tolist(), "centres": centres.tolist()}

    def predict(self, img, valid, state):
        f = self._features(_normalised_grey(img, state))
        f = (f - np.asarray(state["mean"])[:, None, None]) / np.asarray(state["std"])[:, None, None]
        return _nearest(f, np.asarray(state["centres"]))


CLASSICAL: dict[str, type[ClassicalMethod]] = {
    cls.name: cls for cls in (Otsu, Adaptive, KMeans, FuzzyCMeans, Watershed, Edges, HSVRange, GaborTexture)
}


def make_classical(name: str, params: dict[str, Any]) -> ClassicalMethod:
    """Instantiate a classical method by name (raises :class:`InputError` on unknown params)."""
    return CLASSICAL[name](params=params)
