"""The COG export: exact pixels, GDAL's own nearest-neighbour overviews, georeferencing or slide resolution tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import tifffile
import zarr
from affine import Affine
from conftest import SCENE
from rio_cogeo.cogeo import cog_validate

import segpipe.io.cog
from segpipe.geometry import SceneGeometry
from segpipe.io.cog import PALETTE, export_cog
from segpipe.io.result import NODATA, create_result

# Slides and the plain GDAL reference carry no georeferencing, which is the point, not a problem.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

NAMES = ["background", "road", "building", "water"]


def derived_class_map(height: int, width: int) -> np.ndarray:
    """The SpaceNet sample mosaicked with flips, cut into 4 classes by quantiles, with nodata regions."""
    with rasterio.open(SCENE) as src:
        a = src.read(1)
    row = np.concatenate([a, a[:, ::-1]] * (-(-width // (2 * a.shape[1]))), axis=1)
    full = np.concatenate([row, row[::-1]] * (-(-height // (2 * a.shape[0]))), axis=0)[:height, :width]
    classes = np.digitize(full, np.quantile(full[full > 0], [0.4, 0.7, 0.9])).astype(np.uint8)
    classes[full == 0] = NODATA
    classes[height // 3: height // 3 + 300, 200:900] = NODATA  # a hole across tiles and chunks
    classes[:, -37:] = NODATA  # and a strip at the scene edge
    return classes


def result_store(path: Path, classes: np.ndarray, chunk: int, crs: bool = True,
                 mpp: tuple[float, float] = (0.25, 0.5)) -> str:
    """A result store made by ``create_result`` (the pipeline's own layout) holding ``classes``."""
    with rasterio.open(SCENE) as src:
        scene_crs, transform = src.crs, src.transform
    if not crs:  # a slide: micrometre transform, pixel size in ``mpp``
        scene_crs, transform = None, Affine(mpp[0], 0, 0, 0, mpp[1], 0)
    h, w = classes.shape
    geometry = SceneGeometry("raster" if crs else "slide", (h, w), transform, scene_crs,
                             mpp=None if crs else tuple(mpp))
    group = create_result(str(path), {"test": path.name}, geometry, chunk, NAMES)
    group["class"][:] = classes
    return str(path)


def gdal_nearest_pyramid(classes: np.ndarray, tile: int = 512) -> list[np.ndarray]:
    """The overviews GDAL's COG driver builds: halve (round down) until a tile holds it, each level from the last."""
    levels, prev = [], classes
    while prev.shape[0] > tile or prev.shape[1] > tile:
        h, w = max(1, prev.shape[0] // 2), max(1, prev.shape[1] // 2)
        rows = (0.5 + np.arange(h) * (prev.shape[0] / h)).astype(int)
        cols = (0.5 + np.arange(w) * (prev.shape[1] / w)).astype(int)
        prev = prev[np.ix_(rows, cols)]
        levels.append(prev)
    return levels


def read_levels(path: Path) -> list[np.ndarray]:
    with rasterio.open(path) as ds:
        n = len(ds.overviews(1))
    out = []
    for k in range(n):
        with rasterio.open(path, overview_level=k) as ov:
            out.append(ov.read(1))
    return out


@pytest.fixture(scope="module")
def classes() -> np.ndarray:
    return derived_class_map(2300, 1900)


@pytest.mark.parametrize("chunk", [256, 384, 100])  # strips of 512, 1536 (lcm) and 512 rows (lcm too tall)
def test_cog_has_the_zarr_pixels_and_gdal_nearest_overviews(tmp_path, classes, chunk):
    assert len(set(np.unique(classes)) - {NODATA}) >= 3 and (classes == NODATA).any()
    result = result_store(tmp_path / "result.zarr", classes, chunk)
    cog = export_cog(result, tmp_path / "out" / "segmentation.tif")
    valid, errors, _ = cog_validate(str(cog))
    assert valid, errors
    with rasterio.open(cog) as ds, rasterio.open(SCENE) as src:
        assert ds.crs == src.crs and ds.transform == src.transform
        assert ds.nodata == NODATA and ds.dtypes == ("uint8",) and ds.descriptions == ("class",)
        assert ds.compression.name == "deflate" and ds.block_shapes == [(512, 512)]
        assert ds.tags()["class_names"] == ",".join(NAMES)
        cmap = ds.colormap(1)
        assert all(cmap[i][:3] == PALETTE[i % len(PALETTE)] for i in range(len(NAMES)))
        np.testing.assert_array_equal(ds.read(1), np.asarray(zarr.open_array(result, path="class", mode="r")[:]))
        assert ds.overviews(1) == [2, 4, 8]
    got = read_levels(cog)
    expected = gdal_nearest_pyramid(classes)
    assert [g.shape for g in got] == [(1150, 950), (575, 475), (287, 237)] == [e.shape for e in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)  # nearest: classes are never averaged
    # and exactly what GDAL builds itself from the same pixels (the old export's way)
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", height=classes.shape[0], width=classes.shape[1], count=1,
                       dtype="uint8", nodata=NODATA, tiled=True) as ds:
        ds.write(classes, 1)
    rasterio.shutil.copy(plain, tmp_path / "gdal.tif", driver="COG", overview_resampling="NEAREST", blocksize=512)
    for g, e in zip(got, read_levels(tmp_path / "gdal.tif"), strict=True):
        np.testing.assert_array_equal(g, e)


def test_slide_cog_keeps_resolution_tags_and_no_crs(tmp_path, classes):
    """A slide's label pyramid: every level carries its own pixel size in resolution tags (which GDAL writes on the
    first page only: the levels' directories are added after the data, so the COG layout gives way, said in
    GDAL's layout note) and GDAL still reads every level."""
    result = result_store(tmp_path / "slide.zarr", classes[:1500, :1300], 256, crs=False, mpp=(0.25, 0.5))
    cog = export_cog(result, tmp_path / "slide.tif")
    _, errors, _ = cog_validate(str(cog))
    assert errors == ["This file used to have optimizations in its layout, but those have been, at least partly, "
                      "invalidated by later changes",
                      "The offset of the first block of the smallest overview should be after its IFD"], errors
    with rasterio.open(cog) as ds:
        assert ds.crs is None
        assert ds.tags()["mpp"] == "0.25,0.5" and ds.tags()["class_names"] == ",".join(NAMES)
        np.testing.assert_array_equal(ds.read(1), classes[:1500, :1300])
        assert ds.overviews(1) == [2, 4]
    for g, e in zip(read_levels(cog), gdal_nearest_pyramid(classes[:1500, :1300]), strict=True):
        np.testing.assert_array_equal(g, e)
    with tifffile.TiffFile(cog) as tif:
        page = tif.pages[0]
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        x, y = page.tags["XResolution"].value, page.tags["YResolution"].value
        assert x[0] / x[1] == pytest.approx(1e4 / 0.25) and y[0] / y[1] == pytest.approx(1e4 / 0.5)
        assert "GeoKeyDirectoryTag" not in page.tags
        for level in tif.series[0].levels[1:]:
            lp = level.keyframe
            x, y = lp.tags["XResolution"].value, lp.tags["YResolution"].value
            assert lp.tags["ResolutionUnit"].value == 3
            assert x[0] / x[1] == pytest.approx(1e4 / (0.25 * 1300 / lp.shape[1]), rel=1e-4)
            assert y[0] / y[1] == pytest.approx(1e4 / (0.5 * 1300 / lp.shape[1]), rel=1e-4)


def test_small_map_without_overviews(tmp_path, classes):
    result = result_store(tmp_path / "small.zarr", classes[:300, :500], 128)
    cog = export_cog(result, tmp_path / "small.tif")
    assert cog_validate(str(cog))[0]
    with rasterio.open(cog) as ds:
        assert ds.overviews(1) == []
        np.testing.assert_array_equal(ds.read(1), classes[:300, :500])


def test_a_failed_copy_keeps_the_old_cog_and_leaves_no_files(tmp_path, classes, monkeypatch):
    result = result_store(tmp_path / "result.zarr", classes[:1200, :1100], 256)
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.tif").write_bytes(b"the previous good export")
    real = segpipe.io.cog.rasterio.shutil.copy

    def copy_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # GDAL has written the whole temporary COG
        raise OSError("disk full")

    monkeypatch.setattr(segpipe.io.cog.rasterio.shutil, "copy", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_cog(result, out / "segmentation.tif")
    assert [p.name for p in out.iterdir()] == ["segmentation.tif"]  # no staging folder, no temporary COG
    assert (out / "segmentation.tif").read_bytes() == b"the previous good export"
