"""SceneGeometry on its own: every "image, slide or volume?" answer the stages ask of it."""

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS

from segpipe.geometry import SceneGeometry, geo_attrs, image_kind
from segpipe.io import exports
from segpipe.io.exports import EXPORTS
from segpipe.io.raster import RasterInfo

UTM = CRS.from_epsg(32618)


def _image() -> SceneGeometry:
    return SceneGeometry("raster", (300, 400), Affine(0.5, 0, 1000, 0, -0.5, 2000), UTM)


def _slide() -> SceneGeometry:
    return SceneGeometry("slide", (300, 400), Affine.scale(0.25))


def _volume() -> SceneGeometry:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    return SceneGeometry("volume", (40, 300, 400), Affine.scale(0.8), affine=affine)


@pytest.mark.parametrize("make,expected", [
    (_image, {"units": "metre", "tile_word": "tile", "pixel_word": "pixels", "row_word": "row", "score": "iou",
              "default_exports": ["cog"], "foreign_exports": {"nifti", "dicom-seg", "qupath"}, "is_volume": False,
              "is_slide": False, "georeferenced": True, "has_levels": False, "has_polygons": True, "small_edge": 256,
              "ndim": 2, "describe": "400x300 px"}),
    (_slide, {"units": "µm", "tile_word": "tile", "pixel_word": "pixels", "row_word": "row", "score": "iou",
              "default_exports": ["cog", "ome-zarr"], "foreign_exports": {"nifti", "dicom-seg"}, "is_volume": False,
              "is_slide": True, "georeferenced": False, "has_levels": True, "has_polygons": True,
              "small_edge": 256, "ndim": 2, "describe": "400x300 px"}),
    (_volume, {"units": "mm", "tile_word": "block", "pixel_word": "voxels", "row_word": "slab", "score": "dice",
               "default_exports": ["nifti"], "foreign_exports": {"cog", "polygons", "qupath"}, "is_volume": True,
               "is_slide": False, "georeferenced": False, "has_levels": False, "has_polygons": False, "small_edge": 64,
               "ndim": 3, "describe": "400x300x40 voxels"}),
])
def test_each_kind_answers_for_itself(make, expected):
    g = make()
    asked_of_the_registry = {"default_exports": exports.defaults(g.kind), "foreign_exports": exports.foreign(g.kind)}
    got = {k: getattr(g, k)() if k == "describe" else asked_of_the_registry.get(k, getattr(g, k, None))
           for k in expected}
    assert got == expected
    default, foreign = asked_of_the_registry.values()
    assert set(default) <= set(EXPORTS) and not set(default) & foreign


def test_an_image_placed_in_pixels_has_pixel_units_and_no_crs():
    g = SceneGeometry("raster", (10, 10), Affine.identity())
    assert (g.units, g.georeferenced, g.is_slide) == ("px", False, False)


def test_kind_and_rank_must_agree():
    with pytest.raises(ValueError, match="3 axes"):
        SceneGeometry("volume", (10, 10), Affine.identity(), affine=np.eye(4))
    with pytest.raises(ValueError, match="2 axes"):
        SceneGeometry("raster", (4, 10, 10), Affine.identity())
    with pytest.raises(ValueError, match="kind must be"):
        SceneGeometry("mosaic", (10, 10), Affine.identity())


def test_world_places_pixel_centres_and_voxels_by_the_affine():
    np.testing.assert_allclose(_image().world(np.array([[0], [0]])), [[1000.25], [1999.75]])
    np.testing.assert_allclose(_volume().world(np.array([[1], [2], [3]])), [[2.4], [1.6], [2.5]])


