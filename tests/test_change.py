"""The change product between two periods: codes, matrices and areas recounted independently, on a real cluster."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
import xarray as xr
import zarr
from affine import Affine
from conftest import SCENE, write_tif
from distributed import get_task_stream
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

import segpipe
from segpipe.errors import InputError
from segpipe.geometry import SceneGeometry
from segpipe.io.result import NODATA, SEGMENT_STAGE, create_result
from segpipe.io.store import Marks
from segpipe.report.change import change_product, legend

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def periods(tmp_path_factory, client) -> tuple[str, str]:
    """Two real monthly runs of otsu: May on the sample scene, June on a copy where a block got brighter (real
    change) and a strip went to nodata (pixels valid in May only)."""
    root = tmp_path_factory.mktemp("periods")
    with rasterio.open(SCENE) as src:
        june = src.read()
    june[0, 100:400, 450:800] = np.minimum(june[0, 100:400, 450:800].astype(np.uint32) * 4, 6000).astype(np.uint16)
    june[0, 600:700, 50:650] = 0  # nodata (the scene's nodata value)
    june_tif = write_tif(root / "june.tif", june, nodata=0)
    may = segpipe.segment(str(SCENE), "otsu", tile_size=256, output=root / "period=2024-05", client=client,
                          progress=False)
    jun = segpipe.segment(str(june_tif), "otsu", tile_size=256, output=root / "period=2024-06", client=client,
                          progress=False)
    return may.attrs["result"], jun.attrs["result"]


def classes_of(path: str) -> np.ndarray:
    """A period's class map read back with plain xarray."""
    return xr.open_zarr(path)["class"].values


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.reader(path.read_text().splitlines()))
    return rows[0], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def hand_store(path: Path, classes: np.ndarray, names: list[str], crs: CRS | None, transform: Affine,
               chunk: int = 128) -> str:
    """A result store made by ``create_result`` (the pipeline's own layout) holding ``classes``."""
    h, w = classes.shape
    geometry = SceneGeometry("raster" if crs is not None else "slide", (h, w), transform, crs)
    group = create_result(str(path), {"made": path.name}, geometry, chunk, names)
    group["class"][:] = classes
    return str(path)


def test_codes_matrix_and_area_match_an_independent_recount_whatever_the_tile_size(periods, client, tmp_path):
    before, after = periods
    b, a = classes_of(before), classes_of(after)
    n = 2
    both = (b != NODATA) & (a != NODATA)
    expected = np.where(both, b.astype(np.int64) * n + a, NODATA)
    counts = np.bincount(expected[both], minlength=n * n).reshape(n, n)
    assert counts[0, 1] > 1000 and counts.trace() > 0  # the brightened block changed for real
    only_before = int(((b != NODATA) & (a == NODATA)).sum())
    assert only_before >= 100 * 600 - 10  # the strip blanked in June

    report = change_product(before, after, tmp_path / "512", client, tile_size=512)
    assert (report.before, report.after) == ("2024-05", "2024-06") and not report.resumed
    with rasterio.open(tmp_path / "512" / "transitions.tif") as ds, rasterio.open(SCENE) as src:
        assert ds.crs == src.crs and ds.transform == src.transform
        assert ds.dtypes == ("uint8",) and ds.nodata == NODATA and ds.descriptions == ("transition",)
        assert ds.tags()["class_names"] == ",".join(legend(["class0", "class1"]).values())
        np.testing.assert_array_equal(ds.read(1), expected)
    assert cog_validate(str(tmp_path / "512" / "transitions.tif"))[0]
    np.testing.assert_array_equal(report.pixels, counts)
    assert (report.only_before, report.only_after) == (only_before, int(((a != NODATA) & (b == NODATA)).sum()))
    header, matrix = read_csv(tmp_path / "512" / "transitions.csv")
    assert header == ["from\\to [pixels]", "class0", "class1"]
    np.testing.assert_array_equal(matrix, counts)
    np.testing.assert_array_equal(report.area_m2, counts * 0.25)  # 0.5 m pixels
    header, hectares = read_csv(tmp_path / "512" / "transitions_area.csv")
    assert header[0] == "from\\to [ha]"
    np.testing.assert_allclose(hectares, counts * 0.25 / 1e4, rtol=1e-9)
    summary = json.loads((tmp_path / "512" / "change.json").read_text())
    assert summary["pixels"] == counts.tolist() and summary["legend"]["1"] == "class0->class1"
    assert summary["changed_fraction"] == pytest.approx((counts.sum() - counts.trace()) / counts.sum())
    assert summary["totals_pixels"]["only_before"] == only_before
    assert summary["area"]["totals_m2"]["changed"] == pytest.approx((counts.sum() - counts.trace()) * 0.25)
    assert summary["grid"]["crs"] == "EPSG:32616" and summary["grid"]["pixel_m2"] == 0.25
    assert "| class0 |" in (tmp_path / "512" / "change.md").read_text()
    ds = xr.open_zarr(tmp_path / "512" / "change.zarr")  # placed like result.zarr
    assert ds["transition"].dtype == np.uint8 and ds["transition"].chunks[0][0] == 256
    assert ds["spatial_ref"].attrs["crs_wkt"] == xr.open_zarr(before)["spatial_ref"].attrs["crs_wkt"]

    again = change_product(before, after, tmp_path / "256", client, tile_size=256)
    np.testing.assert_array_equal(again.pixels, report.pixels)
    np.testing.assert_array_equal(again.area_m2, report.area_m2)
    small = np.asarray(zarr.open_array(str(tmp_path / "256" / "change.zarr"), path="transition", mode="r")[:])
    big = np.asarray(zarr.open_array(str(tmp_path / "512" / "change.zarr"), path="transition", mode="r")[:])
    assert small.tobytes() == big.tobytes()


