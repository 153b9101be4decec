"""Every run of an image with a CRS writes a STAC Item (``item.json``) beside its outputs; a land-cover series and
an archive write a STAC Collection over theirs.

Checked on a real run (fuzzy c-means with its probabilities, building truth and instances on the bundled SpaceNet
scene) by independent
readers: stac-validator, offline, against core STAC and every extension the Item declares (:mod:`stac_check`);
rasterio for the COG's grid and palette; hashlib for the checksums; shapely and rasterio's reprojection for the
footprint. A fake secret in the environment must not appear in the Item.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import rasterio
import shapely
from conftest import BUILDINGS, SCENE
from helpers import run
from rasterio.warp import transform_geom
from stac_check import validate

pytest_plugins = ["stac_catalogs"]  # the Landsat catalog the land-cover series is made from

SECRET = "s3cr3t-do-not-publish-7f2c"


@pytest.fixture(scope="module")
def stac_run(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("stac") / "demo-run"
    with mock.patch.dict(os.environ, {"SEGPIPE_FAKE_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET}):
        o = run(client, out, input=str(SCENE), tile_size=256, method={"name": "fcm", "params": {"c": 2}},
                probabilities=True, truth={"path": str(BUILDINGS)}, class_names=["background", "building"],
                instances={"classes": [1]})
    return out, o, json.loads((out / "item.json").read_text())


def test_the_item_validates_offline_against_core_and_every_extension_it_declares(stac_run):
    out, o, item = stac_run
    assert o.item == out / "item.json"
    declared = {u.split("/")[3] for u in item["stac_extensions"]}
    assert declared == {"projection", "raster", "classification", "file"}
    valid, messages = validate(out / "item.json")
    assert valid, messages
    used = {Path(s).name for m in messages for s in m["schema"]}
    assert {"item.json", "projection-v2.0.0.json", "raster-v1.1.0.json", "classification-v2.0.0.json",
            "file-v2.1.0.json"} <= used, used


def test_the_validator_really_applies_the_extensions_schemas(stac_run, tmp_path):
    """A broken field of each extension fails: the local schemas are used, not skipped."""
    _, _, item = stac_run
    for key, value in (("proj:shape", [900]), ("proj:code", 32616)):
        bad = json.loads(json.dumps(item))
        bad["properties"][key] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        assert not validate(tmp_path / "bad.json")[0], key
    bad = json.loads(json.dumps(item))
    bad["assets"]["segmentation"]["file:checksum"] = "not hex"
    bad["assets"]["segmentation"]["raster:bands"][0]["classification:classes"][0]["color_hint"] = "#000000"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert not validate(tmp_path / "bad.json")[0]


def test_projection_fields_match_the_cog(stac_run):
    out, _, item = stac_run
    p = item["properties"]
    with rasterio.open(out / "segmentation.tif") as cog:
        assert p["proj:code"] == f"EPSG:{cog.crs.to_epsg()}" == "EPSG:32616"
        assert p["proj:shape"] == [cog.height, cog.width]
        assert p["proj:transform"] == pytest.approx(list(cog.transform)[:6])
        assert p["proj:bbox"] == pytest.approx(list(cog.bounds))
        band = item["assets"]["segmentation"]["raster:bands"][0]
        assert band["data_type"] == cog.dtypes[0] and band["nodata"] == cog.nodata
        assert band["spatial_resolution"] == pytest.approx(cog.res[0])
        palette = cog.colormap(1)
    classes = {c["value"]: c for c in band["classification:classes"]}
    assert [classes[v]["title"] for v in (0, 1)] == ["background", "building"]
    assert classes[1]["color_hint"] == "{:02X}{:02X}{:02X}".format(*palette[1][:3])
    assert classes[255]["nodata"] is True


def test_every_file_asset_has_its_size_and_sha256_multihash(stac_run):
    out, _, item = stac_run
    assets = item["assets"]
    assert {"segmentation", "probabilities", "result", "summary", "report", "objects"} <= set(assets)
    with rasterio.open(out / "probabilities.tif") as probabilities:
        bands = assets["probabilities"]["raster:bands"]
        assert len(bands) == probabilities.count == 3  # two classes and the confidence
        assert all(b["scale"] == pytest.approx(1 / 254) and b["nodata"] == probabilities.nodata for b in bands)
    assert assets["result"]["type"] == "application/vnd+zarr" and "file:checksum" not in assets["result"]
    assert assets["segmentation"]["roles"] == ["data"] and assets["objects"]["href"] == "./objects.gpkg"
    files = 0
    for key, asset in assets.items():
        assert not Path(asset["href"]).is_absolute() and "://" not in asset["href"], asset["href"]
        path = out / asset["href"]
        assert path.exists(), key
        if path.is_file():
            files += 1
            data = path.read_bytes()
            assert asset["file:size"] == len(data)
            assert asset["file:checksum"] == "1220" + hashlib.sha256(data).hexdigest()
    assert files >= 5


@pytest.mark.parametrize("fmt,media", [("parquet", "application/vnd.apache.parquet"),
                                       ("gpkg", "application/geopackage+sqlite3"),
                                       ("fgb", "application/vnd.flatgeobuf")])
def test_class_polygons_are_data_assets_with_their_media_type(tmp_path, fmt, media):
    """The ``polygons`` export's file, in whichever format the job asked for, as the Item lists it."""
    from datetime import UTC, datetime

    import pystac

    from segpipe.report.stac_item import add_asset

    path = tmp_path / f"class_polygons.{fmt}"
    path.write_bytes(b"polygons")
    item = pystac.Item("run", None, None, datetime.now(UTC), {})
    add_asset(item, tmp_path, path)
    asset = item.assets["class-polygons"].to_dict()
    assert asset["type"] == media and asset["roles"] == ["data"] and asset["file:size"] == 8


