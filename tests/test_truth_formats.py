"""Ground truth in the formats people have: any OGR vector format, GeoParquet, class names, ids the method lacks.

Every vector file here is derived from the demo's real building footprints (spacenet_buildings.geojson),
written with pyogrio (GeoPackage, Shapefile, FlatGeobuf) or pyarrow (GeoParquet); the metrics of each must
equal those of the GeoJSON itself.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from conftest import BUILDINGS, SCENE, write_tif
from helpers import assert_one_line_error, cli, run
from pyogrio import raw
from pyproj import CRS


def buildings() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The footprints' WKB and attributes, plus a class name and a class id per feature."""
    _, _, wkb, values = raw.read(str(BUILDINGS))[:4]
    n = len(wkb)
    return wkb, {"osm_id": values[0], "kind": np.array(["building"] * n, object),
                 "klass": np.where(np.arange(n) % 5 == 0, 7, 1).astype(np.int32)}


def write_ogr(path, driver: str, layer: str = "buildings", keep: slice = slice(None), **extra) -> None:
    """The footprints (those in ``keep``) as one layer of a vector file in ``driver``'s format."""
    wkb, fields = buildings()
    raw.write(str(path), wkb[keep], [v[keep] for v in fields.values()], list(fields), layer=layer, driver=driver,
              geometry_type="Polygon", crs="EPSG:32616", **extra)


def write_geoparquet(path) -> None:
    wkb, fields = buildings()
    columns = {"geometry": pa.array(list(wkb), pa.binary()), **{k: pa.array(list(v)) for k, v in fields.items()}}
    table = pa.table(columns)
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                    "crs": json.loads(CRS.from_epsg(32616).to_json())}}}
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo).encode()}), path)


OTSU = {"input": str(SCENE), "tile_size": 256, "method": {"name": "otsu"}}


@pytest.fixture(scope="module")
def reference(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return run(client, out / "o", **OTSU, truth={"path": str(BUILDINGS)}).report.summary


def same_counts(a: dict, b: dict) -> bool:
    return a["pixels"] == b["pixels"] and list(a["global_iou"].values()) == list(b["global_iou"].values())


@pytest.mark.parametrize("name,write", [
    ("truth.gpkg", lambda p: (write_ogr(p, "GPKG"), write_ogr(p, "GPKG", layer="other", append=True))),
    ("truth.shp", lambda p: write_ogr(p, "ESRI Shapefile")),
    ("truth.fgb", lambda p: write_ogr(p, "FlatGeobuf")),
    ("truth.parquet", write_geoparquet),
])
def test_every_vector_format_gives_the_geojsons_metrics(tmp_path, client, reference, name, write):
    path = tmp_path / name
    write(path)
    truth = {"path": str(path), **({"layer": "buildings"} if name.endswith(".gpkg") else {})}
    got = run(client, tmp_path / "o", **OTSU, truth=truth).report.summary
    assert same_counts(got, reference), (got["global_iou"], reference["global_iou"])


def test_a_geopackage_with_several_layers_needs_a_layer_named(tmp_path):
    path = tmp_path / "truth.gpkg"
    write_ogr(path, "GPKG")
    write_ogr(path, "GPKG", layer="other", append=True)
    out = tmp_path / "o"
    assert_one_line_error(cli(tmp_path, {**OTSU, "output": str(out), "truth": {"path": str(path)}}),
                          "layers ['buildings', 'other']", "truth.layer")
    assert_one_line_error(cli(tmp_path, {**OTSU, "output": str(out), "truth": {"path": str(path), "layer": "roads"}}),
                          "no layer 'roads'")
    assert not out.exists()


def test_a_geopackage_layer_is_chosen_by_name_or_by_index(tmp_path, client, reference):
    """Two layers that differ (the second holds 10 of the 43 footprints): each selector reads its own."""
    path = tmp_path / "truth.gpkg"
    write_ogr(path, "GPKG")
    write_ogr(path, "GPKG", layer="other", keep=slice(0, 10), append=True)
    got = {layer: run(client, tmp_path / str(layer), **OTSU, truth={"path": str(path), "layer": layer}).report.summary
           for layer in ("other", 1, 0)}
    assert same_counts(got[0], reference)
    assert same_counts(got["other"], got[1]) and not same_counts(got[1], reference)
    assert got[1]["global_iou"]["class1"] < reference["global_iou"]["class1"]  # fewer true buildings, same map


def test_class_names_in_an_attribute_map_through_class_names_or_truth_classes(tmp_path, client, reference):
    path = tmp_path / "truth.fgb"
    write_ogr(path, "FlatGeobuf")
    by_names = run(client, tmp_path / "a", **OTSU, class_names=["background", "building"],
                   truth={"path": str(path), "attribute": "kind"}).report.summary
    by_map = run(client, tmp_path / "b", **OTSU, truth={"path": str(path), "attribute": "kind",
                                                        "classes": {"building": 1}}).report.summary
    assert same_counts(by_names, reference) and same_counts(by_map, reference)
    out = tmp_path / "c"
    proc = cli(tmp_path, {**OTSU, "output": str(out), "truth": {"path": str(path), "attribute": "kind",
                                                                "classes": {"water": 1}}})
    assert_one_line_error(proc, "'building'", "truth.classes", "['water']")
    assert not out.exists()


def test_truth_ids_beyond_the_methods_classes_are_named_unless_ignored(tmp_path, client, reference):
    path = tmp_path / "truth.fgb"
    write_ogr(path, "FlatGeobuf")
    out = tmp_path / "o"
    proc = cli(tmp_path, {**OTSU, "output": str(out), "truth": {"path": str(path), "attribute": "klass"}})
    assert_one_line_error(proc, "value(s) [7]", "0..1", "truth.ignore")
    assert not out.exists()
    got = run(client, out, **OTSU, truth={"path": str(path), "attribute": "klass", "ignore": [7]}).report.summary
    # The features of class 7 are left out of the counts: fewer pixels, the rest counted as before.
    assert 0 < reference["pixels"] - got["pixels"] < 0.1 * reference["pixels"]


def test_a_label_raster_with_a_class_the_method_lacks_is_refused_unless_ignored(tmp_path, client):
    with rasterio.open(SCENE) as ds:
        labels = np.zeros((ds.height, ds.width), np.uint8)
    labels[100:200, 100:200] = 1
    labels[300:320, 300:320] = 3
    path = write_tif(tmp_path / "labels.tif", labels[None])
    out = tmp_path / "o"
    assert_one_line_error(cli(tmp_path, {**OTSU, "output": str(out), "truth": {"path": str(path)}}), "[3]")
    assert not out.exists()
    got = run(client, out, **OTSU, truth={"path": str(path), "ignore": [3]}).report.summary
    assert got["pixels"] == labels.size - 400


def test_an_unreadable_vector_is_one_line(tmp_path):
    bad = tmp_path / "truth.gpkg"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    out = tmp_path / "o"
    proc = cli(tmp_path, {**OTSU, "output": str(out), "truth": {"path": str(bad)}})
    assert proc.returncode == 2 and proc.stderr.startswith("segpipe: error: ") and len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr and not out.exists()


def test_wkb_read_back_is_the_geojsons_geometry():
    wkb, _ = buildings()
    doc = json.loads(BUILDINGS.read_text())
    assert len(wkb) == len(doc["features"]) == 43
    assert shapely.from_wkb(wkb[0]).equals(shapely.geometry.shape(doc["features"][0]["geometry"]))
