"""A mosaic keeps its items' own pixel grid (issue 25, part 1).

The rasters are derived from the real SpaceNet scene (segpipe/sample/spacenet_pan.tif, 0.5 m, edges on 0.5 m
multiples): two overlapping crops whose transforms are shifted by half a pixel in x and y, so that their pixel
edges lie at 0.25 m offsets, as many real collections are gridded (a 30 m Landsat grid with edges at 15 m). On
the old default grid (edges on multiples of the resolution) every pixel of such a mosaic was resampled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import SCENE
from helpers import class_map, run

from segpipe.config import MosaicSpec
from segpipe.io.mosaic import BLOCK, load_block, resolve_mosaic

pytest_plugins = ["stac_catalogs"]

CROPS = {"a": (0, 0, 300, 400), "b": (150, 200, 450, 600)}  # rows r0:r1, cols c0:c1 of the source: they overlap


@pytest.fixture(scope="module")
def shifted(tmp_path_factory) -> tuple[dict[str, Path], np.ndarray]:
    """The two crops, half a pixel off the source's grid, and the source pixels (band 1)."""
    folder = tmp_path_factory.mktemp("shifted")
    with rasterio.open(SCENE) as src:
        data, t, profile = src.read(1), src.transform, src.profile
    paths = {}
    for name, (r0, c0, r1, c1) in CROPS.items():
        paths[name] = folder / f"{name}.tif"
        profile.update(height=r1 - r0, width=c1 - c0, transform=t * Affine.translation(c0 + 0.5, r0 + 0.5),
                       tiled=True, blockxsize=128, blockysize=128)
        with rasterio.open(paths[name], "w", **profile) as dst:
            dst.write(data[r0:r1, c0:c1], 1)
    return paths, data


def _pixels(m) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - a resolved Mosaic
    """The whole mosaic as loaded for ingest, block by block (band 1) and its validity."""
    h, w = m.shape
    out, ok = np.zeros((h, w), m.dtype), np.zeros((h, w), bool)
    for r0 in range(0, h, BLOCK):
        for c0 in range(0, w, BLOCK):
            bh, bw = min(BLOCK, h - r0), min(BLOCK, w - c0)
            d, v = load_block(m, r0, c0, bh, bw)
            out[r0:r0 + bh, c0:c0 + bw], ok[r0:r0 + bh, c0:c0 + bw] = d[0], v
    return out, ok


@pytest.mark.parametrize("resampling", ["nearest", "bilinear"])
def test_items_on_a_half_pixel_grid_are_copied_never_resampled(shifted, resampling):
    paths, data = shifted
    m = resolve_mosaic(MosaicSpec(rasters=[str(paths["a"]), str(paths["b"])], resampling=resampling))
    a = rasterio.open(paths["a"]).transform
    assert m.anchor == "native" and m.resampled == ()
    assert m.affine == a and m.shape == (450, 600)  # the union of both crops, on their own grid
    out, ok = _pixels(m)
    expected = data[:450, :600]  # pixel (r, c) of the grid is source pixel (r, c): both crops come from it
    inside = np.zeros((450, 600), bool)
    for r0, c0, r1, c1 in CROPS.values():
        inside[r0:r1, c0:c1] = True
    assert np.array_equal(ok, inside & (expected != 0))  # 0 is the source's nodata
    assert np.array_equal(out[ok], expected[ok])  # every pixel equals the source pixel it came from


def test_the_edge_anchor_reproduces_the_old_grid_and_names_the_resampled_items(shifted):
    paths, _ = shifted
    m = resolve_mosaic(MosaicSpec(rasters=[str(paths["a"]), str(paths["b"])], anchor="edge"))
    west, north = rasterio.open(paths["a"]).transform.c, rasterio.open(paths["a"]).transform.f
    east = rasterio.open(paths["b"]).bounds.right
    south = rasterio.open(paths["b"]).bounds.bottom
    x0, y1 = math.floor(west / 0.5) * 0.5, math.ceil(north / 0.5) * 0.5  # multiples of the resolution
    assert (m.affine.c, m.affine.f, m.affine.a, m.affine.e) == (x0, y1, 0.5, -0.5)
    assert m.shape == (round((y1 - math.floor(south / 0.5) * 0.5) / 0.5), round((math.ceil(east / 0.5) * 0.5 - x0)
                                                                                 / 0.5)) == (451, 601)
    assert [k for k, _ in m.resampled] == ["a", "b"]
    assert all("+0.500, +0.500 px off the grid's" in why or "-0.500" in why for _, why in m.resampled)
    centre = resolve_mosaic(MosaicSpec(rasters=[str(paths["a"])], anchor="center"))
    assert centre.resampled == () and centre.affine == rasterio.open(paths["a"]).transform
    assert resolve_mosaic(MosaicSpec(rasters=[str(paths["a"])], anchor=(0.25, 0.75))).resampled[0][0] == "a"


