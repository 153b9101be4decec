"""Region split-and-merge: equal to a plain recursive whole-image implementation written here, at three tile sizes
that cut root blocks, on the real SpaceNet scene with nodata where leaves cross tile borders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from conftest import SCENE, write_tif
from helpers import assert_one_line_error, class_map, cli, run

from segpipe.errors import InputError
from segpipe.methods.split_merge import check_params

PARAMS = {"threshold": 0.15, "block": 64, "min_block": 2, "classes": 2}


def reference_split_merge(q: np.ndarray, valid: np.ndarray, block: int, min_block: int, threshold: int,
                          bounds: list[float]) -> tuple[np.ndarray, int, int]:
    """Whole-image split-and-merge, written from the definition (recursion, a dict union-find, float64 means).

    Root blocks on the image's ``block`` lattice are split into quadrants until their valid grey steps span
    <= ``threshold`` (or no valid pixel, or ``min_block``); adjacent leaves (valid pixels sharing an edge)
    join when their union spans <= ``threshold``; a region's class is its mean under ``bounds`` (Otsu's
    ``digitize(right=True)``). Returns the class map (255 = nodata), the leaf count and the region count.
    """
    h, w = q.shape
    leaves: list[tuple[int, int, int, int, int, int]] = []

    def visit(r0: int, c0: int, s: int) -> None:
        if r0 >= h or c0 >= w:
            return
        r1, c1 = min(r0 + s, h), min(c0 + s, w)
        v = q[r0:r1, c0:c1][valid[r0:r1, c0:c1]]
        if v.size == 0 or int(v.max()) - int(v.min()) <= threshold or s <= min_block:
            leaves.append((r0, c0, r1, c1, int(v.min()) if v.size else 0, int(v.max()) if v.size else 0))
            return
        for dr in (0, s // 2):
            for dc in (0, s // 2):
                visit(r0 + dr, c0 + dc, s // 2)

    for r in range(0, h, block):
        for c in range(0, w, block):
            visit(r, c, block)
    leaf = np.full((h, w), -1, np.int64)
    for k, (r0, c0, r1, c1, _, _) in enumerate(leaves):
        leaf[r0:r1, c0:c1] = k
    parent = list(range(len(leaves)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b, va, vb in ((leaf[:, :-1], leaf[:, 1:], valid[:, :-1], valid[:, 1:]),
                         (leaf[:-1], leaf[1:], valid[:-1], valid[1:])):
        ok = va & vb & (a != b)
        for i, j in set(zip(a[ok].tolist(), b[ok].tolist(), strict=True)):
            if max(leaves[i][5], leaves[j][5]) - min(leaves[i][4], leaves[j][4]) <= threshold:
                parent[find(i)] = find(j)
    root = np.array([find(k) for k in range(len(leaves))])
    region = root[np.maximum(leaf, 0)]
    sums = np.bincount(region[valid], weights=q[valid].astype(np.float64), minlength=len(leaves))
    counts = np.bincount(region[valid], minlength=len(leaves))
    cls = np.digitize(sums / np.maximum(counts, 1), bounds, right=True).astype(np.uint8)
    return np.where(valid, cls[region], 255), len(leaves), len(np.unique(region[valid]))


@pytest.fixture(scope="module")
def holed(tmp_path_factory, sample_pixels) -> Path:
    """Derived: the SpaceNet sample with nodata (0) in a strip across tile borders (rows 370-449) and in columns
    299-300, exactly where tiles of 300 meet inside a root block (256-319): that block's leaves keep valid pixels
    on both sides with no valid pixel on either tile's edge, so only their shared name can join them."""
    data = sample_pixels.copy()
    data[:, 370:450, 100:640] = 0
    data[:, :, 299:301] = 0
    return write_tif(tmp_path_factory.mktemp("split_merge") / "holed.tif", data, nodata=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, holed, client) -> dict:
    root = tmp_path_factory.mktemp("split_merge_runs")
    method = {"name": "split_merge", "params": PARAMS}
    return {t: run(client, root / str(t), input=str(holed), tile_size=t, method=method) for t in (160, 300, 900)}


def quantised(path: Path, fit: dict) -> tuple[np.ndarray, np.ndarray]:
    """The scene's grey as the fit's integer steps, straight from the file."""
    with rasterio.open(path) as ds:
        img = ds.read(1).astype(np.float64)
    return np.rint((img - fit["lo"]) / (fit["hi"] - fit["lo"]) * fit["levels"]).astype(np.int64), img != 0


