"""Instance labels across tiles equal whole-image labelling up to renumbering (2-D, 3-D, diagonals)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import tifffile
import zarr
from conftest import BUILDINGS, DEMO_MODEL, SCENE
from helpers import run
from medical import write_nifti
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from segpipe.config import TruthSpec
from segpipe.io.raster import raster_info
from segpipe.io.truth import check_truth
from segpipe.objects.instances import label_instances, structure

STARDIST = Path(importlib.util.find_spec("stardist").origin).parent / "data" / "images"


def same_up_to_renumbering(got: np.ndarray, ref: np.ndarray) -> None:
    """A one-to-one correspondence between the nonzero labels of ``got`` and ``ref``."""
    np.testing.assert_array_equal(got > 0, ref > 0)
    pairs = np.unique(np.stack([got[got > 0], ref[ref > 0]], axis=1), axis=0)
    assert len(pairs) == len(np.unique(got[got > 0])) == len(np.unique(ref[ref > 0]))


def whole_image_labels(cls: np.ndarray, classes: list[int], connectivity: int) -> np.ndarray:
    out, n = np.zeros(cls.shape, np.int64), 0
    for c in classes:
        lab, k = ndi.label(cls == c, structure(cls.ndim, connectivity))
        out[lab > 0] = lab[lab > 0] + n
        n += k
    return out


def label_store(client, tmp_path: Path, cls: np.ndarray, tile: int, classes: list[int], connectivity: int):
    d = tmp_path / f"t{tile}c{connectivity}"
    result = zarr.open_group(str(d / "result.zarr"), mode="w-")
    result.create_array("class", data=cls, chunks=(32,) * cls.ndim)
    work = zarr.open_group(str(d / "work.zarr"), mode="w-")
    summary = label_instances(str(d / "result.zarr"), work, str(d / "work.zarr"), tile, classes, connectivity, client)
    return summary, result["instances"][:]


@pytest.mark.parametrize("tile", [64, 96, 160])
def test_nuclei_instances_equal_whole_image_labelling(client, tmp_path, tile):
    """Stardist's 512 x 512 nuclei image: Otsu foreground (many tiny touching blobs) and the human mask."""
    img = tifffile.imread(STARDIST / "img2d.tif")
    human = tifffile.imread(STARDIST / "mask2d.tif")
    cls = (img > threshold_otsu(img)).astype(np.uint8) + (human > 0)  # 0 / 1 otsu only / 2 both: two classes
    for connectivity in (1, 2):
        summary, got = label_store(client, tmp_path, cls, tile, [1, 2], connectivity)
        ref = whole_image_labels(cls, [1, 2], connectivity)
        same_up_to_renumbering(got, ref)
        assert summary.count == ref.max() > 300
        for i in np.unique(got[got > 0])[::37]:  # each instance keeps its class
            assert summary.classes[i] == cls[got == i][0]
    # a human-labelled nucleus split by no tile: its pixels form exactly one instance
    nucleus = human == 7
    assert len(np.unique(got[nucleus & (cls == 2)])) == 1


def test_diagonal_contacts_across_tile_corners(client, tmp_path):
    """Objects touching only through a corner where four (2-D) or eight (3-D) tiles meet."""
    for shape in ((128, 128), (128, 128, 128)):
        cls = np.zeros(shape, np.uint8)
        nd = len(shape)
        for k in range(60, 68):  # a diagonal line through the corner at 64, ..., 64
            cls[(k,) * nd] = 1
        cls[(slice(10, 70), 5) + (5,) * (nd - 2)] = 1  # a long line across one face, to a corner voxel
        cls[(70,) + (6,) * (nd - 1)] = 1
        for connectivity, expected in ((nd, 2), (1, 8 + 1 + 1)):
            summary, got = label_store(client, tmp_path / str(nd), cls, 64, [1], connectivity)
            same_up_to_renumbering(got, whole_image_labels(cls, [1], connectivity))
            assert summary.count == expected


