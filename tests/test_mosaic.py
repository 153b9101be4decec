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
    CROPS_DECOY,
    CROPS_SCORE_HOLE,
    LANDSAT_CLOUD_ITEM,
    SCORE_NODATA,
    SPACENET,
    SPACENET_BROKEN,
    SPACENET_TRUNCATED,
    StaticCatalog,
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
                                                                                      tmp_path, capsys):
    src = spacenet_input(spacenet_catalog.collection)
    runs = {}
    for tile in (256, 512):
        runs[tile] = segpipe.segment(src, "otsu", tile_size=tile, truth=str(BUILDINGS), output=tmp_path / str(tile),
                                     client=client, progress=tile == 512)  # the stage lines of one run
    a, b = runs[256], runs[512]
    np.testing.assert_array_equal(a["class"].values, b["class"].values)  # tiling never changes the answer
    scenes = [zarr.open_group(str(tmp_path / str(t) / "scene.zarr"), mode="r") for t in (256, 512)]
    np.testing.assert_array_equal(scenes[0]["image"][:], scenes[1]["image"][:])

    # The broken items (missing, garbage, truncated: its header opens, its pixels do not) are left out and
    # reported; the run went on with A-D.
    summary = b.segpipe.summary
    assert {s["id"] for s in summary["mosaic"]["skipped"]} == set(SPACENET_BROKEN)
    assert summary["mosaic"]["items"] == ["spacenet-d", "spacenet-c", "spacenet-b", "spacenet-a"]  # newest first
    record = json.loads((tmp_path / "512" / "mosaic.json").read_text())
    assert [i["id"] for i in record["items"]] == summary["mosaic"]["items"]
    assert record["skipped"] == summary["mosaic"]["skipped"] and all(s["reason"] for s in record["skipped"])
    truncated = next(s["reason"] for s in record["skipped"] if s["id"] == SPACENET_TRUNCATED[0])
    assert truncated.startswith("asset 'pan' is not readable") and "TIFFReadEncodedTile" in truncated
    err = capsys.readouterr().err
    assert f"segpipe: item {SPACENET_TRUNCATED[0]} left out: {truncated}" in err
    assert b.attrs["mean_iou"] > 0

    # Per-tile metrics: each tiling's tiles sum to its global counts, and both tilings score the same.
    for run, tile in ((a, 256), (b, 512)):
        tiles, total = run.segpipe.tiles, run.segpipe.summary["summary"]
        cm = np.asarray(total["confusion_matrix"])
        assert tiles["pixels"].sum() == total["pixels"] == cm.sum()
        correct = (tiles["accuracy"] * tiles["pixels"]).sum()  # accuracies are written to 6 decimals
        assert abs(correct - np.trace(cm)) <= 5e-7 * tiles["pixels"].sum() + 1e-6
        classified = run["class"].values != 255  # the truth covers the scene: every classified pixel is scored
        for row in tiles.itertuples():
            assert row.pixels == classified[row.row0:row.row0 + row.height, row.col0:row.col0 + row.width].sum()
            assert row.height <= tile and row.width <= tile
    assert len(a.segpipe.tiles) > len(b.segpipe.tiles) > 1
    assert a.segpipe.summary["summary"] == b.segpipe.summary["summary"] | {"tiles": len(a.segpipe.tiles)}

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
    assert {k for k, _ in api.skipped} == set(SPACENET_BROKEN)
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
    # Not a method fitted per scene (its classes would change meaning month to month): fixed thresholds.
    assert job.method.name == "hsv" and job.method.params["scale"] == 10000


# --- composites against numpy, on exact crops (tests/stac_catalogs.py: crop_items) ------------------------------

def crops_input(catalog: StaticCatalog, **extra) -> dict:
    """The exact crops onto the source's own grid (EPSG:32616, 0.5 m), the decoy's collection filtered out."""
    return {"stac": str(catalog.collection), "collections": ["crops"], "assets": ["pan"], "crs": "EPSG:32616",
            "resolution": 0.5, **extra}


def mosaic_pixels(m) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - a resolved Mosaic
    """The whole mosaic's first band and validity, block by block as the readers load it."""
    data, ok = np.empty(m.shape, m.dtype), np.empty(m.shape, bool)
    for r0 in range(0, m.shape[0], BLOCK):
        for c0 in range(0, m.shape[1], BLOCK):
            h, w = min(BLOCK, m.shape[0] - r0), min(BLOCK, m.shape[1] - c0)
            block, valid = load_block(m, r0, c0, h, w)
            data[r0:r0 + h, c0:c0 + w], ok[r0:r0 + h, c0:c0 + w] = block[0], valid
    return data, ok


