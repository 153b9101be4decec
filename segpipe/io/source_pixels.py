"""A tiled GeoTIFF/COG read in place: the scene's pixels without a copy into the scene store.

Copying a tiled GeoTIFF into Zarr costs a decode, an encode and a second copy of the scene on disk, and
buys nothing when the file's internal tiles already fit the job's chunks: a windowed read decodes just
the tiles it touches, as a Zarr chunk read would (odc-stac and Raster Vision read sources this way too).
:class:`SourcePixels` looks like the store's ``image`` array (band, y, x) to every stage: same shape,
dtype, chunks and NumPy-style indexing. The scene store still holds validity and the geometry; its
fingerprint records the source's size and modification time, so a changed source is refused on resume.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import rasterio
from rasterio.env import get_gdal_config, set_gdal_config

from segpipe.io.raster import open_raster

_handles = threading.local()  # GDAL dataset handles must not be shared between threads

# Bytes per read when a strided key (a quick-look) is served: bounds memory on any scene size.
_STRIDED_BYTES = 64 * 2**20


# GDAL's block cache defaults to 5 % of RAM per process and fills with decoded source tiles as a scene is
# read in place: on a large scene every worker would grow by that much. Windows are read in scene order
# and a decoded tile is reused only by neighbouring windows, which are at most a few rows of tiles away:
# the cache is sized to CACHE_TILE_ROWS full-width rows of the source's tiles (all bands), between
# SOURCE_CACHE_MIN and SOURCE_CACHE_BYTES. Measured (otsu, 4096² with 256² tiles, threads): a 128 MB
# cache held the whole decoded scene and made peak RSS grow with it (243 vs 180 MiB at 1 Mpx); 16 MB
# gave 208 MiB at the same speed.
CACHE_TILE_ROWS = 4
SOURCE_CACHE_MIN = 16 * 2**20
SOURCE_CACHE_BYTES = 128 * 2**20
_cache_set: set[int] = set()  # the GDAL_CACHEMAX values set here (a user's own setting is never raised)


@functools.cache
def _bound_gdal_cache(need: int) -> None:
    """Fit this process's GDAL block cache to ``need`` bytes, within the bounds above.

    Never raises a bound the user set; raises one set here when a later source needs more.
    """
    want = min(SOURCE_CACHE_BYTES, max(SOURCE_CACHE_MIN, need))
    current = int(get_gdal_config("GDAL_CACHEMAX") or 0)
    ours = current in _cache_set
    if current == 0 or (not ours and current > SOURCE_CACHE_BYTES) or (ours and want > current):
        set_gdal_config("GDAL_CACHEMAX", want)
        _cache_set.add(want)


def _cache_need(ds: rasterio.DatasetReader) -> int:
    """Bytes of CACHE_TILE_ROWS full-width rows of ``ds``'s internal tiles, all bands."""
    block_rows = ds.block_shapes[0][0] if ds.block_shapes else 256
    return CACHE_TILE_ROWS * block_rows * ds.width * ds.count * np.dtype(ds.dtypes[0]).itemsize


def _dataset(path: str) -> rasterio.DatasetReader:
    """This thread's open handle on ``path`` (opening per read would re-parse the header every tile)."""
    open_ = getattr(_handles, "open", None)
    if open_ is None:
        open_ = _handles.open = {}
    ds = open_.get(path)
    if ds is None or ds.closed:
        ds = open_[path] = open_raster(path)
        _bound_gdal_cache(_cache_need(ds))
    return ds


# Larger internal tiles make every small window decode a lot of pixels it does not use.
MAX_BLOCK = 1024


def suits_in_place(block: tuple[int, int] | None, chunk: int) -> bool:
    """Whether a source with internal tiles ``block`` can serve ``chunk``-sized windows without waste.

    The tiles and the chunks must nest (either divides the other): then a chunk window decodes whole tiles
    of its own, or one tile that GDAL's block cache keeps for the other chunks inside it.
    """
    return block is not None and max(block) <= MAX_BLOCK and all(chunk % b == 0 or b % chunk == 0 for b in block)


class SourcePixels:
    """Read-only array view (band, y, x) of the selected ``bands`` (1-based) of the GeoTIFF at ``path``."""

    def __init__(self, path: str, bands: list[int], shape: tuple[int, int], dtype: str, chunk: int) -> None:
        self.path = path
        self.bands = list(bands)
        self.shape = (len(self.bands), *shape)
        self.dtype = np.dtype(dtype)
        self.chunks = (len(self.bands), chunk, chunk)
        self.ndim = 3

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> SourcePixels:
        """The view a scene store's attributes describe (written by ingest)."""
        return cls(attrs["source"], attrs["bands"], tuple(attrs["pixels_shape"]), attrs["pixels_dtype"],
                   int(attrs["pixels_chunk"]))

    def attrs(self) -> dict[str, Any]:
        return {"pixels": "source", "pixels_shape": list(self.shape[1:]), "pixels_dtype": self.dtype.name,
                "pixels_chunk": self.chunks[1]}

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-D array")
        picked = np.arange(len(self.bands))[key[0]]
        bands = [self.bands[i] for i in np.atleast_1d(picked)]
        axes, squeeze = [], []
        for k, n in zip(key[1:], self.shape[1:], strict=True):
            if isinstance(k, (int, np.integer)):
                k = int(k) + n if k < 0 else int(k)
                if not 0 <= k < n:
                    raise IndexError(f"index {k} out of range for an axis of {n}")
                axes.append((k, k + 1, 1))
                squeeze.append(True)
            elif isinstance(k, slice):
                axes.append(k.indices(n))
                squeeze.append(False)
            else:
                raise TypeError(f"SourcePixels takes integers and slices, not {type(k).__name__}")
        (r0, r1, rs), (c0, c1, cs) = axes
        out = self._read(bands, r0, r1, rs, c0, c1, cs)
        if np.ndim(picked) == 0:
            out = out[0]
        drop = tuple(i - len(squeeze) for i, s in enumerate(squeeze) if s)
        return np.squeeze(out, axis=drop) if drop else out

    def _read(self, bands: list[int], r0: int, r1: int, rs: int, c0: int, c1: int, cs: int) -> np.ndarray:
        if rs < 0 or cs < 0:
            raise IndexError("SourcePixels does not take negative steps")
        ds = _dataset(self.path)
        if not bands or r1 <= r0 or c1 <= c0:
            return np.zeros((len(bands), max(0, -(-(r1 - r0) // rs)), max(0, -(-(c1 - c0) // cs))), self.dtype)
        if rs == 1 and cs == 1:
            return ds.read(bands, window=((r0, r1), (c0, c1)))
        row_bytes = (c1 - c0) * len(bands) * self.dtype.itemsize
        kept_per_read = max(1, _STRIDED_BYTES // max(1, row_bytes * rs))  # rows kept per read
        parts = []
        for top in range(r0, r1, kept_per_read * rs):  # whole multiples of the step keep the stride aligned
            if kept_per_read == 1:  # sparse rows: read just the kept one (GDAL caches the tiles it spans)
                parts.append(ds.read(bands, window=((top, top + 1), (c0, c1)))[:, :, ::cs])
            else:
                bottom = min(r1, top + kept_per_read * rs)
                parts.append(ds.read(bands, window=((top, bottom), (c0, c1)))[:, ::rs, ::cs])
        return np.concatenate(parts, axis=1)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)
