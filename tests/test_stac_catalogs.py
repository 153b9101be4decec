"""The STAC test fixtures (tests/stac_catalogs.py) are what they claim: real rasters, files and HTTP alike,
ranges served, the broken assets broken, a STAC API that searches by date and place."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from pystac_client import Client
from rasterio.errors import RasterioIOError
from stac_catalogs import (
    CLOUD,
    MASK_NODATA,
    SPACENET,
    SPACENET_BROKEN,
    SPACENET_CLOUD,
    SPACENET_TRUNCATED,
    StacApi,
    StaticCatalog,
    serve_folder,
)

pytest_plugins = ["stac_catalogs"]

GOOD = ["spacenet-a", "spacenet-b", "spacenet-c", "spacenet-d"]


def _read(href: str, window=None) -> np.ndarray:  # noqa: ANN001
    path = f"/vsicurl/{href}" if href.startswith("http") else href
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(path) as ds:
        return ds.read(1, window=window)


def test_items_hold_the_real_pixels_and_metadata_matches_the_files(spacenet_catalog: StaticCatalog,
                                                                   landsat_catalog: StaticCatalog) -> None:
    with rasterio.open(SPACENET) as src:
        original = src.read(1)
    a, d = spacenet_catalog.item("spacenet-a"), spacenet_catalog.item("spacenet-d")
    assert np.array_equal(_read(a.assets["pan"].href), original[:600, :600])  # exact crops
    assert np.array_equal(_read(d.assets["pan"].href), original[300:, 300:])
    cloud = _read(d.assets["cloud"].href)
    r0, r1, c0, c1 = SPACENET_CLOUD
    assert (cloud[r0 - 300:r1 - 300, c0 - 300:c1 - 300] == CLOUD).all() and (cloud == CLOUD).mean() == 0.25
    assert d.properties["eo:cloud_cover"] == 25.0
    for item in [*spacenet_catalog.items[:4], *landsat_catalog.items]:
        for key, asset in item.assets.items():
            with rasterio.open(asset.href) as ds:
                assert ds.crs.to_string() == item.properties["proj:code"], (item.id, key)
                assert list(ds.shape) == item.properties["proj:shape"]
                assert list(ds.transform)[:6] == pytest.approx(item.properties["proj:transform"])
                assert ds.nodata == asset.extra_fields["raster:bands"][0]["nodata"]
    b = spacenet_catalog.item("spacenet-b")
    pan, cloud = _read(b.assets["pan"].href), _read(b.assets["cloud"].href)
    assert b.properties["proj:code"] == "EPSG:32615" and 0 < (pan == 0).mean() < 0.2  # rotated: nodata corners
    assert np.array_equal(pan == 0, cloud == MASK_NODATA)
    codes = {item.id: item.properties["proj:code"] for item in landsat_catalog.items}
    assert sorted(codes.values()) == ["EPSG:32611", "EPSG:32612", "EPSG:32612", "EPSG:32612"]
    assert all(set(item.assets) == {"B1", "B2", "B3", "B4", "B5", "B6", "B7", "qa"} for item in landsat_catalog.items)
    assert sum(item.properties["eo:cloud_cover"] > 0 for item in landsat_catalog.items) == 1


def test_the_catalog_reads_by_path_and_by_url_with_absolute_asset_hrefs(spacenet_catalog: StaticCatalog,
                                                                         spacenet_http: str) -> None:
    by_path = pystac.Collection.from_file(str(spacenet_catalog.collection))
    by_url = pystac.Collection.from_file(spacenet_http)
    base = spacenet_http.rsplit("/", 1)[0]
    for coll, root in ((by_path, str(spacenet_catalog.folder)), (by_url, base)):
        items = sorted(coll.get_items(), key=lambda item: item.id)
        assert [item.id for item in items] == [*GOOD, *SPACENET_BROKEN]
        for item in items:
            href = item.assets["pan"].get_absolute_href()
            assert href == f"{root}/{item.id}/pan.tif"
    raw = (spacenet_catalog.folder / "spacenet-a" / "spacenet-a.json").read_text()
    assert '"href": "./pan.tif"' in raw and str(spacenet_catalog.folder) not in raw  # relative on disk


def test_assets_are_read_over_http_by_ranges(spacenet_catalog: StaticCatalog, spacenet_http: str) -> None:
    item = next(i for i in pystac.Collection.from_file(spacenet_http).get_items() if i.id == "spacenet-d")
    href = item.assets["pan"].get_absolute_href()
    request = urllib.request.Request(href, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(request) as r:
        body = r.read()
        assert r.status == 206 and r.headers["Content-Range"].startswith("bytes 100-199/")
    assert body == (spacenet_catalog.folder / "spacenet-d" / "pan.tif").read_bytes()[100:200]
    with urllib.request.urlopen(urllib.request.Request(href, method="HEAD")) as r:
        assert r.headers["Accept-Ranges"] == "bytes" and int(r.headers["Content-Length"]) > 0
    with rasterio.open(SPACENET) as src:
        original = src.read(1, window=((300 + 256, 300 + 300), (300, 600)))
    assert np.array_equal(_read(href, window=((256, 300), (0, 300))), original)
    log: list = []
    with serve_folder(spacenet_catalog.folder, log) as base:  # a fresh URL: nothing in GDAL's cache
        assert np.array_equal(_read(f"{base}/spacenet-d/pan.tif", window=((256, 300), (0, 300))), original)
    gets = [(rng, status) for method, path, rng, status in log if method == "GET" and path.endswith("pan.tif")]
    assert gets and all(rng and status == 206 for rng, status in gets), log  # /vsicurl/ read by ranges only


@pytest.mark.parametrize("item_id", ["spacenet-e", "spacenet-f"])
def test_the_missing_and_the_garbage_asset_fail_to_open(spacenet_catalog: StaticCatalog, spacenet_http: str,
                                                         item_id: str) -> None:
    path = spacenet_catalog.item(item_id).assets["pan"].href
    base = spacenet_http.rsplit("/", 1)[0]
    for href in (path, f"{base}/{item_id}/pan.tif"):
        with pytest.raises(RasterioIOError):
            _read(href)
    assert _read(spacenet_catalog.item(item_id).assets["cloud"].href).shape == (600, 600)  # the rest is fine


def test_the_truncated_asset_opens_and_reads_decimated_but_its_full_resolution_tiles_fail(
        spacenet_catalog: StaticCatalog, spacenet_http: str) -> None:
    cut = Path(spacenet_catalog.item(SPACENET_TRUNCATED[0]).assets["pan"].href)
    whole = Path(spacenet_catalog.item("spacenet-a").assets["pan"].href)
    assert whole.read_bytes().startswith(cut.read_bytes()) and cut.stat().st_size < whole.stat().st_size
    base = spacenet_http.rsplit("/", 1)[0]
    for href in (str(cut), f"{base}/{SPACENET_TRUNCATED[0]}/pan.tif"):
        path = f"/vsicurl/{href}" if href.startswith("http") else href
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(path) as ds:
            assert ds.shape == (600, 600) and ds.overviews(1)  # the header is intact
            assert ds.read(1, out_shape=(150, 150)).any()  # served from the overviews, stored before the cut
            assert ds.read(1, window=((0, 256), (0, 256))).any()  # the first tile lies before the cut too
            with pytest.raises(RasterioIOError):
                ds.read(1)


def test_the_api_searches_by_date_and_place(spacenet_api: StacApi) -> None:
    client = Client.open(spacenet_api.url)

    def ids(**search) -> list[str]:  # noqa: ANN003
        return sorted(item.id for item in client.search(collections=[spacenet_api.collection_id], **search).items())

    assert ids(datetime="2024-06") == [*GOOD, *SPACENET_BROKEN]
    assert ids(datetime="2024-06-01/2024-06-15") == ["spacenet-a", "spacenet-b"]
    assert ids(datetime="2024-07") == []
    assert ids(bbox=[-84.4813, 33.6401, -84.4811, 33.6403]) == ["spacenet-a", *SPACENET_BROKEN]
    assert ids(bbox=[-84.4813, 33.6401, -84.4811, 33.6403], datetime="2024-06-01/2024-06-26") == ["spacenet-a"]
    assert ids(datetime="2024-06", limit=2) == ids(datetime="2024-06")  # pages followed
    found = next(client.search(ids=["spacenet-b"]).items())
    assert found.assets["pan"].href.startswith(spacenet_api.assets_url)
    assert _read(found.assets["pan"].href).shape == tuple(found.properties["proj:shape"])


def test_the_landsat_files_are_real_cogs(landsat_catalog: StaticCatalog) -> None:
    item = landsat_catalog.items[0]
    with rasterio.open(item.assets["B4"].href) as ds:
        assert ds.profile["blockxsize"] == 256 and ds.overviews(1) and ds.compression.name.lower() == "deflate"
    assert Path(landsat_catalog.collection).name == "collection.json"