@pytest.mark.slow
def test_building_instances_polygons_and_matched_iou_through_the_pipeline(client, tmp_path):
    """SpaceNet buildings: U-Net class map -> instances -> GeoPackage in the scene CRS, matched IoU."""
    import pyogrio
    from rasterio.features import rasterize

    job = {"input": str(SCENE), "method": {"name": "unet", "model": str(DEMO_MODEL)},
           "truth": {"path": str(BUILDINGS)}, "instances": {"classes": [1]}}
    small = run(client, tmp_path / "s", tile_size=128, chunk_size=128, **job)
    big = run(client, tmp_path / "b", tile_size=512, **job)
    inst = {k: zarr.open_array(o.result, path="instances", mode="r")[:] for k, o in (("s", small), ("b", big))}
    cls = zarr.open_array(small.result, path="class", mode="r")[:]
    ref = whole_image_labels(cls, [1], 2)
    same_up_to_renumbering(inst["s"], ref)
    same_up_to_renumbering(inst["b"], ref)

    objects = small.objects.summary
    assert objects == big.objects.summary
    assert objects["objects"] == ref.max() and objects["truth_objects"] == 43
    assert sum(r["objects"] for r in small.report.rows) == objects["objects"]  # centroid tiles: counted once
    assert sum(r["truth_objects"] for r in small.report.rows) == 43
    assert small.report.summary["objects"]["matched"] == objects["matched"] > 20

    # Matched IoU checked on the whole image: one true building burned at once against its predicted object.
    with rasterio.open(SCENE) as ds:
        transform, crs, shape = ds.transform, ds.crs, ds.shape
    o = small.objects.objects
    pid = int(o[o["truth_id"] > 0].sort_values("pixels").index[-1])
    tid = int(o.loc[pid, "truth_id"])
    geom, _ = check_truth(TruthSpec(path=BUILDINGS), raster_info(SCENE)).shapes[tid - 1]
    true_mask = rasterize([(geom, 1)], out_shape=shape, transform=transform).astype(bool)
    pred_mask = inst["s"] == pid
    iou = (true_mask & pred_mask).sum() / (true_mask | pred_mask).sum()
    assert o.loc[pid, "iou"] == pytest.approx(iou) and small.objects.truth.loc[tid, "id"] == pid

    gpkg = tmp_path / "s" / "objects.gpkg"
    assert gpkg in small.exports
    info = pyogrio.read_info(str(gpkg), layer="objects")
    assert info["features"] == objects["objects"] and info["geometry_type"] == "MultiPolygon"
    assert rasterio.crs.CRS.from_user_input(info["crs"]) == crs
    _, _, geoms, fields = pyogrio.raw.read(str(gpkg), layer="objects")
    polys = shapely.from_wkb(geoms)
    ids, pixels = fields[0], fields[2]
    pixel_area = abs(transform.a * transform.e)
    np.testing.assert_allclose(shapely.area(polys), pixels * pixel_area)  # dissolved across tiles, no gaps
    k = int(np.where(ids == pid)[0][0])
    burned = rasterize([(polys[k], 1)], out_shape=shape, transform=transform).astype(bool)
    np.testing.assert_array_equal(burned, pred_mask)  # polygons are the instances, in the scene CRS