def test_a_rerun_recomputes_nothing_until_a_period_changes(periods, client, tmp_path):
    before, after = periods
    dest = tmp_path / "change"
    first = change_product(before, after, dest, client)
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir() if p.is_file()}
    with get_task_stream(client) as ts:
        again = change_product(before, after, dest, client)
    assert again.resumed and not [t for t in ts.data if "tile_change" in t["key"]]
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir() if p.is_file()} == stamps
    np.testing.assert_array_equal(again.pixels, first.pixels)
    assert again.area_m2.tolist() == first.area_m2.tolist() and again.changed_fraction == first.changed_fraction
    # June's run gets another tile done (a mark appears): its completion state changed, so the product is redone.
    marks = Marks(after, SEGMENT_STAGE)
    marks.mark("9_9")
    try:
        with get_task_stream(client) as ts:
            redone = change_product(before, after, dest, client)
    finally:
        marks.unmark(["9_9"])
    assert not redone.resumed and len([t for t in ts.data if "tile_change" in t["key"]]) == 4  # 900² in 512² tiles
    assert (dest / "change.json").stat().st_mtime_ns > stamps["change.json"]


def test_geographic_area_is_summed_per_row_on_the_ellipsoid(tmp_path, client):
    """EPSG:4326 at 60° N: cells shrink northwards, so each row has its own area (pyproj Geod)."""
    with rasterio.open(SCENE) as src:
        img = src.read(1)[:300, :200]
    transform = Affine(0.001, 0, 10.0, 0, -0.001, 60.3)
    later = img.copy()
    later[:150, :100] = np.minimum(later[:150, :100].astype(np.uint32) * 4, 6000).astype(np.uint16)
    runs = [segpipe.segment(x, "otsu", tile_size=128, crs="EPSG:4326", transform=transform, nodata=0,
                            output=tmp_path / name, client=client, progress=False)
            for x, name in ((img, "period=2024-01"), (later, "period=2024-02"))]
    before, after = (r.attrs["result"] for r in runs)
    report = change_product(before, after, tmp_path / "change", client, tile_size=128)
    b, a = classes_of(before), classes_of(after)
    geod = pyproj.Geod(ellps="WGS84")
    rows = np.array([abs(geod.polygon_area_perimeter([10.0, 10.001, 10.001, 10.0],
                                                     [60.3 - 0.001 * r, 60.3 - 0.001 * r,
                                                      60.3 - 0.001 * (r + 1), 60.3 - 0.001 * (r + 1)])[0])
                     for r in range(300)])
    assert rows[-1] > rows[0] * 1.002  # a cell 0.3° further south is bigger
    both = (b != NODATA) & (a != NODATA)
    codes = np.where(both, b.astype(np.int64) * 2 + a, 0)
    expected = np.zeros(4)
    for r in range(300):
        expected += np.bincount(codes[r][both[r]], minlength=4) * rows[r]
    np.testing.assert_allclose(report.area_m2.ravel(), expected, rtol=1e-9)
    assert report.pixels[0, 1] > 0 and report.grid["area_method"] == "geodesic"
    header, hectares = read_csv(tmp_path / "change" / "transitions_area.csv")
    np.testing.assert_allclose(hectares.ravel(), expected / 1e4, rtol=1e-8)


