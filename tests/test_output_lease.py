"""One run per output (issue 26): real ``segpipe run`` processes, a real Dask scheduler, moto's S3 server, a real
Prefect API.

Why a scheduler without workers: a run takes its output's lease before it connects and then waits for workers
it does not have, so it holds the lease for as long as the test wants, whatever the machine's speed. A second
run started meanwhile meets a held lease every time (no timing, no luck); a worker added afterwards lets the
first run finish.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from conftest import SCENE
from helpers import moto_s3

from segpipe.io.lease import LOCK_NAME, Holder

pytest_plugins = ["stac_catalogs"]

OTSU = {"input": str(SCENE), "tile_size": 256, "method": {"name": "otsu"}, "cluster": {"n_workers": 1}}
KMEANS = {**OTSU, "method": {"name": "kmeans", "params": {"k": 3}}}
DASK = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")


class Scheduler:
    """A ``dask scheduler`` process on loopback, with workers only when :meth:`add_worker` is called."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / "scheduler.json"
        self.procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                        "--dashboard-address", ":0", "--scheduler-file", str(self.file)],
                                       stderr=subprocess.DEVNULL)]
        deadline = time.monotonic() + 120
        while not self.file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        self.address = json.loads(self.file.read_text())["address"]

    def add_worker(self) -> None:
        self.procs.append(subprocess.Popen([DASK, "worker", "--scheduler-file", str(self.file), "--nworkers", "1",
                                            "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
                                           stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=60)


@pytest.fixture
def scheduler(tmp_path):
    s = Scheduler(tmp_path)
    yield s
    s.stop()


def job_file(tmp_path: Path, name: str, job: dict, **more) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**job, **more}))
    return path


