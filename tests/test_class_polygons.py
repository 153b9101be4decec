"""The ``polygons`` export (class polygons as GeoParquet 1.1, GeoPackage or FlatGeobuf), checked by independent
readers: GDAL's own whole-scene polygonize (rasterio ``shapes``) as the reference, GeoPandas and pyogrio reading
the files back, rasterio rasterising the polygons onto the grid, and geoparquet-validator judging the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import zarr
from affine import Affine
from helpers import assert_one_line_error, class_map, run
from rasterio.features import rasterize, shapes
from scipy import ndimage

from segpipe.io.exports import polygons as poly
from segpipe.io.result import NODATA

OTSU = {"name": "otsu"}


def _out(outcome) -> Path:
    return Path(outcome.result).parent


def _reference(classes: np.ndarray) -> list[tuple[int, bytes]]:
    """The whole scene polygonized at once, in pixel coordinates: what the export must equal."""
    return sorted((int(v), shapely.normalize(shapely.geometry.shape(g)).wkb)
                  for g, v in shapes(classes, mask=classes != NODATA, connectivity=4))


def _normal(regions) -> list[tuple[int, bytes]]:
    return sorted((int(c), shapely.normalize(g).wkb) for c, g, _ in regions)


def _to_pixels(geoms, transform: Affine) -> list:
    """CRS polygons back to pixel coordinates, which must land on integers (pixel corners)."""
    inv = ~transform

    def back(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        px = np.column_stack([inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f])
        assert np.abs(px - np.round(px)).max() < 1e-6
        return np.round(px)

    return [shapely.transform(g, back) for g in geoms]


@pytest.fixture(scope="module")
def runs(client, tmp_path_factory, big_scene):
    """One otsu job on the 2100 x 2300 mosaic (nodata holes, scene-spanning classes) at tile sizes 256 and 1024."""
    out = {}
    for tile, names in ((256, ["cog", "polygons"]), (1024, ["polygons"])):
        folder = tmp_path_factory.mktemp(f"poly{tile}")
        out[tile] = run(client, folder, input=str(big_scene), tile_size=tile, method=OTSU, exports=names)
    return out


def test_polygons_equal_one_whole_scene_polygonize_for_any_tile_size(runs):
    import geopandas as gpd

    classes = class_map(runs[256])
    assert np.array_equal(classes, class_map(runs[1024]))
    ref = _reference(classes)
    with rasterio.open(_out(runs[256]) / "segmentation.tif") as cog:
        transform = cog.transform
    got = {}
    for tile, outcome in runs.items():
        df = gpd.read_parquet(_out(outcome) / "class_polygons.parquet")
        assert list(df.columns) == ["class_id", "class_name", "area", "pixels", "cut", "geometry"]  # bbox: covering
        assert not df.cut.any()  # no region near the 2^22 corners that would cut it
        got[tile] = sorted(shapely.normalize(g).wkb for g in df.geometry)
        pixel_geoms = _to_pixels(list(df.geometry), transform)
        assert sorted(zip(df.class_id.tolist(), [shapely.normalize(g).wkb for g in pixel_geoms], strict=True)) == ref
    assert got[256] == got[1024]  # in CRS coordinates, byte for byte
    holes = sum(len(shapely.geometry.shape(g).interiors) for g, _ in shapes(classes, mask=classes != NODATA,
                                                                             connectivity=4))
    assert holes > 0


def test_geopandas_reads_crs_areas_and_names(runs):
    import geopandas as gpd

    out = _out(runs[256])
    df = gpd.read_parquet(out / "class_polygons.parquet")
    with rasterio.open(out / "segmentation.tif") as cog:
        crs, transform, shape = cog.crs, cog.transform, cog.shape
    assert df.crs == crs  # pyproj's CRS against rasterio's
    assert df.crs.to_epsg() == crs.to_epsg() and crs.to_epsg() is not None
    pixel_area = abs(transform.a * transform.e)
    assert np.array_equal(df.area.to_numpy(), df.pixels.to_numpy() * pixel_area)
    np.testing.assert_allclose(df.geometry.area.to_numpy(), df.area.to_numpy(), rtol=1e-9)
    names = zarr.open_group(runs[256].result, mode="r").attrs["class_names"]
    assert set(df.class_id) == {0, 1}
    assert dict(zip(df.class_id, df.class_name, strict=True)) == dict(enumerate(names))
    assert set(df.geometry.geom_type) == {"Polygon"} and df.geometry.is_valid.all()
    assert any(len(g.interiors) for g in df.geometry)  # holes kept, where classes enclose others
    assert int(df.pixels.sum()) == int((class_map(runs[256]) != NODATA).sum())
    # rasterised back onto the grid, the polygons are the class map (nodata where none)
    burnt = rasterize(zip(df.geometry, df.class_id.astype(int), strict=True), out_shape=shape, transform=transform,
                      fill=NODATA, dtype="uint8")
    assert np.array_equal(burnt, class_map(runs[256]))


def test_geoparquet_metadata_validates(runs):
    import json

    import geoparquet_validator as gpv
    import pyarrow.parquet as pq

    path = _out(runs[256]) / "class_polygons.parquet"
    report = gpv.check(str(path))
    assert gpv.conformant(report, "core") and not gpv.failed(report), report
    assert not any(o["status"] == "fail" for o in report["outcomes"])
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["geometry_types"] == ["Polygon"]


def test_band_merge_is_exact_for_any_band_height_and_workers(client, tmp_path):
    """Random class maps with noise (diagonal-only contacts, holes touching outer rings at a corner, regions
    spanning every band), merged from bands of 1 to 64 rows, in process and on 2 workers."""
    rng = np.random.default_rng(7)
    for trial in range(6):
        h, w = rng.integers(20, 70, 2)
        a = (ndimage.zoom(rng.random((h // 3 + 2, w // 3 + 2)), 3, order=0)[:h, :w] * (2 + trial % 3)).astype(np.uint8)
        a[rng.random((h, w)) < 0.05] = NODATA
        a[rng.random((h, w)) < 0.1] = trial % 2
        a[:, 0] = 1  # a class region along the whole left edge: one polygon touching every band
        path = str(tmp_path / f"r{trial}.zarr")
        zarr.open_group(path, mode="w").create_array("class", shape=a.shape, chunks=(8, 8), dtype="uint8")[:] = a
        ref = _reference(a)
        for rows in (1, 3, 8, 64):
            regions = list(poly.polygons(path, int(h), rows))
            assert all(round(g.area) == p for _, g, p in regions)
            assert _normal(regions) == ref, (trial, rows)
        assert _normal(poly.polygons(path, int(h), 5, client)) == ref


def test_regions_over_the_vertex_budget_are_cut_alike_for_any_band_height_and_dissolve_back(client, tmp_path):
    """A scene-spanning region with many holes, cut at every 16th row once its part above has more than 60 corners:
    the same parts (flagged ``cut``) for bands of 1 to 64 rows and on 2 workers, each part's corners within the
    budget plus one stripe, and dissolving the parts by class gives GDAL's whole-scene polygons again."""
    rng = np.random.default_rng(3)
    h, w = 90, 70
    a = (rng.random((h, w)) < 0.12).astype(np.uint8)  # class 0 spans the scene, class 1 specks (holes in it)
    a[40:44, :] = 1  # and one class-1 band across the scene: class 0 above and below it are separate regions
    path = str(tmp_path / "c.zarr")
    zarr.open_group(path, mode="w").create_array("class", shape=a.shape, chunks=(8, 8), dtype="uint8")[:] = a

    def parts(rows, on=None, budget=60):
        out = []
        for b in poly.region_batches(path, h, rows, on, max_vertices=budget, cut_rows=16):
            geoms = shapely.from_ragged_array(shapely.GeometryType.POLYGON, b.xy.astype(float),
                                              (b.ring_offsets, b.poly_offsets))
            out += [(int(c), bool(k), shapely.normalize(g).wkb) for c, k, g in zip(b.classes, b.cut, geoms,
                                                                                     strict=True)]
        return sorted(out)

    ref = parts(1)
    assert all(parts(rows) == ref for rows in (3, 8, 16, 64)) and parts(5, client) == ref
    cut = [shapely.from_wkb(g) for c, k, g in ref if k]
    assert len(cut) >= 6 and all(c == 0 for c, k, _ in ref if k)  # the spanning class-0 regions, in parts
    assert all(shapely.get_num_coordinates(g) <= 60 + 2 * 16 * w for g in cut)
    bounds = shapely.bounds(cut)
    assert set(bounds[:, 1].astype(int)) | set(bounds[:, 3].astype(int)) <= {0, 16, 32, 40, 44, 48, 64, 80, 90}
    def corners(g):  # a union leaves the vertices of the cut on straight edges; GDAL writes corners only
        return shapely.normalize(shapely.simplify(g, 0)).wkb

    whole = sorted([(0, corners(g)) for g in shapely.get_parts(shapely.union_all(cut))]
                   + [(c, corners(shapely.from_wkb(g))) for c, k, g in ref if not k])
    assert whole == [(c, corners(shapely.from_wkb(g))) for c, g in _reference(a)]
    uncut = parts(4, budget=None)
    assert not any(k for _, k, _ in uncut) and [(c, g) for c, _, g in uncut] == _reference(a)


