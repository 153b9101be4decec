"""Instance AP (COCO, IoU 0.50:0.05:0.95, AP50, AP75) from summed tile statistics: pycocotools' figures on the
whole image, and the same number for any tile size.

The reference is pycocotools' ``COCOeval`` (segm) fed whole-image masks read straight from the rasters; it never
calls segpipe. Its detections are listed in first-pixel raster order, so its stable sort breaks score ties the way
segpipe documents (by the object's first pixel, not by its tile-dependent ID).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import tifffile
import zarr
from conftest import BUILDINGS, DEMO_MODEL, SCENE, write_tif
from helpers import run
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rasterio.features import rasterize

from segpipe.config import TruthSpec
from segpipe.io.raster import raster_info
from segpipe.io.truth import check_truth
from segpipe.objects.ap import Category, average_precision
from segpipe.objects.measure import object_report, tile_objects, truth_classes
from segpipe.report.tables import format_summary
from segpipe.tiling.grid import TileGrid, TileTask

STARDIST = Path(importlib.util.find_spec("stardist").origin).parent / "data" / "images"
AP_KEYS = ("ap", "ap50", "ap75", "ap_per_class", "ap_per_iou", "ap_score")


def first_pixels(ids: np.ndarray) -> dict[int, int]:
    """Each nonzero ID's first pixel, as a flat index in raster order."""
    u, idx = np.unique(ids.ravel(), return_index=True)
    return {int(i): int(k) for i, k in zip(u, idx, strict=True) if i}


def coco_reference(pred: np.ndarray, pred_class: dict[int, int], scores: dict[int, float], truth: np.ndarray,
                   truth_class: dict[int, int], categories: list[int]) -> dict:
    """pycocotools on whole-image instance rasters: one image, area range 'all', no maxDets cap."""
    h, w = pred.shape

    def rle(mask: np.ndarray) -> dict:
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))

    gts = [{"id": t, "image_id": 1, "category_id": truth_class[t], "segmentation": rle(truth == t),
            "area": float((truth == t).sum()), "iscrowd": 0}
           for t in sorted(first_pixels(truth)) if truth_class[t] in categories]
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "height": h, "width": w}], "categories": [{"id": k} for k in categories],
                  "annotations": gts}
    gt.createIndex()
    firsts = first_pixels(pred)
    dets = [{"image_id": 1, "category_id": pred_class[i], "segmentation": rle(pred == i), "score": scores[i]}
            for i in sorted(firsts, key=firsts.get)]
    ev = COCOeval(gt, gt.loadRes(dets), "segm")
    ev.params.catIds = categories
    ev.params.maxDets = [10**9]
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # as COCOeval.summarize reads it

    def mean(s: np.ndarray) -> float | None:
        return float(np.mean(s[s > -1])) if (s > -1).any() else None

    iou = ev.params.iouThrs
    return {"ap": mean(prec), "ap50": mean(prec[np.where(iou == 0.5)[0]]), "ap75": mean(prec[np.where(iou == 0.75)[0]]),
            "per_class": {k: mean(prec[:, :, j]) for j, k in enumerate(categories)}}


def assert_same_ap(got: dict, ref: dict, names: dict[int, str]) -> None:
    for key in ("ap", "ap50", "ap75"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    for k, name in names.items():
        assert got["ap_per_class"][name] == pytest.approx(ref["per_class"][k], abs=1e-12), name


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory) -> tuple[Path, Path]:
    """Derived: stardist's 512 x 512 nuclei and their 125 human-labelled instances, georeferenced on the sample
    scene's grid (the pipeline georeferences its outputs)."""
    d = tmp_path_factory.mktemp("nuclei")
    img = write_tif(d / "img2d.tif", tifffile.imread(STARDIST / "img2d.tif")[None].copy())
    lab = write_tif(d / "mask2d.tif", tifffile.imread(STARDIST / "mask2d.tif").astype(np.uint16)[None].copy())
    return img, lab