def on_grid(path: str, m, fill: float) -> np.ndarray:  # noqa: ANN001 - a resolved Mosaic
    """An exact crop's raster placed on the mosaic's grid (same CRS and pixel size), ``fill`` outside it."""
    out = np.full(m.shape, fill, np.float64)
    with rasterio.open(path) as ds:
        values, t = ds.read(1).astype(np.float64), ds.transform
        if ds.nodata is not None:
            values[values == ds.nodata] = fill
    row, col = round((m.transform[5] - t.f) / 0.5), round((t.c - m.transform[2]) / 0.5)  # crop's origin on grid
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + values.shape[0], m.shape[0]), min(col + values.shape[1], m.shape[1])
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = values[r0 - row:r1 - row, c0 - col:c1 - col]
    return out


def crop_layers(catalog: StaticCatalog, m, order: list[str]) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Pan (0 outside) and score (NaN outside, where nodata, for the unrated crop) of ``order``'s crops."""
    pans, scores = [], []
    for item_id in order:
        assets = catalog.item(item_id).assets
        pans.append(on_grid(assets["pan"].href, m, 0))
        scores.append(on_grid(assets["score"].href, m, np.nan) if "score" in assets else np.full(m.shape, np.nan))
    return np.stack(pans), np.stack(scores)


