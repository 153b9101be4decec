"""Mosaic inputs (issue 13): STAC searches and raster lists onto one grid, periods and change.

The catalogs are real STAC structures built from real rasters (tests/stac_catalogs.py): SpaceNet items in two
UTM zones with a cloud mask and two broken items, Landsat items with one asset per band over two months.
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import rioxarray  # noqa: F401 - ds.rio
import zarr
from stac_catalogs import (
    LANDSAT_CLOUD_ITEM,
    SPACENET,
    SPACENET_GARBAGE,
    SPACENET_MISSING,
    write_static_catalog,
)

import segpipe
from segpipe.config import MosaicSpec, job_from_dict
from segpipe.errors import InputError
from segpipe.io.mosaic import BLOCK, load_block, parse_datetime_range, resolve_mosaic
from segpipe.io.store import Marks
from segpipe.periods import period_label, plan_period, run_period

pytest_plugins = ["stac_catalogs"]

BUILDINGS = Path(__file__).resolve().parents[1] / "segpipe" / "sample" / "spacenet_buildings.geojson"


def spacenet_input(collection: str | Path, **extra) -> dict:
    """The SpaceNet items of June onto the source's grid (EPSG:32616, 0.5 m), clouds masked out."""
    return {"stac": str(collection), "collections": ["spacenet"], "assets": ["pan"], "datetime": "2024-06",
            "crs": "EPSG:32616", "resolution": 0.5, "quality": {"asset": "cloud", "invalid": [1]}, **extra}


def source_offset(transform: tuple[float, ...] | rasterio.Affine) -> tuple[int, int]:
    """Row and column of the SpaceNet source's origin on a mosaic grid (both on 0.5 m multiples)."""
    with rasterio.open(SPACENET) as src:
        t = src.transform
    return round((transform[5] - t.f) / 0.5), round((t.c - transform[2]) / 0.5)


def test_a_stac_mosaic_is_tile_invariant_masks_clouds_reports_broken_items_and_resumes(spacenet_catalog, client,
                                                                                      tmp_path):
    src = spacenet_input(spacenet_catalog.collection)
    runs = {}
    for tile in (256, 512):
        runs[tile] = segpipe.segment(src, "otsu", tile_size=tile, truth=str(BUILDINGS), output=tmp_path / str(tile),
                                     client=client, progress=False)
    a, b = runs[256], runs[512]
    np.testing.assert_array_equal(a["class"].values, b["class"].values)  # tiling never changes the answer
    scenes = [zarr.open_group(str(tmp_path / str(t) / "scene.zarr"), mode="r") for t in (256, 512)]
    np.testing.assert_array_equal(scenes[0]["image"][:], scenes[1]["image"][:])

    # The broken items are left out and reported; the run went on with A-D.
    summary = b.segpipe.summary
    assert {s["id"] for s in summary["mosaic"]["skipped"]} == {SPACENET_MISSING[0], SPACENET_GARBAGE[0]}
    assert summary["mosaic"]["items"] == ["spacenet-d", "spacenet-c", "spacenet-b", "spacenet-a"]  # newest first
    record = json.loads((tmp_path / "512" / "mosaic.json").read_text())
    assert [i["id"] for i in record["items"]] == summary["mosaic"]["items"]
    assert all(s["reason"] for s in record["skipped"])
    assert b.attrs["mean_iou"] > 0
    assert len(b.segpipe.tiles) > 1

    # Pixels: where only an exact crop covers the grid (A's corner; D outside its cloud) they are the source's;
    # where D is cloudy and no other item covers, nothing valid is left: nodata.
    with rasterio.open(SPACENET) as ds:
        source = ds.read(1)
    r, c = source_offset(tuple(b.rio.transform())[:6])
    image, valid = scenes[1]["image"][0], scenes[1]["valid"][:].astype(bool)
    np.testing.assert_array_equal(image[r:r + 290, c:c + 290], source[:290, :290])  # A only
    np.testing.assert_array_equal(image[r + 710:r + 900, c + 710:c + 900], source[710:, 710:])  # D, clear
    hole = (slice(r + 610, r + 690), slice(c + 610, c + 690))  # D's cloud, covered by no other item
    assert not valid[hole].any() and (b["class"].values[hole] == 255).all()
    assert valid[r + 450:r + 550, c + 450:c + 550].all()  # D's cloud where C and B cover: filled from them

    # Resume: a crash that lost two ingest rows and the result recomputes those rows only, to the same map.
    out = tmp_path / "512"
    marks = Marks(str(out / "scene.zarr"), "ingest")
    for key in ("0", "1"):
        (marks.dir / key).unlink()
    stamps = {k: (marks.dir / k).stat().st_mtime_ns for k in marks.keys()}
    shutil.rmtree(out / "result.zarr")
    again = segpipe.segment(src, "otsu", tile_size=512, truth=str(BUILDINGS), output=out, client=client,
                            progress=False)
    np.testing.assert_array_equal(again["class"].values, b["class"].values)
    assert {k for k in marks.keys() if (marks.dir / k).stat().st_mtime_ns != stamps.get(k)} == {"0", "1"}