@pytest.mark.slow
def test_nuclei_ap_is_cocos_and_identical_for_every_tile_size(client, tmp_path, nuclei):
    """Otsu + watershed split on the nuclei, ranked by area (no probabilities): pycocotools' AP at 3 tile sizes."""
    img, lab = nuclei
    runs = {t: run(client, tmp_path / str(t), input=str(img), tile_size=t, method={"name": "otsu"},
                   truth={"path": str(lab), "instances": True},
                   instances={"split": "watershed", "marker_distance": 3.0, "halo": 32})
            for t in (64, 160, 512)}
    inst = {t: zarr.open_array(o.result, path="instances", mode="r")[:] for t, o in runs.items()}
    s = runs[64].objects.summary
    for t, o in runs.items():
        assert {k: o.objects.summary[k] for k in AP_KEYS} == {k: s[k] for k in AP_KEYS}, t  # bit for bit
        objs = o.objects.objects.sort_values("first")
        np.testing.assert_array_equal(objs["score"], runs[64].objects.objects.sort_values("first")["score"])
    assert not np.array_equal(inst[64], inst[512])  # IDs follow the tiles: no tie-break by ID could be exact
    assert s["ap_score"] == "area" and s["truth_objects"] == 125

    pred, truth = inst[64].astype(np.int64), tifffile.imread(STARDIST / "mask2d.tif").astype(np.int64)
    ids, areas = np.unique(pred[pred > 0], return_counts=True)
    assert len(ids) == s["objects"] > 300 and len(set(areas)) < len(areas)  # many specks of equal area: ties
    ref = coco_reference(pred, dict.fromkeys(ids.tolist(), 1), dict(zip(ids.tolist(), areas.astype(float).tolist(),
                                                                         strict=True)),
                         truth, dict.fromkeys(np.unique(truth[truth > 0]).tolist(), 1), [1])
    assert_same_ap(s, ref, {1: "class1"})
    assert 0 < s["ap"] < s["ap50"] < 1 and s["ap75"] < s["ap50"]
    print(f"nuclei: AP {s['ap']:.6f} AP50 {s['ap50']:.6f} AP75 {s['ap75']:.6f}; pycocotools {ref}")

    out = tmp_path / "64" / "metrics"  # the files: summary.json, objects.json, objects.csv, report.html, terminal
    summary = json.loads((out / "summary.json").read_text())["summary"]["objects"]
    assert summary["ap"] == round(s["ap"], 6) and summary["ap_per_class"] == {"class1": round(s["ap"], 6)}
    assert json.loads((out / "objects.json").read_text())["summary"]["ap75"] == round(s["ap75"], 6)
    table = pd.read_csv(out / "objects.csv")
    assert (table.sort_values("id")["score"].to_numpy() == table.sort_values("id")["pixels"].to_numpy()).all()
    assert "ap_per_class" in (out / "report.html").read_text()
    assert f"AP {round(s['ap'], 6)} (AP50 {round(s['ap50'], 6)}" in format_summary(runs[64].report)


def test_building_ap_ranks_by_mean_probability_exactly_for_any_tiling(client, tmp_path):
    """The demo U-Net with probabilities: scores are the objects' mean class probability; measured again on
    other (unaligned, non-square) tilings of the same result, the AP is bit for bit the same, and pycocotools'."""
    o = run(client, tmp_path / "o", input=str(SCENE), tile_size=512, method={"name": "unet", "model": str(DEMO_MODEL)},
            truth={"path": str(BUILDINGS)}, instances={"classes": [1]}, probabilities=True)
    s = o.objects.summary
    assert s["ap_score"] == "probability"

    group = zarr.open_group(o.result, mode="r")
    pred = np.asarray(group["instances"][:]).astype(np.int64)
    cls = np.asarray(group["class"][:])
    prob = np.asarray(group["probability"][:])  # float16
    ids = np.unique(pred[pred > 0]).tolist()
    scores = {i: math.fsum(prob[cls[pred == i][0]][pred == i].astype(np.float64)) / (pred == i).sum() for i in ids}
    got = o.objects.objects["score"]
    assert all(got[i] == scores[i] for i in ids)  # exact: the tiles sum integers
    features = json.loads(BUILDINGS.read_text())["features"]
    with rasterio.open(SCENE) as ds:
        truth = rasterize([(f["geometry"], k + 1) for k, f in enumerate(features)], out_shape=ds.shape,
                          transform=ds.transform, dtype="uint32").astype(np.int64)
    ref = coco_reference(pred, dict.fromkeys(ids, 1), scores, truth, {k + 1: 1 for k in range(len(features))}, [1])
    assert_same_ap(s, ref, {1: "building"})
    assert 0 < s["ap"] < s["ap50"] < 1
    print(f"buildings: AP {s['ap']:.6f} AP50 {s['ap50']:.6f} AP75 {s['ap75']:.6f}; pycocotools {ref}")

    checked = check_truth(TruthSpec(path=BUILDINGS), raster_info(SCENE))
    classes = np.zeros(max(ids) + 1, np.uint8)
    classes[ids] = 1
    for tile in ((100, 300), 250):
        tasks = TileTask.each(pred.shape, tile, scene=o.scene, result=o.result)
        parts = client.gather([client.submit(tile_objects, t, truth=checked, pure=False) for t in tasks])
        again = object_report(parts, TileGrid(pred.shape, tile), classes, 0.5, ["background", "building"],
                              truth_class=truth_classes(checked), ap_classes=[1]).summary
        assert {k: again[k] for k in AP_KEYS} == {k: s[k] for k in AP_KEYS}, tile