def test_geometry_contains_the_scenes_footprint_and_bbox_bounds_it(stac_run):
    _, _, item = stac_run
    with rasterio.open(SCENE) as src:
        scene = shapely.segmentize(shapely.box(*src.bounds), max_segment_length=10.0)  # metres: a dense edge
        lonlat = shapely.geometry.shape(transform_geom(src.crs, "EPSG:4326", shapely.geometry.mapping(scene)))
    geometry = shapely.geometry.shape(item["geometry"])
    assert geometry.is_valid and len(geometry.exterior.coords) > 5  # densified, not the four corners
    assert geometry.buffer(1e-9).contains(lonlat)
    assert lonlat.area == pytest.approx(geometry.area, rel=1e-4)
    west, south, east, north = item["bbox"]
    assert shapely.box(west, south, east, north).buffer(1e-9).contains(geometry)


def test_settings_scores_and_times_are_properties_and_nothing_secret(stac_run):
    out, _, item = stac_run
    p = item["properties"]
    summary = json.loads((out / "metrics" / "summary.json").read_text())["summary"]
    assert p["segpipe:method"] == "fcm" and p["segpipe:tile_size"] == 256 and p["segpipe:params"] == {"c": 2}
    assert p["segpipe:source"] == SCENE.name and p["segpipe:classes"] == ["background", "building"]
    assert p["segpipe:global_mean_iou"] == summary["global_mean_iou"]
    assert p["segpipe:global_iou"] == summary["global_iou"]
    assert p["created"] and p["datetime"]
    assert not [k for k in p if k.startswith("segpipe:cluster")]
    text = (out / "item.json").read_text()
    assert SECRET not in text and "AWS_" not in text