@pytest.mark.slow
def test_3d_nuclei_instances_through_the_pipeline(client, tmp_path):
    """Derived: stardist's 3-D nuclei volume mirrored 3 x 3 x 3 (93 x 183 x 171) as NIfTI, with its instances."""
    img = tifffile.imread(STARDIST / "img3d.tif")
    mask = tifffile.imread(STARDIST / "mask3d.tif").astype(np.int64)

    def mirrored(a: np.ndarray, ids: bool) -> np.ndarray:
        blocks = {}
        for k, (i, j, m) in enumerate(itertools.product(range(3), repeat=3)):
            b = a[::(-1) ** i, ::(-1) ** j, ::(-1) ** m]
            blocks[(i, j, m)] = np.where(b > 0, b + 1000 * k, 0) if ids else b
        return np.block([[[blocks[(i, j, m)] for m in range(3)] for j in range(3)] for i in range(3)])

    vol, truth = mirrored(img, False), mirrored(mask, True)
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    src = write_nifti(tmp_path / "nuclei.nii.gz", vol, affine)
    lab = write_nifti(tmp_path / "nuclei_labels.nii.gz", truth.astype(np.uint32), affine)
    o = run(client, tmp_path / "o", input=str(src), tile_size=64, method={"name": "otsu"},
            truth={"path": str(lab), "instances": True}, instances={})
    cls = zarr.open_array(o.result, path="class", mode="r")[:]
    got = zarr.open_array(o.result, path="instances", mode="r")[:]
    same_up_to_renumbering(got, whole_image_labels(cls, [1], 3))
    s = o.objects.summary
    assert s["truth_objects"] == 27 * 51
    assert 0 < s["matched"] <= s["truth_objects"]
    assert sum(r["objects"] for r in o.report.rows) == s["objects"]
    assert (tmp_path / "o" / "metrics" / "objects.csv").is_file()
    assert not (tmp_path / "o" / "objects.gpkg").exists()  # polygons are for 2-D scenes

    split = run(client, tmp_path / "w", input=str(src), tile_size=64, method={"name": "otsu"},
                truth={"path": str(lab), "instances": True},
                instances={"split": "watershed", "marker_distance": 2.0, "halo": 24})
    assert split.objects.summary["matched"] > s["matched"]  # touching nuclei split apart match better
    # ...and equals whole-volume watershed (distances in mm: spacing z 1.0, y/x 0.5) up to renumbering
    from skimage.segmentation import watershed

    from segpipe.objects.split import _priority

    fg = cls == 1
    dist = ndi.distance_transform_edt(fg, sampling=(1.0, 0.5, 0.5))
    markers, n = ndi.label(dist >= 2.0, structure(3, 3))
    ws = watershed(_priority(dist, (0, 0, 0), cls.shape), markers, mask=fg, connectivity=3)
    rest, _ = ndi.label(fg & (ws == 0), structure(3, 3))
    ref = np.where(ws > 0, ws, np.where(rest > 0, rest + n, 0))
    same_up_to_renumbering(zarr.open_array(split.result, path="instances", mode="r")[:], ref)


def matched(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> int:
    """Objects of ``pred`` whose IoU with a true object exceeds ``threshold``."""
    both = (pred > 0) & (truth > 0)
    pairs, inter = np.unique(np.stack([pred[both], truth[both]]), axis=1, return_counts=True)
    area_p = dict(zip(*np.unique(pred[pred > 0], return_counts=True), strict=True))
    area_t = dict(zip(*np.unique(truth[truth > 0], return_counts=True), strict=True))
    return sum(i / (area_p[p] + area_t[t] - i) > threshold for (p, t), i in zip(pairs.T, inter, strict=True))


@pytest.mark.slow
def test_watershed_split_of_touching_nuclei_is_tile_exact_and_finds_more_nuclei(client, tmp_path):
    """The human nuclei mask as a class map: touching nuclei merge into one component; watershed splits them."""
    from skimage.segmentation import watershed

    from segpipe.objects.split import _priority, split_instances

    human = tifffile.imread(STARDIST / "mask2d.tif")
    cls = (human > 0).astype(np.uint8)
    r = 4.0
    fg = cls == 1
    dist = ndi.distance_transform_edt(fg)  # the whole image at once
    markers, n = ndi.label(dist >= r, structure(2, 2))
    ws = watershed(_priority(dist, (0, 0), cls.shape), markers, mask=fg, connectivity=2)
    rest, _ = ndi.label(fg & (ws == 0), structure(2, 2))
    ref = np.where(ws > 0, ws, np.where(rest > 0, rest + n, 0))
    for tile in (64, 96, 512):
        d = tmp_path / str(tile)
        result = zarr.open_group(str(d / "r.zarr"), mode="w-")
        result.create_array("class", data=cls, chunks=(32, 32))
        work = zarr.open_group(str(d / "w.zarr"), mode="w-")
        summary = split_instances(str(d / "r.zarr"), work, str(d / "w.zarr"), tile, [1], 2, r, 48, client)
        got = result["instances"][:]
        same_up_to_renumbering(got, ref)
        assert summary.count == ref.max()
    components = whole_image_labels(cls, [1], 2)
    assert ref.max() > components.max()
    assert matched(got, human) > matched(components, human) + 5  # split nuclei match the human labels