@pytest.mark.slow
def test_split_merge_equals_the_whole_image_reference_at_tile_sizes_160_300_900(runs, holed):
    fit = zarr.open_group(runs[900].result, mode="r").attrs["fit"]
    q, valid = quantised(holed, fit)
    assert fit["threshold"] == int(0.15 * 2**16)
    ref, n_leaves, n_regions = reference_split_merge(q, valid, 64, 2, fit["threshold"], fit["class_bounds"])
    shares = np.bincount(ref[valid]) / valid.sum()
    print(f"\nsplit_merge: {n_leaves} leaves, {n_regions} regions; class shares {shares}")
    assert n_leaves > 10_000 and 1000 < n_regions < n_leaves / 2  # it did split, and it did merge
    for t, o in runs.items():
        np.testing.assert_array_equal(class_map(o), ref, err_msg=f"tile {t}")
    # a region classes a pixel by its region's mean, not by its own value: not the per-pixel Otsu map
    per_pixel = np.where(valid, np.digitize(q, fit["class_bounds"], right=True), 255)
    assert 0.01 < (per_pixel != ref).mean() < 0.3


@pytest.mark.slow
def test_a_leaf_cut_by_a_tile_border_with_nodata_on_both_edges_is_one_region(runs, holed):
    """Columns 299-300 are nodata; leaves of the root block at columns 256-319 that span them must join their
    two halves by name (tiles of 300 see each half only): the two halves have one class in every row."""
    fit = zarr.open_group(runs[300].result, mode="r").attrs["fit"]
    q, valid = quantised(holed, fit)
    cls = class_map(runs[300])
    assert (cls[:, 299:301] == 255).all()
    ref, _, _ = reference_split_merge(q, valid, 64, 2, fit["threshold"], fit["class_bounds"])
    np.testing.assert_array_equal(cls[:, 256:320], ref[:, 256:320])


def test_three_classes_and_other_blocks_equal_the_reference(client, tmp_path, holed):
    params = {"threshold": 0.08, "block": 32, "min_block": 4, "classes": 3}
    o = run(client, tmp_path / "o", input=str(holed), tile_size=200, method={"name": "split_merge", "params": params})
    fit = zarr.open_group(o.result, mode="r").attrs["fit"]
    q, valid = quantised(holed, fit)
    ref, _, _ = reference_split_merge(q, valid, 32, 4, fit["threshold"], fit["class_bounds"])
    assert len(fit["class_bounds"]) == 2 and set(np.unique(ref[valid])) == {0, 1, 2}
    np.testing.assert_array_equal(class_map(o), ref)


@pytest.mark.parametrize("params,words", [
    ({"block": 48}, ["block must be a power of two", "48"]),
    ({"min_block": 128}, ["min_block 128 is larger than block 64"]),
    ({"threshold": -0.1}, ["split_merge", "threshold", "greater than or equal to 0"]),
    ({"classes": "two"}, ["split_merge", "classes"]),
    ({"tolerance": 3}, ["split_merge", "no parameter(s) ['tolerance']", "known: ['block', 'classes'"]),
])
def test_bad_split_merge_parameters_are_one_line(params, words):
    with pytest.raises(InputError) as err:
        check_params(params)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_a_bad_split_merge_job_writes_nothing(tmp_path):
    out = tmp_path / "out"
    job = {"input": str(SCENE), "output": str(out), "tile_size": 256,
           "method": {"name": "split_merge", "params": {"block": 48}}}
    assert_one_line_error(cli(tmp_path, job), "block must be a power of two")
    assert not out.exists()


def test_progress_of_both_passes_and_a_resume_repaints_lost_tiles_identically(tmp_path, holed):
    from segpipe.io.store import Marks

    out = tmp_path / "out"
    job = {"input": str(holed), "output": str(out), "tile_size": 300, "method": {"name": "split_merge",
                                                                                  "params": PARAMS}}
    first = cli(tmp_path, job)
    assert first.returncode == 0, first.stderr
    assert "segpipe: label 9/9 tiles (100%)" in first.stderr and "segpipe: segment 9/9 tiles (100%)" in first.stderr
    result = out / "result.zarr"
    before = zarr.open_array(str(result), path="class", mode="r")[:]
    for key in ("0_0", "1_2"):
        (Marks(result, "segment").dir / key).unlink()
    cls = zarr.open_array(str(result), path="class", mode="r+")
    cls[0:300, 0:300] = 0
    cls[300:600, 600:900] = 0
    again = cli(tmp_path, job)
    assert again.returncode == 0, again.stderr
    assert "segpipe: resuming: 7 of 9 tiles already done" in again.stderr
    assert "segpipe: segment 9/9 tiles (100%)" in again.stderr
    np.testing.assert_array_equal(zarr.open_array(str(result), path="class", mode="r")[:], before)