def test_one_raster_through_the_mosaic_path_gives_the_same_class_map_as_the_raster(shifted, client, tmp_path):
    paths, _ = shifted
    direct = run(client, tmp_path / "direct", input=str(paths["a"]), tile_size=128, method={"name": "otsu"})
    mosaic = run(client, tmp_path / "mosaic", input={"rasters": [str(paths["a"])]}, tile_size=128,
                 method={"name": "otsu"})
    assert np.array_equal(class_map(direct), class_map(mosaic))
    summary = json.loads((tmp_path / "mosaic" / "metrics" / "summary.json").read_text())
    assert summary["mosaic"]["anchor"] == "native" and summary["mosaic"]["resampled"] == []
    assert summary["mosaic"]["transform"] == list(rasterio.open(paths["a"]).transform)[:6]


def test_a_mosaic_of_items_on_two_grids_anchors_on_the_first_and_says_which_were_resampled(shifted, client,
                                                                                         tmp_path):
    paths, _ = shifted
    with rasterio.open(SCENE) as src:
        on_source_grid = src.transform
    run(client, tmp_path / "o", input={"rasters": [str(paths["a"]), str(SCENE)]}, tile_size=256,
        method={"name": "otsu"})
    summary = json.loads((tmp_path / "o" / "metrics" / "summary.json").read_text())["mosaic"]
    a, t = rasterio.open(paths["a"]).transform, summary["transform"]
    assert ((t[2] - a.c) / 0.5, (t[5] - a.f) / 0.5) == (-1.0, 1.0)  # the first item's lattice, covering both
    assert [r["id"] for r in summary["resampled"]] == ["spacenet_pan"] and on_source_grid.c % 0.5 == 0
    assert "px off the grid's" in summary["resampled"][0]["reason"]


def test_a_period_whose_items_would_move_the_grid_is_put_on_the_series_grid(landsat_catalog, tmp_path):
    """A series' periods stay on one lattice, whatever their items' own grid: here the series' grid (recorded by
    an earlier finished period) lies half a pixel off this month's items."""
    import shapely

    from segpipe.config import job_from_dict
    from segpipe.periods import MARK, period_folder, plan_period

    bounds = shapely.bounds(shapely.union_all([shapely.geometry.shape(i.geometry)
                                               for i in landsat_catalog.items])).tolist()
    job = job_from_dict({"input": {"stac": str(landsat_catalog.collection), "assets": ["B3", "B4", "B5"],
                                   "crs": "EPSG:32612", "resolution": 30, "bbox": bounds},
                         "output": str(tmp_path / "landcover"), "tile_size": 256, "method": {"name": "otsu"}},
                        Path.cwd())
    alone = plan_period(job, "2024-05")
    t = alone.checked.info.transform
    assert alone.note is None and alone.checked.info.mosaic.resampled == ()

    def series(transform: Affine) -> None:
        mark = period_folder(job.output, "2024-04") / MARK
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps({"period": "2024-04", "grid": {"crs": alone.checked.info.crs.to_wkt(),
                                                                   "transform": list(transform)[:6]}}))

    series(t * Affine.translation(-3, 2))  # the same lattice, elsewhere: nothing to say
    same = plan_period(job, "2024-05")
    assert same.note is None and same.checked.info.transform == t
    series(t * Affine.translation(0.5, 0.5))  # half a pixel off this month's items
    moved = plan_period(job, "2024-05")
    m = moved.checked.info.transform
    assert "put on the series' grid" in moved.note and "px off the grid's" in moved.note
    off = ((m.c - t.c) / 30 % 1, (m.f - t.f) / 30 % 1)
    assert off == pytest.approx((0.5, 0.5), abs=1e-9)
    assert {k for k, _ in moved.checked.info.mosaic.resampled} == {i.id for i in moved.checked.info.mosaic.items}
