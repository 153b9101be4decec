"""The ingested scene: a read-only view of the scene Zarr store used by every later stage.

Stages pass the store *path* around (cheap to send to workers); each process opens its own
handle through :class:`Scene`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zarr
from affine import Affine
from rasterio.crs import CRS

from segpipe.geometry import Box, SceneGeometry
from segpipe.io.source_pixels import SourcePixels


@dataclass(frozen=True)
class Scene:
    """Handle on ``scene.zarr``: ``image`` (band, [z,] y, x) and ``valid`` ([z,] y, x).

    ``image`` is read from the source itself when ingest chose to read it in place.
    """

    path: str

    @cached_property
    def group(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r")

    @cached_property
    def image(self) -> zarr.Array | SourcePixels:
        """The pixels: the store's ``image`` array, or the source GeoTIFF read in place (same indexing)."""
        if self.group.attrs.get("pixels") == "source":
            return SourcePixels.from_attrs(dict(self.group.attrs))
        return self.group["image"]  # opened once: every open re-reads the array's metadata

    @cached_property
    def valid(self) -> zarr.Array:
        return self.group["valid"]

    @property
    def count(self) -> int:
        return int(self.image.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (the image array without its band axis)."""
        return tuple(int(n) for n in self.image.shape[1:])

    @property
    def height(self) -> int:
        return int(self.image.shape[-2])

    @property
    def width(self) -> int:
        return int(self.image.shape[-1])

    @property
    def kind(self) -> str:
        """"raster", "slide" or "volume"."""
        return self.geometry.kind

    @cached_property
    def geometry(self) -> SceneGeometry:
        """Shape, placement and units of the scene grid, as ingest recorded them."""
        return SceneGeometry.of_attrs(self.shape, dict(self.group.attrs))

    @property
    def chunk(self) -> int:
        return int(self.image.chunks[1])

    @property
    def crs(self) -> CRS | None:
        return self.geometry.crs

    @property
    def transform(self) -> Affine:
        return self.geometry.transform

    def read(self, window: Box, dtype: np.dtype | type | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Pixels/voxels (float32 unless ``dtype`` says otherwise; None: as stored), band-first, and validity
        (bool) of ``window``."""
        img = np.asarray(self.image[(slice(None), *window.slices)], dtype=dtype)
        return img, self.valid_in(window.slices)

    def valid_in(self, where: tuple[slice, ...]) -> np.ndarray:
        """Validity (bool, read-only) of a window; nothing is read when ingest found every pixel valid.

        Most scenes are valid everywhere, and on small tiles reading the (unwritten) validity chunks cost
        as much as the method itself.
        """
        if self.group.attrs.get("all_valid"):  # a read-only view that takes no memory
            shape = tuple(len(range(*s.indices(n))) for s, n in zip(where, self.shape, strict=False))
            return np.broadcast_to(np.True_, shape)
        return np.asarray(self.valid[where]) > 0