def test_the_same_items_from_files_over_http_and_from_a_stac_api_make_the_same_mosaic(spacenet_catalog,
                                                                                       spacenet_http, spacenet_api):
    files = resolve_mosaic(MosaicSpec(**spacenet_input(spacenet_catalog.collection)))
    http = resolve_mosaic(MosaicSpec(**spacenet_input(spacenet_http)))
    api = resolve_mosaic(MosaicSpec(**spacenet_input(spacenet_api.url)))
    assert [i.id for i in files.items] == [i.id for i in http.items] == [i.id for i in api.items]
    assert {k for k, _ in api.skipped} == {SPACENET_MISSING[0], SPACENET_GARBAGE[0]}
    assert files.shape == http.shape == api.shape and files.transform == http.transform == api.transform
    assert all(i.stac["assets"]["pan"]["href"].startswith("http://127.0.0.1") for i in api.items)
    for r0 in range(0, files.shape[0], BLOCK):
        for c0 in range(0, files.shape[1], BLOCK):
            h, w = min(BLOCK, files.shape[0] - r0), min(BLOCK, files.shape[1] - c0)
            want = load_block(files, r0, c0, h, w)
            for other in (http, api):
                got = load_block(other, r0, c0, h, w)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
    # The search filters: an area over A only, and a cloud limit that leaves D (25 % cloud) out.
    with rasterio.open(SPACENET) as ds:
        from rasterio.warp import transform_bounds

        corner = transform_bounds(ds.crs, "EPSG:4326", ds.bounds.left + 5, ds.bounds.top - 60, ds.bounds.left + 60,
                                  ds.bounds.top - 5)
    for url in (spacenet_catalog.collection, spacenet_api.url):
        small = resolve_mosaic(MosaicSpec(**spacenet_input(url, bbox=list(corner))))
        assert [i.id for i in small.items] == ["spacenet-a"]
        assert all(110 <= n <= 120 for n in small.shape)  # the bbox, through degrees and back
        clear = resolve_mosaic(MosaicSpec(**spacenet_input(url, max_cloud=10)))
        assert "spacenet-d" not in [i.id for i in clear.items]


def test_a_raster_list_mosaics_onto_the_union_grid_with_the_source_pixels(spacenet_catalog, client, tmp_path):
    """Two exact crops (A and D) as plain rasters: their union is the source's grid, their pixels the source's."""
    pattern = str(spacenet_catalog.folder / "spacenet-[ad]" / "pan.tif")
    ds = segpipe.segment({"rasters": pattern}, "otsu", output=tmp_path / "out", client=client, progress=False)
    with rasterio.open(SPACENET) as src:
        source, transform = src.read(1), src.transform
    assert ds["class"].shape == source.shape and tuple(ds.rio.transform())[:6] == tuple(transform)[:6]
    scene = zarr.open_group(str(tmp_path / "out" / "scene.zarr"), mode="r")
    valid = scene["valid"][:].astype(bool)
    np.testing.assert_array_equal(scene["image"][0][valid], source[valid])
    assert not valid[650:, :250].any() and not valid[:250, 650:].any()  # covered by neither crop