def test_a_readers_grid_and_a_stores_attributes_agree_with_what_ingest_records():
    info = RasterInfo("s.svs", _slide(), 3, "uint8", None, (None,) * 3)
    assert (info.kind, info.shape, info.height, info.width, info.mpp) == ("slide", (300, 400), 300, 400, None)
    assert info.describe() == "400x300 px" and info.pixel_size == (0.25, 0.25)
    attrs = {**geo_attrs(info.crs, info.transform, info.mpp), "kind": "slide"}
    assert SceneGeometry.of_attrs((300, 400), attrs) == _slide()
    assert SceneGeometry.of_attrs((300, 400), geo_attrs(UTM, _image().transform)) == _image()


def test_a_volume_records_its_affine_and_reads_it_back():
    """A volume's attributes (affine, spacing, origin, direction, frame) round-trip through the store's attributes,
    and its in-plane transform is its voxel size, as ingest records it."""
    affine = np.array([[0.0, 0.0, -2.5, 10.0], [0.8, 0.0, 0.0, -20.0], [0.0, -0.9, 0.0, 30.0], [0, 0, 0, 1]])
    grid = SceneGeometry.volume((40, 300, 400), affine, xform_code=4)
    attrs = grid.attrs()
    assert attrs["spacing"] == [2.5, 0.9, 0.8] and attrs["origin"] == [10.0, -20.0, 30.0]
    assert attrs["transform"] == [0.8, 0.0, 0.0, 0.0, 0.9, 0.0] and attrs["nifti_xform_code"] == 4
    back = SceneGeometry.of_attrs((40, 300, 400), attrs)
    assert back == grid and back.xform_code == 4 and back.pixel_size == (2.5, 0.9, 0.8)
    np.testing.assert_array_equal(back.affine, affine)
    np.testing.assert_allclose(np.asarray(attrs["direction"]) @ np.diag([0.8, 0.9, 2.5]), affine[:3, :3])


def test_image_kind_from_placement_alone():
    """A store's or COG's attributes say slide only by having no CRS and a pixel size in micrometres."""
    assert image_kind(None, [0.25, 0.25]) == "slide"
    assert image_kind(None, None) == "raster" and image_kind(UTM, [0.25, 0.25]) == "raster"
    assert geo_attrs(None, Affine.identity())["spatial:units"] is None
    assert geo_attrs(None, Affine.scale(0.25), (0.25, 0.25))["spatial:units"] == "micrometre"


def test_every_export_has_a_writer():
    import importlib

    assert all(callable(importlib.import_module(e.module).write) for e in EXPORTS.values())


def test_a_grid_encodes_itself_and_a_store_that_records_no_kind_is_read_by_its_placement():
    """Result and change stores record CRS, transform and pixel size but no kind: the grid read back from them
    is a slide when it has no CRS and a pixel size in micrometres, else an image (as exports need to know)."""
    slide = SceneGeometry("slide", (300, 400), Affine.scale(0.25), mpp=(0.25, 0.25))
    for g in (_image(), slide):
        back = SceneGeometry.of_attrs(g.shape, g.attrs())
        assert back == g and back.mpp == g.mpp
    assert SceneGeometry.of_attrs((3, 4), geo_attrs(None, Affine.identity())).kind == "raster"


def test_a_grid_snapped_to_bounds_puts_pixel_edges_on_its_anchor():
    """Edges on multiples of the resolution (edge, today's mosaic grid), or half a pixel past them (center)."""
    edge = SceneGeometry.snapped((1007.0, 1991.0, 1093.0, 2049.0), 30.0, UTM)
    assert edge.transform == Affine(30.0, 0, 990.0, 0, -30.0, 2070.0) and edge.shape == (3, 4)
    assert edge.bounds == (990.0, 1980.0, 1110.0, 2070.0)
    center = SceneGeometry.snapped((1007.0, 1991.0, 1093.0, 2049.0), 30.0, UTM, anchor=(0.5, 0.5))
    assert center.transform == Affine(30.0, 0, 1005.0, 0, -30.0, 2055.0) and center.shape == (3, 3)
    assert center.bounds == (1005.0, 1965.0, 1095.0, 2055.0)  # covers (1007, 1991, 1093, 2049)