def synthetic(seed: int, shape: tuple[int, int] = (256, 256)) -> tuple:
    """Random rectangles as true objects (classes 1, 2, 4) and as predictions (shifted copies, some of another
    class, plus specks; classes 1, 2, 3) with tied scores; each raster a partition, as instance rasters are."""
    rng = np.random.default_rng(seed)
    truth, pred = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    truth_class, pred_class, scores = {}, {}, {}
    boxes = []
    for t in range(1, 41):
        r, c, h, w = rng.integers(0, shape[0] - 20), rng.integers(0, shape[1] - 20), *rng.integers(3, 18, 2)
        truth[r:r + h, c:c + w] = t
        truth_class[t] = int(rng.choice([1, 2, 4], p=[0.5, 0.4, 0.1]))
        boxes.append((r, c, h, w, truth_class[t]))
    n = 0
    for r, c, h, w, k in boxes:
        if rng.random() < 0.2:
            continue
        n += 1
        dr, dc, dh, dw = rng.integers(-1, 2, 4)
        pred[max(0, r + dr):r + dr + h + dh, max(0, c + dc):c + dc + w + dw] = n
        pred_class[n] = k if k != 4 and rng.random() < 0.85 else int(rng.choice([1, 2, 3]))
    for _ in range(25):  # specks
        n += 1
        r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        pred[r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = n
        pred_class[n] = int(rng.choice([1, 2, 3]))
    # the one way a tie can pick the match: two halves of one true object, each at IoU exactly 0.5, equal scores
    truth[240:244, 100:110], pred[240:242, 100:110], pred[242:244, 100:110] = 99, n + 1, n + 2
    truth_class[99], pred_class[n + 1], pred_class[n + 2] = 1, 1, 1
    present = set(first_pixels(pred))
    scores = {i: float(rng.integers(0, 4)) / 4 for i in present}
    scores[n + 1] = scores[n + 2] = 0.5
    return pred, {i: pred_class[i] for i in present}, scores, truth, truth_class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_equals_pycocotools_per_class_with_ties(seed):
    """The AP core on sums (areas, pair intersections) against pycocotools on masks: classes with truth only
    (AP 0), predictions only (left out), score ties, and two predictions at IoU exactly 0.5 with one true object."""
    pred, pred_class, scores, truth, truth_class = synthetic(seed)
    both = (pred > 0) & (truth > 0)
    pairs, inter = np.unique(np.stack([pred[both], truth[both]]), axis=1, return_counts=True)
    area_p = dict(zip(*np.unique(pred[pred > 0], return_counts=True), strict=True))
    area_t = dict(zip(*np.unique(truth[truth > 0], return_counts=True), strict=True))
    iou = [i / (area_p[p] + area_t[t] - i) for (p, t), i in zip(pairs.T, inter, strict=True)]
    firsts = first_pixels(pred)
    ids = sorted(firsts)
    preds = pd.DataFrame({"category": [pred_class[i] for i in ids], "score": [scores[i] for i in ids],
                          "first": [firsts[i] for i in ids]}, index=ids)
    gts = pd.DataFrame({"category": [truth_class[t] for t in sorted(area_t)]}, index=sorted(area_t))
    got = average_precision(preds, gts, pd.DataFrame({"id": pairs[0], "truth_id": pairs[1], "iou": iou}),
                            [Category(k, f"c{k}") for k in (1, 2, 3, 4)])
    ref = coco_reference(pred, pred_class, scores, truth, truth_class, [1, 2, 3, 4])
    assert_same_ap(got, ref, {1: "c1", 2: "c2", 4: "c4"})
    assert got["ap_per_class"]["c3"] is None and ref["per_class"][3] is None  # no truth of class 3
    assert got["ap_per_class"]["c4"] == 0.0  # truth of class 4, no predictions of it