def test_monthly_periods_write_a_series_with_change_and_skip_when_nothing_is_new(landsat_catalog, client, tmp_path):
    import shapely

    # A catalog of our own: a late item is added to it below.
    catalog = tmp_path / "catalog"
    shutil.copytree(landsat_catalog.folder, catalog)

    def here(item: pystac.Item) -> pystac.Item:
        item = item.clone()
        for asset in item.assets.values():
            asset.href = str(catalog / Path(asset.href).relative_to(landsat_catalog.folder))
        return item

    bounds = shapely.bounds(shapely.union_all([shapely.geometry.shape(i.geometry)
                                               for i in landsat_catalog.items])).tolist()
    job = job_from_dict({
        "input": {"stac": str(catalog / "collection.json"), "assets": ["B3", "B4", "B5"], "crs": "EPSG:32612",
                  "resolution": 30, "bbox": bounds, "composite": "median",
                  "quality": {"asset": "qa", "invalid": [1]}},
        "output": str(tmp_path / "landcover"), "tile_size": 256, "class_names": ["dark", "mid", "bright"],
        "method": {"name": "kmeans", "params": {"k": 3}}}, tmp_path)
    may = run_period(plan_period(job, "2024-05"), client)
    assert may.status == "done" and may.change is None and may.items == 2
    june = run_period(plan_period(job, "2024-06"), client)
    assert june.status == "done" and june.previous == "2024-05"
    folder = tmp_path / "landcover"
    for label in ("2024-05", "2024-06"):
        assert (folder / f"period={label}" / "segmentation.tif").is_file()
        assert (folder / f"period={label}" / "mosaic.json").is_file()
    change = folder / "period=2024-06" / "change"
    with rasterio.open(folder / "period=2024-05" / "segmentation.tif") as a, \
            rasterio.open(folder / "period=2024-06" / "segmentation.tif") as b, \
            rasterio.open(change / "transitions.tif") as t:
        before, after, codes = a.read(1), b.read(1), t.read(1)
        assert t.crs == b.crs == a.crs and t.transform == a.transform == b.transform
    both = (before != 255) & (after != 255)
    np.testing.assert_array_equal(codes[both], before[both] * 3 + after[both])  # independent recount
    counts = np.bincount(before[both] * 3 + after[both], minlength=9).reshape(3, 3)
    np.testing.assert_array_equal(june.change.pixels, counts)
    report = json.loads((change / "change.json").read_text())
    assert report["pixels"] == counts.tolist()
    np.testing.assert_allclose(np.asarray(report["area"]["m2"]), counts * 900.0)  # 30 m pixels
    classes = json.loads((folder / "period=2024-06" / "metrics" / "classes.json").read_text())["classes"]
    assert [r["pixels"] for r in classes] == np.bincount(after[after != 255], minlength=3).tolist()
    assert [r["hectares"] for r in classes] == pytest.approx((np.bincount(after[after != 255], minlength=3)
                                                              * 0.09).tolist())
    assert june.areas.pixels.tolist() == [r["pixels"] for r in classes]
    assert 0 < june.change.changed_fraction < 1  # the months differ (zones, items, the cloud): some pixels change

    # The same month again: nothing new, skipped without starting anything.
    assert plan_period(job, "2024-06").status == "unchanged"
    assert run_period(plan_period(job, "2024-06"), client).status == "unchanged"
    # A month with no items at all: nothing to do.
    assert plan_period(job, "2024-07").status == "empty"

    # A late item for June (a copy of May's east item, re-dated): the period is recomputed, the change too.
    late = here(landsat_catalog.item(LANDSAT_CLOUD_ITEM))
    late.id = "landsat-2024-06-late"
    late.datetime = late.datetime.replace(month=6, day=29)
    write_static_catalog([*map(here, landsat_catalog.items), late], catalog, "landsat")
    again = plan_period(job, "2024-06")
    assert again.status == "run" and again.recompute and again.items == 3
    redone = run_period(again, client)
    assert redone.status == "done" and redone.change is not None and not redone.change.resumed


