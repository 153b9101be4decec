"""odc-stac vs stackstac (issue 13): the same STAC items loaded onto the same grid, side by side.

Why: segpipe's mosaic loads its items with odc-stac (segpipe/io/mosaic.py); this is the measurement behind
that choice. The items are derived from the real SpaceNet sample, as in tests/stac_catalogs.py but larger: a
``size``² mosaic of the sample (benchmarks/common.mosaic_scene) cut into four overlapping ``item``² items, two
of them reprojected (bilinear) to the neighbouring UTM zone (EPSG:32615), all as COGs with STAC metadata. Both
loaders read all four items (one time slice each) onto the source's grid (EPSG:32616, 0.5 m, nearest, uint16,
fill 0), as dask arrays of 1024² chunks computed by the threaded scheduler with 2 threads; alternated, repeated.

Pixels are compared too: odc-stac against stackstac (the same item on the same grid), and odc-stac's whole-grid
load against odc-stac loading the grid block by block (512² blocks, as segpipe's mosaic computes them): the
module note of segpipe/io/mosaic.py says a window's pixels depend on the window, which is why segpipe fixes
its blocks.

stackstac is not a dependency of segpipe (it pins pandas < 3, this environment has pandas 3): install it apart,
e.g. ``pip install --no-deps --target /tmp/stackstac stackstac`` and run with ``PYTHONPATH=/tmp/stackstac``.
Without it the stackstac contender is skipped and says so. stackstac reads ``proj:epsg`` (projection v1) only,
so its copies of the items get ``proj:epsg`` beside ``proj:code``; nothing else differs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from common import ROOT, alternate, load_average, median_spread, mosaic_scene
from rasterio.warp import Resampling

sys.path.insert(0, str(ROOT / "tests"))

import stac_catalogs as sc  # noqa: E402 - the test fixtures' builders, plain functions

CRS = "EPSG:32616"
OTHER_ZONE = "EPSG:32615"
RES = 0.5
CHUNK = 1024
THREADS = 2
BLOCK = 512


def make_items(folder: Path, size: int, item: int) -> list[Any]:
    """Four overlapping ``item``² items of a ``size``² derived scene; the off-diagonal ones in the other zone."""
    scene = mosaic_scene(folder / "scene.tif", size)
    with rasterio.open(scene) as src:
        image, transform = src.read(1), src.transform
    step = size - item
    layout = [("a", 0, 0, CRS), ("b", 0, step, OTHER_ZONE), ("c", step, 0, OTHER_ZONE), ("d", step, step, CRS)]
    items = []
    for k, (name, row, col, crs) in enumerate(layout):
        crop = image[row:row + item, col:col + item]
        crop_transform = transform @ Affine.translation(col, row)
        pan, t = crop, crop_transform
        if crs != CRS:
            warped, t = sc._warp(crop[None], crop_transform, CRS, crs, RES, 0, Resampling.bilinear)
            pan = warped[0]
        when = sc.dt.datetime(2024, 6, 3 + 7 * k, 10, 30, tzinfo=sc.dt.UTC)
        it = sc._item(f"bench-{name}", when, crs, t, pan.shape, sc._footprint(crop_transform, crop.shape, CRS), 0.0,
                      f"Derived: rows {row}-{row + item}, cols {col}-{col + item} of a {size}² mosaic of SpaceNet.")
        sc._add_asset(it, "pan", sc.write_cog(folder / name / "pan.tif", pan, crs, t, 0), "uint16", 0, "pan",
                      ["data"])
        items.append(it)
    return items


def grid(size: int) -> tuple[Affine, tuple[int, int], tuple[float, float, float, float]]:
    """The source's grid: transform, shape and bounds (west, south, east, north)."""
    with rasterio.open(sc.SPACENET) as src:
        t = src.transform
    west, north = t.c, t.f
    return Affine(RES, 0, west, 0, -RES, north), (size, size), (west, north - size * RES, west + size * RES, north)


def odc_load(items: list[Any], transform: Affine, shape: tuple[int, int], chunks: dict | None) -> np.ndarray:
    """odc-stac onto the grid: (item, y, x), one time slice per item."""
    import dask
    import odc.stac
    from odc.geo.geobox import GeoBox

    ds = odc.stac.load(items, bands=["pan"], geobox=GeoBox(shape, transform, CRS), groupby="id",
                       preserve_original_order=True, resampling="nearest", dtype="uint16", nodata=0, chunks=chunks,
                       fail_on_error=True)
    with dask.config.set(scheduler="threads", num_workers=THREADS):
        return np.asarray(ds["pan"].values)