def first_valid(pans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first item's pixel, in order, among those whose pan is valid (not 0)."""
    out, filled = np.zeros(pans.shape[1:]), np.zeros(pans.shape[1:], bool)
    for pan in pans:
        take = ~filled & (pan != 0)
        out[take], filled = pan[take], filled | take
    return out, filled


NEWEST = ["crop-d", "crop-m", "crop-a"]  # by date (CROPS_LAYOUT)


@pytest.mark.parametrize(("order", "expected"), [("newest", NEWEST), ("oldest", ["crop-a", "crop-m", "crop-d"]),
                                                 ("least-cloud", ["crop-m", "crop-d", "crop-a"])])
def test_first_takes_the_first_valid_pixel_in_item_order(crops_catalog, order, expected):
    m = resolve_mosaic(MosaicSpec(**crops_input(crops_catalog, order=order)))
    assert [i.id for i in m.items] == expected and m.shape == (900, 900)
    want, filled = first_valid(crop_layers(crops_catalog, m, expected)[0])
    data, ok = mosaic_pixels(m)
    np.testing.assert_array_equal(ok, filled)
    np.testing.assert_array_equal(data, want)
    assert len(np.unique(data[300:600, 300:600] // 10000)) == 1  # the three-way overlap: one item, the first


def test_the_collections_filter_leaves_the_other_collections_items_out(crops_catalog):
    kept = resolve_mosaic(MosaicSpec(**crops_input(crops_catalog)))
    every = resolve_mosaic(MosaicSpec(**{**crops_input(crops_catalog), "collections": None}))
    assert [i.id for i in kept.items] == NEWEST
    assert [i.id for i in every.items] == [CROPS_DECOY[0], *NEWEST]  # in the catalog, and newest: it would win
    only = resolve_mosaic(MosaicSpec(**{**crops_input(crops_catalog), "collections": ["decoy"]}))
    assert [i.id for i in only.items] == [CROPS_DECOY[0]]


@pytest.mark.parametrize("prefer", ["low", "high"])
def test_best_takes_the_best_rated_valid_pixel_then_unrated_ones(crops_catalog, prefer):
    m = resolve_mosaic(MosaicSpec(**crops_input(crops_catalog, composite="best",
                                                quality={"asset": "score", "prefer": prefer})))
    pans, scores = crop_layers(crops_catalog, m, NEWEST)
    # Independently, item by item: a valid pixel with a score beats one without, a better score a worse one;
    # an equal one does not replace (ties: the first in item order).
    sign = 1 if prefer == "low" else -1
    want, tier, best = np.zeros(m.shape), np.full(m.shape, 2), np.full(m.shape, np.inf)
    for pan, score in zip(pans, scores, strict=True):
        rated = ~np.isnan(score)
        t = np.where(pan != 0, np.where(rated, 0, 1), 2)
        q = np.where(rated, sign * score, 0)
        better = (t < tier) | ((t == tier) & (q < best))
        want[better], tier[better], best[better] = pan[better], t[better], q[better]
    data, ok = mosaic_pixels(m)
    np.testing.assert_array_equal(ok, tier < 2)
    np.testing.assert_array_equal(data, want)
    # The unrated crop (M) and the pixels of D without a score never win where a rated item is valid.
    from_m = (data // 10000) == 2
    assert from_m.any() and not (from_m & ~np.isnan(scores).all(axis=0)).any()
    r0, r1, c0, c1 = CROPS_SCORE_HOLE
    hole = (slice(r0, r1), slice(c0, c1))  # D's hole lies in A's and M's area: A is rated there
    assert (data[hole] // 10000 == 1).all()
    assert SCORE_NODATA not in scores


def test_median_is_the_median_of_the_valid_pixels_rounded_half_to_even(crops_catalog):
    m = resolve_mosaic(MosaicSpec(**crops_input(crops_catalog, composite="median",
                                                quality={"asset": "score", "invalid": [3]})))
    pans, scores = crop_layers(crops_catalog, m, NEWEST)
    valid = (pans != 0) & (scores != 3)  # NaN (unrated, outside) is not 3: M's pixels are all valid
    stacked = np.ma.masked_array(pans, mask=~valid)
    want = np.ma.median(stacked, axis=0)
    count = valid.sum(axis=0)
    data, ok = mosaic_pixels(m)
    np.testing.assert_array_equal(ok, count > 0)
    np.testing.assert_array_equal(data[count > 0], np.rint(want.filled(0)[count > 0]))
    assert (data[count == 0] == 0).all()
    halves = (count == 2) & (want.filled(0) % 1 == 0.5)
    assert halves.any() and (count == 3).any() and (count == 1).any()  # every case met, .5 included
    assert (data[halves] % 2 == 0).all()  # half to even


def test_an_aoi_polygon_bounds_the_grid_and_blanks_the_pixels_outside_it(crops_catalog, tmp_path):
    import shapely
    from rasterio.warp import transform_geom

    with rasterio.open(SPACENET) as src:
        t = src.transform
    x0, y0 = t.c, t.f  # the source's top-left corner
    utm = shapely.Polygon([(x0 + 40.23, y0 - 30.11), (x0 + 400.37, y0 - 60.42), (x0 + 300.81, y0 - 420.66),
                           (x0 + 60.52, y0 - 250.29)])
    aoi = tmp_path / "aoi.geojson"
    geom = transform_geom("EPSG:32616", "EPSG:4326", shapely.geometry.mapping(utm))
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": geom}]}))
    m = resolve_mosaic(MosaicSpec(**crops_input(crops_catalog, aoi=str(aoi))))
    west, south, east, north = shapely.bounds(utm)
    assert m.transform[:6] == pytest.approx((0.5, 0, np.floor(west / 0.5) * 0.5, 0, -0.5, np.ceil(north / 0.5) * 0.5))
    assert m.shape == (round(np.ceil(north / 0.5) - np.floor(south / 0.5)),
                       round(np.ceil(east / 0.5) - np.floor(west / 0.5)))
    data, ok = mosaic_pixels(m)
    rows, cols = np.mgrid[0:m.shape[0], 0:m.shape[1]]
    x, y = m.transform[2] + 0.5 * (cols + 0.5), m.transform[5] - 0.5 * (rows + 0.5)
    inside = shapely.contains_xy(utm, x, y)
    clear = shapely.distance(utm.boundary, shapely.points(x, y)) > 0.01  # off the edge: no rounding question
    want, filled = first_valid(crop_layers(crops_catalog, m, NEWEST)[0])
    assert (data[~inside & clear] == 0).all() and not ok[~inside & clear].any()
    np.testing.assert_array_equal(data[inside & clear], want[inside & clear])
    np.testing.assert_array_equal(ok[inside & clear], filled[inside & clear])  # inside, but no crop: nodata too
    assert (~inside).sum() > 1000 and filled[~inside].sum() > 1000  # pixels that only the aoi blanked


def test_an_explicit_raster_list_composites_in_list_order(crops_catalog):
    a, d = (crops_catalog.item(k).assets["pan"].href for k in ("crop-a", "crop-d"))
    for rasters, ids in (([d, a], ["pan", "pan-2"]), ([a, d], ["pan", "pan-2"])):
        m = resolve_mosaic(MosaicSpec(rasters=rasters))
        assert [i.id for i in m.items] == ids and m.shape == (900, 900) and m.bands == ("image",)
        order = ["crop-d", "crop-a"] if rasters[0] == d else ["crop-a", "crop-d"]
        want, filled = first_valid(crop_layers(crops_catalog, m, order)[0])
        data, ok = mosaic_pixels(m)
        np.testing.assert_array_equal(ok, filled)
        np.testing.assert_array_equal(data, want)
        assert (data[300:600, 300:600] // 10000 == (3 if rasters[0] == d else 1)).all()  # the list's first wins
