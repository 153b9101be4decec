"""COG export: the old serial export against the new one, on a large derived class map.

The class map is the SpaceNet sample thresholded by Otsu (2 classes, like an otsu run), mosaicked
with flips to ``size``² px, with one large nodata hole (the sample itself has none), in a result
store made by ``create_result`` (the pipeline's own layout and chunking). Each contender runs in its
own child process, so its peak RSS (VmHWM: Python, Zarr, GDAL's block cache and threads) is its own;
the child reports the RSS it had before exporting too, the fixed cost of the imports. Contenders
alternate from one repetition to the next so that a machine getting busier or quieter does not favour
one of them, and the load average is recorded at start and end (this VM is shared). Every output is
compared with the old one pixel for pixel, base and each overview level (``same_pixels_as_old``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "segpipe" / "sample" / "spacenet_pan.tif"
sys.path.insert(0, str(ROOT))


def build_result(path: Path, size: int, chunk: int = 512) -> str:
    """A result store holding the derived class map, written strip by strip as the workers would, chunk-aligned."""
    import rasterio
    from skimage.filters import threshold_otsu

    from segpipe.geometry import SceneGeometry
    from segpipe.io.result import NODATA, create_result

    with rasterio.open(SCENE) as src:
        a = src.read(1)
        crs, transform = src.crs, src.transform
    classes = (a > threshold_otsu(a[a > 0])).astype(np.uint8)
    classes[a == 0] = NODATA
    reps = -(-size // a.shape[1])
    row = np.concatenate([classes if k % 2 == 0 else classes[:, ::-1] for k in range(reps)], axis=1)[:, :size]
    grid = SceneGeometry("raster", (size, size), transform, crs)
    arr = create_result(str(path), {"bench_export": size}, grid, chunk, ["background", "building"])["class"]
    n = a.shape[0]
    for r0 in range(0, size, chunk):
        rows = np.arange(r0, min(size, r0 + chunk))
        i = np.where((rows // n) % 2 == 0, rows % n, n - 1 - rows % n)  # flipped every other mosaic row
        arr[r0:r0 + len(rows)] = row[i]
    arr[size // 3: size // 3 + size // 8, size // 5: size // 2] = NODATA  # a large nodata hole
    return str(path)


def old_export_cog(result_path: str, dest: str | Path, block: int = 512) -> Path:
    """BASELINE: the export as it was before (serial deflate staging, then GDAL's COG driver does the rest)."""
    import rasterio
    import rasterio.shutil
    import zarr

    from segpipe.geometry import read_geo
    from segpipe.io.cog import PALETTE
    from segpipe.io.result import NODATA
    from segpipe.tiling.grid import TileGrid

    group = zarr.open_group(result_path, mode="r")
    arr = group["class"]
    crs, transform = read_geo(dict(group.attrs))
    names = list(group.attrs.get("class_names", []))
    h, w = arr.shape
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.staging.tif")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    mpp = group.attrs.get("mpp")
    geo = {"crs": crs, "transform": transform} if crs is not None else {}
    profile = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": "uint8", **geo,
               "nodata": NODATA, "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate"}
    try:
        with rasterio.open(staging, "w", **profile) as ds:
            for tile in TileGrid((h, w), block):
                win = tile.core
                ds.write(np.asarray(arr[win.slices]), 1,
                         window=((win.row0, win.row1), (win.col0, win.col1)))
            ds.write_colormap(1, {i: PALETTE[i % len(PALETTE)] for i in range(max(1, len(names)))})
            ds.update_tags(class_names=",".join(names))
            if crs is None and mpp:
                ds.update_tags(TIFFTAG_XRESOLUTION=1e4 / mpp[0], TIFFTAG_YRESOLUTION=1e4 / mpp[1],
                               TIFFTAG_RESOLUTIONUNIT=3, mpp=f"{mpp[0]},{mpp[1]}")
            ds.set_band_description(1, "class")
        rasterio.shutil.copy(staging, tmp, driver="COG", compress="DEFLATE", overview_resampling="NEAREST",
                             blocksize=512)
        os.replace(tmp, dest)
    finally:
        for p in (staging, tmp):
            if p.exists():
                p.unlink()
    return dest


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over from the forked
    parent through exec, so a child would report the benchmark process's own size as its floor."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(name: str, result: str, dest: str, kwargs: dict[str, Any]) -> dict[str, float]:
    """Run one contender in this (fresh) process; its own time and peak RSS."""
    import rasterio  # noqa: F401 - imported before the baseline RSS, as in the pipeline's client

    from segpipe.io.cog import export_cog

    before = _peak_rss_mib()
    fn = old_export_cog if name == "old" else export_cog
    t0 = time.perf_counter()
    fn(result, dest, **kwargs)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "rss_before_mib": before}


def _run_child(name: str, result: str, dest: Path, kwargs: dict[str, Any]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", name, result, str(dest), json.dumps(kwargs)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _same_pixels(a: Path, b: Path) -> bool:
    """Base band and every overview level equal, compared a tile row at a time."""
    import rasterio

    with rasterio.open(a) as da, rasterio.open(b) as db:
        if da.shape != db.shape or da.overviews(1) != db.overviews(1):
            return False
        n = len(da.overviews(1))
    for level in [None, *range(n)]:
        kw = {} if level is None else {"overview_level": level}
        with rasterio.open(a, **kw) as da, rasterio.open(b, **kw) as db:
            for r0 in range(0, da.height, 512):
                win = ((r0, min(da.height, r0 + 512)), (0, da.width))
                if not np.array_equal(da.read(1, window=win), db.read(1, window=win)):
                    return False
    return True


# The new export at GDAL's default deflate level too, to tell what the new structure gains from what level 5 gains.
VARIANTS: dict[str, dict[str, Any]] = {"new_deflate6": {"level": 6}}


def run(size: int = 16384, reps: int = 3, variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Median (and min/max) seconds and peak RSS of each contender; ``variants`` are new-export settings to add."""
    contenders: dict[str, dict[str, Any]] = {"old": {}, "new": {}, **(VARIANTS if variants is None else variants)}
    res: dict[str, Any] = {"size": size, "pixels": size * size, "reps": reps, "cpus": os.cpu_count(),
                           "machine": f"{platform.node()} {platform.machine()}", "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = build_result(Path(tmp) / "result.zarr", size)
        res["build_seconds"] = time.perf_counter() - t0
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in contenders}
        names = list(contenders)
        for rep in range(reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                runs[name].append(_run_child(name, result, Path(tmp) / f"{name}.tif", contenders[name]))
        for name, rs in runs.items():
            secs = [r["seconds"] for r in rs]
            res[name] = {"kwargs": contenders[name], "median_s": statistics.median(secs), "min_s": min(secs),
                         "max_s": max(secs), "seconds": [round(s, 2) for s in secs],
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                         "rss_before_mib": max(r["rss_before_mib"] for r in rs),
                         "size_mib": (Path(tmp) / f"{name}.tif").stat().st_size / 2**20}
            if name != "old":
                res[name]["same_pixels_as_old"] = _same_pixels(Path(tmp) / "old.tif", Path(tmp) / f"{name}.tif")
                res[name]["speedup_vs_old"] = res["old"]["median_s"] / res[name]["median_s"]
    res["loadavg_end"] = os.getloadavg()
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))))
    else:
        print(json.dumps(run(), indent=1))