def stackstac_items(items: list[Any]) -> list[dict]:
    """The items as dicts with ``proj:epsg`` (stackstac's only CRS field) beside ``proj:code``."""
    out = []
    for it in items:
        d = it.to_dict(include_self_link=False, transform_hrefs=False)
        d["properties"]["proj:epsg"] = int(d["properties"]["proj:code"].split(":")[1])
        out.append(d)
    return out


def stackstac_load(items: list[dict], bounds: tuple[float, float, float, float]) -> np.ndarray:
    """stackstac onto the same grid: (item, y, x), in the given order (no sorting by date)."""
    import dask
    import stackstac

    arr = stackstac.stack(items, assets=["pan"], epsg=int(CRS.split(":")[1]), resolution=RES, bounds=bounds,
                          snap_bounds=False, resampling=Resampling.nearest, chunksize=CHUNK,
                          dtype=np.dtype("uint16"), fill_value=np.uint16(0), rescale=False, sortby_date=False)
    with dask.config.set(scheduler="threads", num_workers=THREADS):
        return np.asarray(arr.values)[:, 0]


def blockwise(items: list[Any], transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """odc-stac block by block (fixed 512² blocks of the grid), each block its own load, as segpipe does."""
    out = np.zeros((len(items), *shape), np.uint16)
    for r0 in range(0, shape[0], BLOCK):
        for c0 in range(0, shape[1], BLOCK):
            h, w = min(BLOCK, shape[0] - r0), min(BLOCK, shape[1] - c0)
            out[:, r0:r0 + h, c0:c0 + w] = odc_load(items, transform @ Affine.translation(c0, r0), (h, w), None)
    return out


def timed(fn: Any) -> Any:
    """A contender: seconds of one call, its result kept for the pixel comparison."""
    def go() -> dict:
        t0 = time.perf_counter()
        pixels = fn()
        return {"seconds": time.perf_counter() - t0, "pixels": pixels}
    return go


def differences(a: np.ndarray, b: np.ndarray) -> dict:
    """Differing pixels over all and over those valid (not 0) in both; per item too."""
    both = (a != 0) & (b != 0)
    return {"differ": int((a != b).sum()), "differ_valid_in_both": int(((a != b) & both).sum()),
            "valid_in_one_only": int(((a != 0) != (b != 0)).sum()), "pixels": int(a.size),
            "per_item": [int((x != y).sum()) for x, y in zip(a, b, strict=True)]}


def run(size: int = 4096, item: int = 2560, reps: int = 5) -> dict:
    try:
        import stackstac  # noqa: F401 - only whether it is importable
        has_stackstac = True
    except ImportError:
        has_stackstac = False
        print("bench_stac_loaders: stackstac is not importable, skipped (pip install --no-deps --target "
              "/tmp/stackstac stackstac; run with PYTHONPATH=/tmp/stackstac)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        items = make_items(Path(tmp), size, item)
        transform, shape, bounds = grid(size)
        contenders = {"odc-stac": timed(lambda: odc_load(items, transform, shape, {"x": CHUNK, "y": CHUNK}))}
        if has_stackstac:
            plain = stackstac_items(items)
            contenders["stackstac"] = timed(lambda: stackstac_load(plain, bounds))
        for fn in contenders.values():  # warm up (imports, GDAL's caches), not counted
            fn()
        load = load_average()
        res = alternate(contenders, reps)
        blocks = blockwise(items, transform, shape)
    out: dict[str, Any] = {"size": size, "item": item, "reps": reps, "load": load, "has_stackstac": has_stackstac,
                           "chunk": CHUNK, "threads": THREADS}
    for name, rs in res.items():
        out[name] = {"seconds": [r["seconds"] for r in rs], "mpx_s": [len(items) * size * size / r["seconds"] / 1e6
                                                                       for r in rs]}
    odc = res["odc-stac"][0]["pixels"]
    out["odc_repeatable"] = all(np.array_equal(r["pixels"], odc) for r in res["odc-stac"])
    out["odc_vs_blocks"] = differences(odc, blocks)
    if has_stackstac:
        out["odc_vs_stackstac"] = differences(odc, res["stackstac"][0]["pixels"])
        out["stackstac_over_odc"] = [s / o for s, o in zip(out["stackstac"]["seconds"], out["odc-stac"]["seconds"],
                                                           strict=True)]
        out["stackstac_over_odc_median"] = median_spread(out["stackstac_over_odc"])[0]
    return out


if __name__ == "__main__":
    print(run())