@pytest.mark.parametrize("fmt,driver", [("gpkg", "GPKG"), ("fgb", "FlatGeobuf")])
def test_gpkg_and_flatgeobuf_on_request(client, tmp_path, fmt, driver):
    import geopandas as gpd
    import pyogrio
    from conftest import SCENE

    outcome = run(client, tmp_path / fmt, input=str(SCENE), tile_size=256, method=OTSU, exports=["polygons"],
                  polygons={"format": fmt})
    path = _out(outcome) / f"class_polygons.{fmt}"
    assert not (_out(outcome) / "class_polygons.parquet").exists()
    assert pyogrio.read_info(path)["driver"] == driver
    df = gpd.read_file(path)
    with rasterio.open(SCENE) as src:
        assert df.crs == src.crs
    classes = class_map(outcome)
    with rasterio.open(SCENE) as src:
        transform = src.transform
    got = sorted(zip(df.class_id.astype(int).tolist(),
                     [shapely.normalize(g).wkb for g in _to_pixels(list(df.geometry), transform)], strict=True))
    assert got == _reference(classes)


def test_bad_requests_are_one_line_before_any_write(tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import SCENE
    from medical import write_nifti

    vol = write_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).integers(0, 900, (8, 40, 40)).astype(np.int16),
                      np.eye(4))
    jobs = {"volume": ({"input": str(vol), "method": OTSU, "exports": ["polygons"]},
                       "export 'polygons' does not apply to a volume input"),
            "format": ({"input": str(SCENE), "method": OTSU, "exports": ["polygons"], "polygons": {"format": "shp"}},
                       "format"),
            "unasked": ({"input": str(SCENE), "method": OTSU, "polygons": {"format": "fgb"}},
                        "exports does not name polygons")}
    for name, (job, words) in jobs.items():
        out = tmp_path / f"out-{name}"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**job, "output": str(out)}))
        proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(path)], capture_output=True,
                              text=True, timeout=120)
        assert_one_line_error(proc, words)
        assert not out.exists()


def test_nodata_is_the_result_stores():
    assert poly.NODATA == NODATA
