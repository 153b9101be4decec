"""The same otsu job with no machinery at all, as a child process: read the GeoTIFF, threshold, write the COG.

Run as a whole process like ``segpipe run`` (interpreter start and imports included), so the two are
compared on the same footing; ``bench_cheap`` also times :func:`whole_file` inside its own, already
warm, process. Usage: ``python whole_file_otsu.py SCENE.tif OUT.tif``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from skimage.filters import threshold_otsu


def whole_file(src: str | Path, dest: str | Path) -> None:
    """Read the whole scene, threshold it at the scene's Otsu level (1024 bins), write a deflate COG."""
    dest = Path(dest)
    with rasterio.open(src) as ds:
        g = ds.read(1).astype(np.float32)
        profile = ds.profile
    cls = (g > threshold_otsu(g, nbins=1024)).astype(np.uint8)
    profile.update(dtype="uint8", nodata=255, count=1)
    staging = dest.with_suffix(".staging.tif")
    with rasterio.open(staging, "w", **profile) as out:
        out.write(cls, 1)
    rasterio.shutil.copy(staging, dest, driver="COG", compress="DEFLATE", overview_resampling="NEAREST",
                         blocksize=512)
    staging.unlink()


if __name__ == "__main__":
    whole_file(sys.argv[1], sys.argv[2])