def test_periods_and_datetimes_parse_as_months_and_ranges():
    assert period_label("last", today=date(2024, 7, 3)) == "2024-06"
    assert period_label("last", today=date(2025, 1, 1)) == "2024-12"
    assert period_label("2024-06") == "2024-06"
    with pytest.raises(InputError, match="not a month"):
        period_label("June")
    start, end = parse_datetime_range("2024-06")
    assert (start.isoformat(), end.isoformat()) == ("2024-06-01T00:00:00+00:00", "2024-07-01T00:00:00+00:00")
    start, end = parse_datetime_range("2024-06-01/2024-06-30")
    assert end.isoformat() == "2024-07-01T00:00:00+00:00"
    assert parse_datetime_range("../2024-06-30")[0] is None
    with pytest.raises(InputError, match="ends before"):
        parse_datetime_range("2024-06-30/2024-06-01")


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from segpipe.cli import main

    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    ({"stac": "http://127.0.0.1:9/catalog.json"}, "STAC source is not readable"),
    ({"datetime": "2023-01"}, "no items found"),
    ({"assets": ["B99"]}, "no item of STAC"),
    ({"composite": "best"}, "composite 'best' needs quality.asset and quality.prefer"),
    ({"rasters": "/nonexistent/*.tif", "stac": None}, "no rasters match"),
    ({"crs": "EPSG:4326", "resolution": None}, "give resolution too"),
    ({"aoi": "/nonexistent/aoi.geojson"}, "aoi vector is not readable"),
])
def test_bad_mosaic_inputs_are_one_line_and_write_nothing(spacenet_catalog, tmp_path, capsys, change, message):
    import yaml

    src = {**spacenet_input(spacenet_catalog.collection), **change}
    src = {k: v for k, v in src.items() if v is not None}
    if change.get("composite") == "best":
        src["quality"] = {"asset": "cloud"}
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(yaml.safe_dump({"input": src, "output": str(out), "method": {"name": "otsu"}}))
    for command in (["validate", str(job)], ["run", str(job)]):
        code, err = _cli(command, capsys)
        assert code == 2 and err.startswith("segpipe: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_period_run_needs_stac_items_with_dates(spacenet_catalog, tmp_path, capsys):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": {"rasters": str(spacenet_catalog.folder / "*/pan.tif")},
                                   "output": str(tmp_path / "out"), "method": {"name": "otsu"}}))
    code, err = _cli(["run", str(job), "--period", "2024-06"], capsys)
    assert code == 2 and "rasters have no dates" in err
    code, err = _cli(["validate", str(job), "--period", "06/2024"], capsys)
    assert code == 2 and "not a month" in err


def test_stac_items_keep_their_metadata_in_the_record(spacenet_catalog):
    m = resolve_mosaic(MosaicSpec(**spacenet_input(spacenet_catalog.collection)))
    assert [i.cloud for i in m.items][0] == pytest.approx(25.0)  # D, 25 % cloudy
    item = pystac.Item.from_dict(m.items[0].stac)
    assert Path(item.assets["pan"].href).is_absolute()


def test_the_cli_runs_a_period_and_says_when_there_is_nothing_new(landsat_catalog, tmp_path, capsys):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "input": {"stac": str(landsat_catalog.collection), "assets": ["B4"], "crs": "EPSG:32612", "resolution": 30},
        "output": str(tmp_path / "series"), "method": {"name": "otsu"}, "cluster": {"processes": "no"}}))
    from segpipe.cli import main

    assert main(["run", str(job), "--period", "2024-05", "-q"]) == 0
    out = capsys.readouterr().out
    assert "period:       2024-05 (done, 2 item(s))" in out and "period=2024-05/segmentation.tif" in out
    assert main(["run", str(job), "--period", "2024-05"]) == 0
    captured = capsys.readouterr()
    assert "(unchanged, 2 item(s))" in captured.out and "nothing new since its last run" in captured.err
    assert main(["validate", str(job), "--period", "2024-07"]) == 0
    assert "(empty)" in capsys.readouterr().out


def test_the_example_landcover_job_is_a_valid_stac_job():
    from segpipe.config import load_job

    job = load_job(Path(__file__).resolve().parents[1] / "examples" / "landcover.yaml")
    assert isinstance(job.input, MosaicSpec) and job.input.stac.startswith("https://")
    assert job.input.quality.asset == "scl" and job.input.composite == "median"
