"""Archives without Prefect: ``segpipe archive`` and ``segpipe.segment_archive`` run every item on one cluster,
at most ``in_flight`` items at once, with the same item logic as the flow (skip what is done, one failing item
a row of its own). Data: crops of the real SpaceNet scene (derived)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
import zarr
from test_archive_items import crops_archive

from segpipe.archive import Item
from segpipe.archive_run import ItemResult, bounded, default_in_flight
from segpipe.config import ClusterSpec


def test_items_run_at_most_in_flight_at_once_and_a_failing_one_is_a_row():
    items = [Item(f"/in/{i}.tif", f"/out/{i}") for i in range(7)]
    lock = threading.Lock()
    started: list[str] = []
    active = [0, 0]  # now, most
    release = threading.Event()

    def work(item: Item) -> ItemResult:
        with lock:
            started.append(item.name)
            active[0] += 1
            active[1] = max(active[1], active[0])
        release.wait(60)
        with lock:
            active[0] -= 1
        if item.name == "3":
            raise ValueError("item 3 is broken\nsecond line")
        return ItemResult(item, "done")

    results: list[ItemResult] = []
    runner = threading.Thread(target=lambda: results.extend(bounded(items, work, 2)))
    runner.start()
    deadline = time.monotonic() + 30
    while len(started) < 2 and time.monotonic() < deadline:  # a condition awaited, not a delay
        time.sleep(0.01)
    assert len(started) == 2  # both slots taken and blocked: no third item can have been handed out
    release.set()
    runner.join(60)
    assert sorted(r.item.name for r in results) == [str(i) for i in range(7)]
    assert active[1] <= 2
    broken = next(r for r in results if r.item.name == "3")
    assert (broken.status, broken.error) == ("failed", "item 3 is broken")
    assert default_in_flight(ClusterSpec(n_workers=3)) == 6
    assert default_in_flight(ClusterSpec(kind="slurm", adapt={"minimum": 0, "maximum": 10})) == 20


@pytest.mark.slow
def test_segpipe_archive_runs_every_item_like_a_single_run_and_skips_them_when_done(tmp_path):
    folder, template = crops_archive(tmp_path, 4, 300, 150, {"n_workers": 2})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "segpipe.cli", "archive", str(folder), str(template), "--output", str(out),
           "--in-flight", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:4]] == ["s0", "s1", "s2", "s3"]
    assert all(ln.split()[-1] == "done" for ln in lines[:4]) and "4 (0 failed)" in lines[4]
    assert "at most 2 item(s) at once" in proc.stderr
    single = tmp_path / "single"
    job = tmp_path / "single.yaml"
    job.write_text(yaml.safe_dump({"input": str(folder / "s2.tif"), "output": str(single), "tile_size": 128,
                                   "method": {"name": "otsu"}}))
    subprocess.run([sys.executable, "-m", "segpipe.cli", "run", "-q", str(job)], check=True, capture_output=True,
                   timeout=300)

    def cls(path):
        return np.asarray(zarr.open_array(str(path / "result.zarr"), path="class", mode="r")[:])

    assert np.array_equal(cls(out / "s2"), cls(single))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skipped (done before)") == 4, again.stdout
    (folder / "s1.tif").write_bytes(b"not a tiff")  # one bad item: a failed row, exit 1, the others untouched
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "1 failed" in bad.stdout and "Traceback" not in bad.stderr
    assert bad.stdout.count("skipped (done before)") == 3