def test_a_volume_gets_no_item(client, tmp_path):
    """A volume (like a slide) has no place on Earth: no Item, and the run is otherwise the same."""
    from medical import write_nifti

    data = np.zeros((64, 64, 64), np.int16)
    data[16:48, 16:48, 16:48] = 100
    src = write_nifti(tmp_path / "cube.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    o = run(client, tmp_path / "out", input=str(src), tile_size=64, method={"name": "otsu"})
    assert o.item is None and not (tmp_path / "out" / "item.json").exists()
    assert (tmp_path / "out" / "segmentation.nii.gz").is_file()


# --- collections: a land-cover series and an archive ------------------------------------------------------------


def test_a_land_cover_series_is_a_collection_of_periods_that_odc_stac_loads_back_exactly(landsat_catalog, client,
                                                                                          tmp_path):
    import odc.stac
    import pystac
    import shapely

    from segpipe.config import job_from_dict
    from segpipe.periods import plan_period, run_period

    bounds = shapely.bounds(shapely.union_all([shapely.geometry.shape(i.geometry)
                                               for i in landsat_catalog.items])).tolist()
    job = job_from_dict({
        "input": {"stac": str(landsat_catalog.folder / "collection.json"), "assets": ["B3", "B4", "B5"],
                  "crs": "EPSG:32612", "resolution": 30, "bbox": bounds, "composite": "median"},
        "output": str(tmp_path / "landcover"), "tile_size": 256, "class_names": ["dark", "mid", "bright"],
        "method": {"name": "kmeans", "params": {"k": 3}}}, tmp_path)
    for label in ("2024-05", "2024-06"):
        assert run_period(plan_period(job, label), client).status == "done"
    root = tmp_path / "landcover"
    valid, messages = validate(root / "collection.json", recursive=True)
    assert valid, messages
    assert sorted(m["asset_type"] for m in messages) == ["COLLECTION", "ITEM", "ITEM"]

    collection = pystac.Collection.from_file(str(root / "collection.json"))
    items = sorted(collection.get_items(), key=lambda i: i.id)
    assert [i.id for i in items] == ["period-2024-05", "period-2024-06"]
    may, june = (json.loads((root / f"period={m}" / "item.json").read_text()) for m in ("2024-05", "2024-06"))
    assert "change" not in may["assets"] and june["assets"]["change"]["href"] == "./change/transitions.tif"
    assert june["assets"]["change"]["raster:bands"][0]["classification:classes"][1]["title"] == "dark->mid"
    assert {"classes", "mosaic"} <= set(june["assets"])
    assert may["links"][0]["href"] == "../collection.json"  # relative: the folder moves as it is

    loaded = odc.stac.load(items, bands=["segmentation"], groupby="id", chunks={})
    assert loaded.sizes["time"] == 2
    for i, item in enumerate(sorted(items, key=lambda it: it.datetime or it.common_metadata.start_datetime)):
        folder = root / f"period={item.id.split('-', 1)[1]}"
        with rasterio.open(folder / "segmentation.tif") as cog:
            np.testing.assert_array_equal(loaded["segmentation"].isel(time=i).values, cog.read(1))
            assert loaded.odc.geobox.affine == cog.transform


def test_an_archive_run_writes_a_collection_of_its_items(tmp_path):
    from test_archive_items import crops_archive

    from segpipe.archive_run import run_archive

    folder, template = crops_archive(tmp_path, 2, 256, 200, {"n_workers": 1, "processes": "no"})
    rows = run_archive(str(folder), str(template), str(tmp_path / "out"), in_flight=2)
    assert [r.status for r in rows] == ["done", "done"]
    valid, messages = validate(tmp_path / "out" / "collection.json", recursive=True)
    assert valid, messages
    doc = json.loads((tmp_path / "out" / "collection.json").read_text())
    assert [ln["href"] for ln in doc["links"] if ln["rel"] == "item"] == ["./s0/item.json", "./s1/item.json"]
    west, _, east, _ = doc["extent"]["spatial"]["bbox"][0]
    for name in ("s0", "s1"):
        item = json.loads((tmp_path / "out" / name / "item.json").read_text())
        assert item["collection"] == doc["id"] and west <= item["bbox"][0] and item["bbox"][2] <= east
