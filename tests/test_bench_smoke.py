"""The benchmarks' code paths, on tiny inputs: a benchmark nothing runs rots (issue 27), so its ``--smoke`` runs here.

No figure is asserted (a 2-core test machine times nothing worth keeping); what is checked is that the run goes
through every step and prints every table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_tile_curve_smoke_runs_every_step(tmp_path):
    """bench_tile_curve.py --smoke: two tiny scenes on a loopback scheduler and workers, object counts, and one run
    with its stores on moto's S3 server with its requests counted."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_tile_curve.py"), "--smoke"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "SEGPIPE_BENCH_TMP": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| 4 (128²) | 1 |" in out and "| 16 (256²) | 1 |" in out, out
    assert "per-tile cost at 16 ÷ at 4 tiles" in out and "marginal cost" in out and "peak RSS growth" in out
    assert "objects left (by place)" in out and "marks result.zarr" in out
    s3 = [line for line in out.splitlines() if line.startswith("| 4 | ") and "PUT" in line]
    assert s3 and "result.zarr" in s3[0], out  # the S3 run's requests were counted and its objects listed
    assert not list(tmp_path.glob("tmp*")), "the benchmark left its scratch behind"


@pytest.mark.slow
def test_archive_scale_smoke_runs_every_contender(tmp_path):
    """bench_archive_scale.py --smoke: 4 items of 256² as an archive (CLI and Prefect flow against a server it
    starts) and as one job, on a scheduler and two workers it starts and stops; the table and every line print."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_archive_scale.py"), "--smoke"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "SEGPIPE_BENCH_TMP": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "### Archive at scale: 4 items of 256²" in out, out
    for row in ("| `segpipe run` of one scene", "| `segpipe archive` of the 4 items", "| Prefect flow"):
        assert row in out, out
    assert "peak RSS" in out and "ratio **" in out and "per item at 4 (archive)" in out and "stage medians" in out
    assert not list(tmp_path.glob("archive-scale-*")), "the benchmark left its scratch behind"


@pytest.mark.slow
def test_exports_smoke_runs_every_contender(tmp_path):
    """bench_exports.py --smoke: the demo with and without polygons (and its STAC Item timed), the CT series with
    and without DICOM-SEG, and the scale job on a 2048² mosaic, each once."""
    import json

    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_exports.py"), "--smoke"], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "SEGPIPE_BENCH_TMP": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for job, base, other in (("demo", "cog", "polygons"), ("ct", "nifti", "seg"), ("scale", "cog", "polygons")):
        r = out[job]
        assert len(r[f"{base}_s"]) == len(r[f"{other}_s"]) == len(r["added_share_rounds"]) == 1, r
        assert r[f"{other}_export_s"][0] > 0 and "load" in r
    assert len(out["demo"]["item_s"]) == len(out["scale"]["item_s"]) == 1 and "item_s" not in out["ct"]
    assert not list(tmp_path.glob("tmp*")), "the benchmark left its scratch behind"
