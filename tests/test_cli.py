"""The command line as a person meets it: results on stdout, stage lines on stderr, validate, bad options."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import BUILDINGS, SCENE
from helpers import assert_one_line_error


def segpipe(tmp_path, *args: str, job: dict | None = None) -> subprocess.CompletedProcess:
    extra = []
    if job is not None:
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        extra = [str(tmp_path / "job.yaml")]
    return subprocess.run([sys.executable, "-m", "segpipe.cli", *args, *extra], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def job(tmp_path, **extra) -> dict:
    return {"input": str(SCENE), "output": str(tmp_path / "out"), "tile_size": 256, "method": {"name": "otsu"},
            "truth": {"path": str(BUILDINGS)}, **extra}


def test_version():
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "--version"], capture_output=True, text=True)
    from segpipe import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"segpipe {__version__}"


def test_results_on_stdout_stage_lines_on_stderr_and_quiet_silences_them(tmp_path):
    # Worker processes under nannies, and no warning filter: every stderr line is segpipe's own (no Dask
    # "Worker process still alive after 4.0 seconds, killing", no rasterio or pyogrio warnings).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DASK_LOGGING__DISTRIBUTED")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(tmp_path, cluster={"processes": "yes", "n_workers": 2})))
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "run", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert all(ln.startswith("segpipe:") for ln in proc.stderr.splitlines() if ln.strip()), proc.stderr
    assert "segpipe: segment with otsu" in proc.stderr and "segpipe: segment" not in proc.stdout
    # The first line comes once the job is checked, before the seconds a cluster takes to start.
    assert proc.stderr.startswith("segpipe: job checked; starting "), proc.stderr
    assert "global IoU" in proc.stdout and proc.stdout.startswith("export:")
    quiet = segpipe(tmp_path, "run", "-q", "--output", str(tmp_path / "quiet"), job=job(tmp_path))
    assert quiet.returncode == 0 and "segpipe:" not in quiet.stderr and "global IoU" in quiet.stdout


def test_dask_log_levels_follow_verbose_even_after_distributed_sets_its_own(monkeypatch):
    """Importing distributed resets its loggers from Dask's config: quiet_dask says it there and on the logger."""
    import logging

    import dask
    import distributed  # noqa: F401  (already imported: the level must still be set)

    from segpipe.cli import quiet_dask

    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "warning")  # recorded, so the test leaves it as it was
    before = logging.getLogger("distributed").level
    try:
        quiet_dask(False)
        assert logging.getLogger("distributed.nanny").getEffectiveLevel() == logging.ERROR
        assert os.environ["DASK_LOGGING__DISTRIBUTED"] == "error"  # worker processes inherit it
        quiet_dask(True)
        assert logging.getLogger("distributed.nanny").getEffectiveLevel() == logging.INFO
        assert dask.config.get("logging.distributed") == "info"
    finally:
        logging.getLogger("distributed").setLevel(before)
        dask.config.set({"logging.distributed": "info"})


def test_validate_refuses_a_well_formed_scheduler_address_nobody_answers(tmp_path):
    """Port 9 on loopback: nothing listens there. validate connects as run would (and gives up after 5 s)."""
    proc = segpipe(tmp_path, "validate", "--scheduler", "tcp://127.0.0.1:9", job=job(tmp_path))
    assert_one_line_error(proc, "cannot reach Dask scheduler tcp://127.0.0.1:9")
    assert not (tmp_path / "out").exists()


def test_validate_checks_everything_and_writes_nothing(tmp_path):
    proc = segpipe(tmp_path, "validate", job=job(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "otsu (2 classes" in proc.stdout and "nothing written" in proc.stdout
    assert not (tmp_path / "out").exists()
    bad = segpipe(tmp_path, "validate", job=job(tmp_path, bands=[2]))
    assert_one_line_error(bad, "band")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,extra,words", [
    ([], {"input": "https://127.0.0.1:9/nothing.tif"}, ["not a readable raster", "127.0.0.1:9"]),
    (["--workers", "0"], {}, ["n_workers"]),
    (["--tile-size", "0"], {}, ["tile_size"]),
    (["--scheduler", "not-an-address"], {}, ["'not-an-address' is not a Dask scheduler address"]),
    ([], {"cluster": {"memory_limit": "lots"}}, ["'lots' is not an amount of memory"]),
])
def test_bad_options_are_one_line_before_anything_is_written(tmp_path, args, extra, words):
    proc = segpipe(tmp_path, "run", *args, job=job(tmp_path, **extra))
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "out").exists()


def test_a_scene_smaller_than_the_default_tile_runs_as_one_tile(tmp_path):
    import rasterio
    from conftest import write_tif

    with rasterio.open(SCENE) as ds:
        small = write_tif(tmp_path / "small.tif", ds.read(window=((0, 300), (0, 200))),
                          transform=ds.transform)
    out = tmp_path / "out"
    proc = segpipe(tmp_path, "run", job={"input": str(small), "output": str(out), "method": {"name": "otsu"}})
    assert proc.returncode == 0, proc.stderr
    assert "1 tile(s)" in proc.stderr and (out / "segmentation.tif").is_file()
    explicit = segpipe(tmp_path, "run", job={"input": str(small), "output": str(tmp_path / "o2"), "tile_size": 512,
                                             "method": {"name": "otsu"}})
    assert_one_line_error(explicit, "tile_size 512 is larger than the scene")