def start(job: Path, output: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segpipe.cli", "run", str(job), "--output", str(output), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def segpipe_run(job: Path, output: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segpipe.cli", "run", str(job), "--output", str(output), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def holder_of(output: Path, procs: list[subprocess.Popen]) -> subprocess.Popen:
    """The process among ``procs`` that has written its name into the output's lock file (waits for it)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            h = Holder.parse((output / LOCK_NAME).read_text())
        except OSError:
            h = None
        found = [p for p in procs if h is not None and p.pid == h.pid]
        if found:
            return found[0]
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no run took the lease"
        time.sleep(0.05)


def refused_naming(proc: subprocess.CompletedProcess | tuple, holder_pid: int, where: str = "output") -> str:
    rc, err = (proc.returncode, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("segpipe: error: "), err
    assert f"{where} " in lines[0] and "is in use by another run (host " in lines[0], lines[0]
    assert f"process {holder_pid}, started " in lines[0] and ("job otsu of" in lines[0] or "job kmeans of" in lines[0])
    return lines[0]


def pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, np.ndarray]:
    """The class maps of single clean runs, for comparison."""
    root = tmp_path_factory.mktemp("clean")
    maps = {}
    for name, job in (("otsu", OTSU), ("kmeans", KMEANS)):
        proc = segpipe_run(job_file(root, name, job), root / name)
        assert proc.returncode == 0, proc.stderr
        maps[name] = pixels(root / name / "segmentation.tif")
    return maps


def test_two_runs_started_together_one_runs_the_other_is_refused_naming_it(tmp_path, scheduler, clean):
    job = job_file(tmp_path, "job", OTSU, cluster={"scheduler": scheduler.address})
    out = tmp_path / "out"
    runs = [start(job, out), start(job, out)]
    first = holder_of(out, runs)
    other = next(p for p in runs if p is not first)
    _, err = other.communicate(timeout=300)
    refused_naming((other.returncode, err), first.pid)
    scheduler.add_worker()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    np.testing.assert_array_equal(pixels(out / "segmentation.tif"), clean["otsu"])
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_validate_names_the_holder_too(tmp_path, scheduler):
    job = job_file(tmp_path, "job", OTSU, cluster={"scheduler": scheduler.address})
    out = tmp_path / "out"
    first = start(job, out)
    holder_of(out, [first])
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    refused_naming(proc, first.pid)
    skip = segpipe_run(job_file(tmp_path, "skip", OTSU, busy="skip"), out)
    assert skip.returncode == 0 and skip.stdout.startswith("skipped:      output ") and f"process {first.pid}" in \
        skip.stdout, skip.stderr
    os.kill(first.pid, signal.SIGTERM)
    first.communicate(timeout=120)


def test_a_killed_holder_is_taken_over_and_the_run_finishes_as_a_clean_one(tmp_path, scheduler, clean):
    job = job_file(tmp_path, "job", OTSU, cluster={"scheduler": scheduler.address})
    out = tmp_path / "out"
    first = start(job, out)
    holder_of(out, [first])
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    proc = segpipe_run(job_file(tmp_path, "again", OTSU), out)
    assert proc.returncode == 0, proc.stderr
    assert f"taking over {out} from a run that is gone (host " in proc.stderr
    assert f"process {first.pid}, started " in proc.stderr and "resuming from its completion marks" in proc.stderr
    np.testing.assert_array_equal(pixels(out / "segmentation.tif"), clean["otsu"])
    assert not (out / LOCK_NAME).exists()


def test_an_overwrite_into_a_running_output_is_refused_then_succeeds_after_it(tmp_path, scheduler, clean):
    """The collision the issue measured: an otsu run, then a k-means --overwrite of the same output."""
    out = tmp_path / "out"
    first = start(job_file(tmp_path, "otsu", OTSU, cluster={"scheduler": scheduler.address}), out)
    holder_of(out, [first])
    os.kill(first.pid, signal.SIGSTOP)  # still holding; stopped, so that only the second run could change files
    before = listing(out)
    kmeans = job_file(tmp_path, "kmeans", KMEANS)
    refused_naming(segpipe_run(kmeans, out, "--overwrite"), first.pid)
    assert listing(out) == before  # nothing written, nothing removed
    os.kill(first.pid, signal.SIGCONT)
    scheduler.add_worker()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    np.testing.assert_array_equal(pixels(out / "segmentation.tif"), clean["otsu"])
    proc = segpipe_run(kmeans, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pixels(out / "segmentation.tif"), clean["kmeans"])


def _break(out: Path, how: str) -> None:
    if how == "store without metadata":  # killed while creating it, or a collision deleted it mid-run
        (out / "result.zarr" / "zarr.json").unlink()
    elif how == "store without attributes":
        meta = json.loads((out / "scene.zarr" / "zarr.json").read_text())
        meta["attributes"] = {}
        (out / "scene.zarr" / "zarr.json").write_text(json.dumps(meta))
    elif how == "a file where a store belongs":
        shutil.rmtree(out / "result.zarr")
        (out / "result.zarr").write_text("not a store")
    elif how == "stale marks under a store made anew":  # result.zarr deleted by hand, its marks left
        shutil.rmtree(out / "result.zarr")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["store without metadata", "store without attributes",
                                 "a file where a store belongs", "stale marks under a store made anew"])
def test_a_broken_output_is_recovered(tmp_path, clean, how):
    out = tmp_path / "out"
    job = job_file(tmp_path, "otsu", OTSU)
    assert segpipe_run(job, out).returncode == 0
    _break(out, how)
    plain = segpipe_run(job, out)
    if how == "stale marks under a store made anew":  # nothing to refuse: the store is made anew, all its tiles
        assert plain.returncode == 0, plain.stderr
        np.testing.assert_array_equal(pixels(out / "segmentation.tif"), clean["otsu"])
        return
    line = plain.stderr.strip()
    assert plain.returncode == 2 and line.startswith("segpipe: error: ") and "\n" not in line, plain.stderr
    assert "(left by an interrupted run, or not segpipe's); rerun with --overwrite to replace it" in line
    fixed = segpipe_run(job, out, "--overwrite")
    assert fixed.returncode == 0 and "Traceback" not in fixed.stderr, fixed.stderr
    np.testing.assert_array_equal(pixels(out / "segmentation.tif"), clean["otsu"])
    assert segpipe_run(job, out).returncode == 0  # and it resumes plainly from then on


def test_leftovers_of_a_killed_export_go_and_the_export_comes_back(tmp_path, clean):
    """A staging folder, a temporary COG and a half-renamed OME-Zarr-style ``.old`` left by a dead writer, and
    the COG itself gone: a plain rerun writes the COG again and leaves none of them."""
    out = tmp_path / "out"
    job = job_file(tmp_path, "otsu", OTSU)
    assert segpipe_run(job, out).returncode == 0
    dead = 2**22 + 12345  # above Linux's default pid_max: no process has it
    (out / f".segmentation.tif.{dead}.staging").mkdir()
    (out / f".segmentation.tif.{dead}.staging" / "base.tif").write_bytes(b"partial")
    (out / f".segmentation.tif.{dead}.tmp").write_bytes(b"partial")
    (out / "segmentation.tif").unlink()
    proc = segpipe_run(job, out)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pixels(out / "segmentation.tif"), clean["otsu"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".segmentation.tif.")]


@pytest.mark.slow
def test_a_store_on_s3_is_leased_against_a_run_from_another_output_folder(tmp_path, scheduler, s3, clean):
    """The lease object on the store prefix: a second run into the same ``store: s3://`` from another output
    folder is refused naming the first; once the first is killed and its lease has aged past the timeout, a
    run takes it over and finishes as a clean run."""
    env = {"SEGPIPE_LEASE_TIMEOUT": "3"}
    store = "s3://segpipe/runs/leased"
    first = start(job_file(tmp_path, "a", OTSU, store=store, cluster={"scheduler": scheduler.address}),
                  tmp_path / "a", env=env)
    holder_of(tmp_path / "a", [first])
    key = "runs/leased/.segpipe.lease"
    deadline = time.monotonic() + 120
    while "Contents" not in s3.list_objects_v2(Bucket="segpipe", Prefix=key):  # its second lease, on S3
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    second = segpipe_run(job_file(tmp_path, "b", OTSU, store=store), tmp_path / "b", env=env)
    refused_naming(second, first.pid, where=f"the stores at {store}")
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    from datetime import UTC, datetime

    while (datetime.now(UTC) - s3.head_object(Bucket="segpipe", Key=key)["LastModified"]).total_seconds() <= 4:
        time.sleep(0.2)  # aged past the timeout by the clock the lease itself reads
    third = segpipe_run(job_file(tmp_path, "b", OTSU, store=store), tmp_path / "b", env=env)
    assert third.returncode == 0, third.stderr
    assert f"taking over {store} from a run that is gone" in third.stderr and f"process {first.pid}," in third.stderr
    np.testing.assert_array_equal(pixels(tmp_path / "b" / "segmentation.tif"), clean["otsu"])
    assert "Contents" not in s3.list_objects_v2(Bucket="segpipe", Prefix=key)  # released


@pytest.fixture
def s3():
    """A moto S3 server on 127.0.0.1 (:func:`helpers.moto_s3`)."""
    with moto_s3("segpipe") as s3_client:
        yield s3_client


@pytest.mark.slow
def test_a_scheduled_period_firing_while_the_last_still_runs_skips_it(tmp_path, scheduler, landsat_catalog):
    """Two Prefect flow runs of one land-cover period against a real Prefect API: the second finds the first
    holding the period and skips, saying so in its result and log; the first then finishes."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    job = job_file(tmp_path, "landcover", {
        "input": {"stac": str(landsat_catalog.collection), "assets": ["B3", "B4"], "crs": "EPSG:32612",
                  "resolution": 30, "bbox": [-112.92, 40.72, -112.49, 40.90]},
        "output": "unused", "tile_size": 256, "method": {"name": "otsu"}})
    out = tmp_path / "landcover"
    code = ("import json, sys; from segpipe_flows.landcover import landcover_period; "
            "print(json.dumps(landcover_period(sys.argv[1], output=sys.argv[2], period='2024-06', "
            "scheduler=sys.argv[3])))")
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

        def flow() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", code, str(job), str(out), scheduler.address], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        first = flow()
        holder_of(out / "period=2024-06", [first])
        second = flow()
        stdout, stderr = second.communicate(timeout=600)
        assert second.returncode == 0, stderr
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["status"] == "busy" and f"process {first.pid}, started " in result["note"]
        said = stdout + stderr  # Prefect's log lines, on its console handler
        assert "period 2024-06: skipped: output " in said and "is in use by another run" in said
        scheduler.add_worker()
        stdout, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1])["status"] == "done"
    assert (out / "period=2024-06" / "segmentation.tif").is_file()
    assert not (out / "period=2024-06" / LOCK_NAME).exists()