def test_a_grid_in_pixels_gets_pixel_counts_only_and_many_classes_get_uint16_codes(tmp_path, client):
    rng = np.random.default_rng(0)
    names = [f"c{k}" for k in range(17)]
    b = rng.integers(0, 17, (300, 260), dtype=np.uint8)
    a = b.copy()
    a[100:200] = rng.integers(0, 17, (100, 260), dtype=np.uint8)
    b[:10] = NODATA
    before = hand_store(tmp_path / "b.zarr", b, names, None, Affine.identity())
    after = hand_store(tmp_path / "a.zarr", a, names, None, Affine.identity())
    report = change_product(before, after, tmp_path / "change", client, tile_size=128)
    assert report.area_m2 is None and not (tmp_path / "change" / "transitions_area.csv").exists()
    both = (b != NODATA) & (a != NODATA)
    expected = np.where(both, b.astype(np.int64) * 17 + a, 65535)
    with rasterio.open(tmp_path / "change" / "transitions.tif") as ds:
        assert ds.crs is None and ds.dtypes == ("uint16",) and ds.nodata == 65535
        np.testing.assert_array_equal(ds.read(1), expected)
    np.testing.assert_array_equal(report.pixels.ravel(), np.bincount(expected[both], minlength=17 * 17))
    assert json.loads((tmp_path / "change" / "change.json").read_text())["area"] is None


def test_other_grids_classes_or_tile_sizes_are_refused_in_one_line_before_anything_is_written(periods, client,
                                                                                          tmp_path):
    before, _ = periods
    with rasterio.open(SCENE) as src:
        transform = src.transform
    zeros = np.zeros((900, 900), np.uint8)
    other_crs = hand_store(tmp_path / "period=2024-06" / "result.zarr", zeros, ["class0", "class1"],
                           CRS.from_epsg(32615), transform)
    shifted = hand_store(tmp_path / "shifted.zarr", zeros, ["class0", "class1"], CRS.from_epsg(32616),
                         transform @ Affine.translation(3, 0))
    renamed = hand_store(tmp_path / "renamed.zarr", zeros, ["water", "land"], CRS.from_epsg(32616), transform)
    dest = tmp_path / "change"
    cases = [(other_crs, 512, "periods 2024-05 and 2024-06 lie on different grids (crs EPSG:32616 vs EPSG:32615); "
                              "fix crs/resolution/bounds in the job so every period shares one grid"),
             (shifted, 512, "origin (733601, 3725139) vs (733602.5, 3725139)"),
             (renamed, 512, "have different classes (['class0', 'class1'] vs ['water', 'land'])"),
             (renamed.replace("renamed", "missing"), 512, "no result store"),
             (before, 384, "tile_size 384 must be a multiple of the class map's chunk 256")]
    for other, tile_size, words in cases:
        with pytest.raises(InputError) as err:
            change_product(before, other, dest, client, tile_size=tile_size)
        assert words in str(err.value) and "\n" not in str(err.value)
        assert not dest.exists()
