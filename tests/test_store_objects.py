"""Store objects per run (issue 27): the scene's pixels in a shard per ingested band of rows, a classical result's class
map in a shard per band of tile rows (one row each on small scenes, several for small tiles on large ones), and one
batch mark per shard instead of a mark per tile; the same pixels, and resuming intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from conftest import SCENE
from helpers import class_map, run

from segpipe.io.store import Marks

JOB = {"input": str(SCENE), "tile_size": 128, "method": {"name": "otsu"}}  # 900²: 8 x 8 tiles of 128, chunks of 128


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_classical_run_leaves_a_shard_and_a_mark_per_row_not_per_tile(tmp_path, client):
    out = tmp_path / "out"
    first = run(client, out, **JOB, pixels="copy")
    left = files(out)
    assert sum(f.startswith("scene.zarr/image/c/") for f in left) == 8  # one shard per ingested row of chunks
    assert sum(f.startswith("result.zarr/class/c/") for f in left) == 8  # one shard per row of tiles
    batches = [f for f in left if f.startswith("_segpipe_done/result.zarr/segment.batches/")]
    assert len(batches) == 8 and not [f for f in left if f.startswith("_segpipe_done/result.zarr/segment/")]
    marks = Marks(out / "result.zarr", "segment")
    assert marks.keys() == {f"{r}_{c}" for r in range(8) for c in range(8)}
    assert marks.done("7_7") and not marks.done("8_0")
    arr = zarr.open_array(str(out / "result.zarr"), path="class", mode="r")
    assert arr.chunks == (128, 128) and arr.shards == (128, 1024)
    assert zarr.open_array(str(out / "scene.zarr"), path="image", mode="r").shards == (1, 128, 1024)

    # Two tiles lost in two rows: only their rows' tiles are redone, to the same pixels.
    marks.unmark(["2_3", "5_0"])
    assert len(marks.keys()) == 62 and not marks.done("2_3")
    cls = zarr.open_array(str(out / "result.zarr"), path="class", mode="r+")
    cls[256:384, 384:512] = 0
    cls[640:768, 0:128] = 0
    stamps = {f: (out / f).stat().st_mtime_ns for f in batches if (out / f).exists()}
    again = run(client, out, **JOB, pixels="copy")
    np.testing.assert_array_equal(class_map(again), class_map(first))
    assert len(marks.keys()) == 64
    now = [f for f in files(out) if f.startswith("_segpipe_done/result.zarr/segment.batches/")]
    kept = {f for f in now if f in stamps and (out / f).stat().st_mtime_ns == stamps[f]}
    assert len(kept) == 6  # the other rows' batch marks are untouched


def test_a_result_made_without_shards_resumes_in_its_own_layout(tmp_path, client):
    """A result store made before shards (a chunk object and a mark per tile) is resumed as it is."""
    out = tmp_path / "out"
    first = class_map(run(client, out, **JOB))
    group = zarr.open_group(str(out / "result.zarr"), mode="r+")
    attrs, values = dict(group["class"].attrs), group["class"][:]
    del group["class"]
    plain = group.create_array("class", shape=values.shape, chunks=(128, 128), dtype="uint8", fill_value=255,
                               dimension_names=("y", "x"))
    plain.attrs.update(attrs)
    plain[:] = values
    plain[0:128, 0:256] = 0
    marks = Marks(out / "result.zarr", "segment")
    marks.clear()
    for r in range(8):
        for c in range(8):
            if (r, c) not in ((0, 0), (0, 1)):
                marks.mark(f"{r}_{c}")
    again = run(client, out, **JOB)
    np.testing.assert_array_equal(class_map(again), first)
    assert zarr.open_array(str(out / "result.zarr"), path="class", mode="r").shards is None
    assert len(marks.keys()) == 64


def test_batch_marks_are_one_object_found_key_by_key_and_forgotten_with_their_store(tmp_path):
    store = tmp_path / "result.zarr"
    marks = Marks(store, "segment")
    marks.mark_all(["0_0", "0_1", "0_2"])
    marks.mark("1_0")
    assert marks.keys() == {"0_0", "0_1", "0_2", "1_0"}
    assert len(list(marks.batch_dir.iterdir())) == 1 and {p.name for p in marks.dir.iterdir()} == {"1_0"}
    assert Marks(store, "segment").done("0_1") and not Marks(store, "segment").done("0_3")
    marks.mark_all(["0_0", "0_1", "0_2"])  # the same batch again replaces it
    assert len(list(marks.batch_dir.iterdir())) == 1
    marks.unmark(["0_1", "1_0"])
    assert marks.keys() == {"0_0", "0_2"}
    marks.unmark(["0_0", "0_2"])
    assert marks.keys() == set() and not list(marks.batch_dir.iterdir())
    marks.mark_all(["2_0", "2_1"])
    marks.clear()
    assert marks.keys() == set() and not marks.batch_dir.exists()


def test_small_tiles_share_shards_and_marks_in_bands_of_rows(tmp_path, client, big_scene):
    """64-px tiles on 2100 x 2300 px (33 rows of tiles): shards, marks and tasks take bands of two rows (the last
    one row), for the scene's pixels and the class map alike; the classes are those of 256-px tiles, and a lost
    band, also the short last one, is redone alone to the same pixels."""
    job = {"input": str(big_scene), "tile_size": 64, "method": {"name": "otsu"}, "pixels": "copy"}
    out = tmp_path / "out"
    first = class_map(run(client, out, **job))
    np.testing.assert_array_equal(first, class_map(run(client, tmp_path / "big", **{**job, "tile_size": 256})))
    assert zarr.open_array(str(out / "scene.zarr"), path="image", mode="r").shards == (1, 128, 2304)
    assert zarr.open_array(str(out / "result.zarr"), path="class", mode="r").shards == (128, 2304)
    left = files(out)
    assert sum(f.startswith("scene.zarr/image/c/") for f in left) == 17
    assert sum(f.startswith("result.zarr/class/c/") for f in left) == 17
    assert sum(f.startswith("_segpipe_done/result.zarr/segment.batches/") for f in left) == 17
    ingest = Marks(out / "scene.zarr", "ingest")
    assert ingest.keys() == {str(r) for r in range(0, 33, 2)}

    ingest.unmark(["30"])
    image = zarr.open_array(str(out / "scene.zarr"), path="image", mode="r+")
    image[:, 1920:2048] = 0
    segment = Marks(out / "result.zarr", "segment")
    segment.unmark([f"32_{c}" for c in range(36)] + [f"6_{c}" for c in range(36)] + [f"7_{c}" for c in range(36)])
    cls = zarr.open_array(str(out / "result.zarr"), path="class", mode="r+")
    cls[384:512] = 0
    cls[2048:] = 0
    again = run(client, out, **job)
    np.testing.assert_array_equal(class_map(again), first)
    assert ingest.keys() == {str(r) for r in range(0, 33, 2)} and len(segment.keys()) == 33 * 36


def test_a_copied_scene_made_before_bands_resumes_a_row_at_a_time(tmp_path, client, big_scene):
    """A scene store ingested before bands (one row of chunks per shard and mark) keeps its own layout."""
    job = {"input": str(big_scene), "tile_size": 64, "method": {"name": "otsu"}, "pixels": "copy"}
    out = tmp_path / "out"
    first = class_map(run(client, out, **job))
    group = zarr.open_group(str(out / "scene.zarr"), mode="r+")
    attrs, values = dict(group["image"].attrs), group["image"][:]
    del group["image"]
    rows = group.create_array("image", shape=values.shape, chunks=(1, 64, 64), shards=(1, 64, 2304),
                              dtype=values.dtype, fill_value=0, dimension_names=("band", "y", "x"))
    rows.attrs.update(attrs)
    rows[:] = values
    ingest = Marks(out / "scene.zarr", "ingest")
    ingest.clear()
    for r in range(33):
        if r != 5:
            ingest.mark(str(r))
    rows[:, 320:384] = 0
    del group.attrs["ingest_rows"]
    Marks(out / "result.zarr", "segment").clear()
    again = run(client, out, **job)
    np.testing.assert_array_equal(class_map(again), first)
    assert ingest.keys() == {str(r) for r in range(33)}