def test_a_rerun_removes_what_a_killed_export_left_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = 2**22 + 12345  # above this machine's pid_max: no such process
    (out / f".segmentation.tif.{dead}.staging").mkdir()
    (out / f".segmentation.tif.{dead}.staging" / "base.tif").write_bytes(b"half")
    (out / f".segmentation.tif.{dead}.tmp").write_bytes(b"half a COG")
    proc = segpipe(tmp_path, "run", job=job(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".segmentation")) == []


def test_changed_settings_are_named_before_any_work_and_overwrite_replaces_them(tmp_path):
    import zarr

    first = segpipe(tmp_path, "run", job=job(tmp_path))
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    changed = job(tmp_path, method={"name": "otsu", "params": {"classes": 3}}, class_names=["a", "b", "c"])
    proc = segpipe(tmp_path, "run", job=changed)
    assert_one_line_error(proc, "different input or settings", "method.params.classes: null -> 3", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before the cluster or ingest ran
    again = segpipe(tmp_path, "run", "--overwrite", job=changed)
    assert again.returncode == 0, again.stderr
    assert "replacing the results of other settings" in again.stderr
    classes = zarr.open_array(str(out / "result.zarr"), path="class", mode="r")[:]
    assert set(int(v) for v in classes.ravel()[::97]) <= {0, 1, 2} and classes.max() == 2
    # Overwritten with other classes, no COG and no truth: the old settings' files go, once the run succeeded.
    assert (out / "segmentation.tif").exists() and (out / "metrics" / "tiles.csv").exists()
    bare = {k: v for k, v in job(tmp_path).items() if k != "truth"}
    third = segpipe(tmp_path, "run", "--overwrite", job={**bare, "exports": ["ome-zarr"]})
    assert third.returncode == 0, third.stderr
    left = sorted(str(p.relative_to(out)) for p in out.iterdir() if not p.name.startswith("_"))
    assert left == ["image.ome.zarr", "item.json", "metrics", "result.zarr", "scene.zarr"], left  # item.json anew
    import json

    summary = json.loads((out / "metrics" / "summary.json").read_text())
    assert [p.name for p in (out / "metrics").iterdir()] == ["summary.json"]
    assert set(summary) == {"stage_seconds"} and {"ingest", "segment", "export"} <= set(summary["stage_seconds"])


def test_progress_counts_every_stage_and_a_rerun_says_it_resumes(tmp_path):
    """Not a terminal here: a plain line per tenth of each stage, the last one at the total; stage wall times
    in summary.json; after losing two tiles, the rerun says how many were already done."""
    import json

    import zarr

    from segpipe.io.store import Marks

    first = segpipe(tmp_path, "run", job=job(tmp_path, tile_size=128, instances={}))
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    for stage, unit, total in [("ingest", "rows", 8), ("statistics", "row slabs", 1), ("segment", "tiles", 64),
                               ("instances", "tiles", 64), ("instance ids", "tiles", 64), ("objects", "tiles", 64),
                               ("polygons", "tiles", 64), ("metrics", "tiles", 64)]:
        if total == 1:  # one unit: its only line is the last
            assert f"segpipe: {stage} 1/1 {unit} (100%)" in first.stderr, lines
            continue
        mine = [ln for ln in lines if ln.startswith(f"segpipe: {stage} ") and f" {unit} (" in ln]
        assert len(mine) >= 2 and mine[-1].startswith(f"segpipe: {stage} {total}/{total} {unit} (100%)"), lines
    assert any(ln.startswith("segpipe: dashboard http") for ln in lines)
    summary = json.loads((tmp_path / "out" / "metrics" / "summary.json").read_text())
    assert set(summary["stage_seconds"]) >= {"ingest", "segment", "export", "metrics"}
    result = tmp_path / "out" / "result.zarr"
    Marks(result, "segment").unmark(["0_0", "3_5"])  # the two tiles' marks, inside their shards' batch marks
    arr = zarr.open_array(str(result), path="class", mode="r+")
    arr[0:128, 0:128] = 0
    again = segpipe(tmp_path, "run", job=job(tmp_path, tile_size=128))  # the segment stage alone resumes
    assert again.returncode == 0, again.stderr
    assert "segpipe: resuming: 62 of 64 tiles already done" in again.stderr
    assert "segpipe: segment 64/64 tiles (100%)" in again.stderr


@pytest.mark.parametrize("rows", [0, 24])  # 0: a pty that reports no size, as a fresh one or a CI console
def test_on_a_real_terminal_each_stage_draws_a_bar(tmp_path, rows):
    """stderr on a pseudo-terminal, as a person at a shell has it: a tqdm bar per stage with rate and total;
    results still on stdout (a pipe) without bar characters."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, 80 if rows else 0, 0, 0))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(tmp_path)))
    proc = subprocess.Popen([sys.executable, "-m", "segpipe.cli", "run", str(tmp_path / "job.yaml")],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True)
    os.close(slave)
    screen = b""
    while True:  # read the terminal until the process has closed it (EIO on Linux), then collect stdout
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    stdout = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, screen.decode(errors="replace")
    import re

    drawn = re.split(r"[\r\n]+", screen.decode())  # every state of every bar, as drawn in place
    for stage, unit, total in [("ingest", "row", 4), ("segment", "tile", 16), ("metrics", "tile", 16)]:
        # units done/total, then [elapsed<left, rate]
        done = [ln for ln in drawn if ln.startswith(f"segpipe: {stage}: 100%|") and f"| {total}/{total} [" in ln]
        assert done and done[-1].endswith(f" {unit}/s]"), drawn
    assert "global IoU" in stdout and "|" not in stdout
