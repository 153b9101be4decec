"""``segpipe plan``: the figures it predicts are the ones a real run writes and submits, it writes nothing, its
refusals are one line, and a calibration writes rates that the next plan reads."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import BUILDINGS, DEMO_MODEL, SAMPLE, write_tif
from distributed import get_task_stream
from distributed.utils import key_split
from helpers import assert_one_line_error

from segpipe.config import job_from_dict
from segpipe.io.result import SEGMENT_STAGE
from segpipe.io.store import Marks
from segpipe.pipeline import check, run_job
from segpipe.plan import Count, Rates, Scenes, plan_job

# a plan's task names -> the functions of the Dask keys a run's task stream shows (key_split drops a leading _)
TASK_FUNCTIONS = {"ingest": {"ingest_band"}, "statistics": {"moments", "strided", "histogram"},
                  "segment": {"segment_classical_tiles"}, "patches": {"valid_patches_in_rows"},
                  "infer": {"infer_batches"}, "stitch": {"stitch_tiles"}, "metrics": {"tile_confusions"}}


@pytest.fixture(scope="module")
def valid_scene(tmp_path_factory, sample_pixels) -> Path:
    """Derived: the SpaceNet sample without its nodata tag (no pixel is 0), so the header says every pixel is
    valid and every figure of the plan is exact."""
    assert sample_pixels.min() > 0
    return write_tif(tmp_path_factory.mktemp("valid") / "valid.tif", sample_pixels, nodata=None)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _plan(job: dict, tmp_path: Path, **kw):
    spec = job_from_dict({"output": str(tmp_path / "out"), **job}, Path.cwd())
    return plan_job(check(spec, stores=False), 2, False, Rates.load(tmp_path / "no-user-rates.yaml"), **kw), spec


def _objects_by_store(out: Path) -> dict[str, int]:
    """The run's files as the plan counts them: each store's (a work store's completion marks with it), the
    scene's and result's completion marks, and the output folder's own files."""
    found: Counter[str] = Counter()
    for path in _files(out):
        parts = path.relative_to(out).parts
        if parts[0] == "_segpipe_done":
            found["work.zarr" if parts[1] == "work.zarr" else "marks"] += 1
        elif parts[0].endswith(".zarr"):
            found[parts[0]] += 1
        else:
            found["output files"] += 1
    return dict(found)


def _stored_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and p.name != "zarr.json")


def _logical_bytes(store: Path, names: list[str]) -> int:
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return sum(group[n].nbytes for n in names)


MODEL_JOB = {"tile_size": 256, "keep_work": True, "class_names": ["background", "building"],
             "method": {"name": "unet", "model": str(DEMO_MODEL), "patch_size": 256, "overlap": 0.25, "batch_size": 4},
             "truth": {"path": str(BUILDINGS)}}
CLASSICAL_JOB = {"tile_size": 128, "pixels": "copy", "method": {"name": "kmeans"}}
BANDS_JOB = {"tile_size": 64, "pixels": "copy", "method": {"name": "otsu"}}


@pytest.fixture(scope="module")
def valid_big_scene(tmp_path_factory, sample_pixels) -> Path:
    """Derived: the SpaceNet sample mosaicked with flips to 2100 x 2300 px, no nodata tag: 64-px tiles make 33 rows,
    so the stores' shards, marks and ingest tasks take bands of two rows."""
    a = sample_pixels[0]
    row = np.concatenate([a, a[:, ::-1], a], axis=1)
    mosaic = np.concatenate([row, row[::-1], row], axis=0)[:2100, :2300]
    return write_tif(tmp_path_factory.mktemp("validbig") / "valid_big.tif", mosaic[None].copy(), nodata=None)


@pytest.mark.parametrize("job, scene", [pytest.param(MODEL_JOB, "valid_scene", id="unet", marks=pytest.mark.slow),
                                        pytest.param(CLASSICAL_JOB, "valid_scene", id="kmeans-copy"),
                                        pytest.param(BANDS_JOB, "valid_big_scene", id="otsu-copy-bands")])
def test_plan_matches_what_a_real_run_writes_and_submits(client, tmp_path, request, job, scene):
    """Tiles, tasks per stage, objects (chunks, metadata and marks: every file the run leaves, the work store kept)
    and bytes (the arrays' own sizes; on disk, compressed, no more than the plan's bound) are exact for an input
    whose header says every pixel is valid."""
    job = {**job, "input": str(request.getfixturevalue(scene))}
    plan, spec = _plan(job, tmp_path)
    assert plan.known_valid  # and no pixel is 0: a copied scene's every chunk is written too
    exact = {k: c for k, c in plan.objects.items() if not (k == "scene.zarr" and job.get("pixels") == "copy")}
    assert all(c.low == c.high for c in [*exact.values(), *plan.tasks.values()])
    assert not (tmp_path / "out").exists()  # planning wrote nothing

    with get_task_stream(client) as stream:
        run_job(check(spec), client)
    ran = Counter(key_split(t["key"]) for t in stream.data)
    for stage, count in plan.tasks.items():
        assert sum(ran[f] for f in TASK_FUNCTIONS[stage]) == count.high, (stage, ran)
    assert sum(ran.values()) == sum(c.high for c in plan.tasks.values()), ran

    out = tmp_path / "out"
    found = _objects_by_store(out)
    assert found == {k: c.high for k, c in plan.objects.items() if c.high}, found
    assert sum(found.values()) == len(_files(out))
    assert plan.tiles == len(Marks(str(out / "result.zarr"), SEGMENT_STAGE).keys())  # tiles marked done

    result = _logical_bytes(out / "result.zarr", ["class", *(["truth"] if "truth" in job else [])])
    assert result == plan.written["result.zarr"]
    assert _stored_bytes(out / "result.zarr") <= plan.written["result.zarr"]
    if "keep_work" in job:
        assert _logical_bytes(out / "work.zarr", ["logits"]) == plan.written["work.zarr"]
        assert _stored_bytes(out / "work.zarr") <= plan.written["work.zarr"]
    else:
        assert _logical_bytes(out / "scene.zarr", ["image"]) == plan.written["scene.zarr"]
    assert (out / "segmentation.tif").stat().st_size <= plan.written["exports"]


def test_a_scene_whose_pixels_decide_gets_ranges_that_hold_the_real_run(client, tmp_path, holed_scene):
    """Nodata in the input: validity, class chunks and patches depend on the pixels; the run falls in the ranges."""
    job = {"input": str(holed_scene), "tile_size": 128, "method": {"name": "otsu"}}
    plan, spec = _plan(job, tmp_path)
    assert not plan.known_valid and plan.objects["scene.zarr"].low < plan.objects["scene.zarr"].high
    run_job(check(spec), client)
    found = _objects_by_store(tmp_path / "out")
    for store, count in plan.objects.items():
        assert count.low <= found.get(store, 0) <= count.high, store
    assert found["scene.zarr"] > plan.objects["scene.zarr"].low  # validity was written where the holes are


def _cli(tmp_path: Path, job: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), **job}))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([sys.executable, "-m", "segpipe.cli", "plan", str(path), *args], capture_output=True,
                          text=True, timeout=300, env=env)


OTSU = {"input": str(SAMPLE / "spacenet_pan.tif"), "tile_size": 256, "method": {"name": "otsu"}}


def test_the_cli_prints_one_line_per_figure_and_writes_nothing(tmp_path):
    proc = _cli(tmp_path, {**OTSU, "store": "s3://no-such-bucket/runs"}, "--workers", "200", "--threads", "4",
                "--scenes", "100000", "--scene-size", "7800x7600", "--scene-bands", "7", "--price-hour", "0.1785")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    for key in ("method", "scenes", "pixels", "tiles", "cluster", "tasks", "read", "written", "objects", "requests",
                "rates", "time", "bounds", "wall", "cost", "planned"):
        assert key in lines, proc.stdout
    assert "5,928,000,000,000" in lines["pixels"]
    assert "930 per scene, 93,000,000 in all" in lines["tiles"]  # 31 x 30 tiles of 256 px
    assert "from the shipped segpipe/sample/rates.yaml" in lines["rates"]
    assert "estimate" in lines["requests"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "config").exists()


def test_gpu_says_it_does_not_help_a_classical_method(tmp_path):
    proc = _cli(tmp_path, OTSU, "--gpu")
    assert proc.returncode == 0, proc.stderr
    assert "--gpu does not help otsu" in proc.stdout
    assert "per core" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--workers", "0"], ["--workers must be at least 1"]),
    (["--scenes", "-3"], ["--scenes must be at least 1"]),
    (["--scene-size", "7800"], ["--scene-size is WIDTHxHEIGHT"]),
    (["--scene-size", "7800x7600x3"], ["--scene-size gives 3 axes"]),
    (["--rates", "missing.yaml"], ["rates file not found"]),
    (["--price-hour", "-1"], ["--price-hour must not be negative"]),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, words):
    proc = _cli(tmp_path, OTSU, *args)
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, words", [("rates: [1, 2\n", "cannot be read"),
                                         ("rates: {otsu: [1]}\n", "rates.otsu must map cpu and gpu"),
                                         ("rates: {otsu: {cpu: {segment: fast}}}\n", "must give numbers")])
def test_a_broken_rates_file_is_one_line(tmp_path, text, words):
    (tmp_path / "rates.yaml").write_text(text)
    assert_one_line_error(_cli(tmp_path, OTSU, "--rates", str(tmp_path / "rates.yaml")), words)


@pytest.mark.slow  # five otsu runs of up to 4096², and a cluster's start
def test_calibration_writes_positive_rates_that_the_next_plan_reads(tmp_path):
    rates = tmp_path / "my" / "rates.yaml"
    proc = _cli(tmp_path, OTSU, "--calibrate", "--rates", str(rates))
    assert proc.returncode == 0, proc.stderr
    entry = yaml.safe_load(rates.read_text())["rates"]["otsu"]["cpu"]
    assert all(entry[s] > 0 for s in ("ingest", "segment", "export")), entry
    assert entry["start"] >= 0 and "calibrate" in entry["measured"]
    assert proc.stdout.startswith("measured: otsu on cpu")
    assert not (tmp_path / "out").exists()
    again = _cli(tmp_path, OTSU, "--rates", str(rates))
    assert f"'otsu' on cpu from {rates}" in again.stdout, again.stdout
    other = _cli(tmp_path, {**OTSU, "method": {"name": "kmeans"}}, "--rates", str(rates))
    assert "'classical' on cpu from the shipped" in other.stdout  # no entry of its own: the family's, shipped


def test_many_scenes_scale_the_counts_and_the_client_export_can_bound_the_wall(tmp_path, valid_scene):
    job = {"input": str(valid_scene), "tile_size": 256, "method": {"name": "otsu"}}
    one, _ = _plan(job, tmp_path)
    many, _ = _plan(job, tmp_path, scenes=Scenes(1000, (7600, 7800), 7))
    assert many.pixels == 7600 * 7800 and many.tiles == 30 * 31
    assert many.read["input"] == 7600 * 7800 * 7 * 2
    # a mark per row of chunks (ingest) and per shard of the class map, a row of tiles (otsu)
    assert one.objects["marks"] == Count.exact(4 + 4)
    assert many.objects["marks"] == Count.exact(30 + 30)
    assert many.wall > many.client_seconds > 0
    assert np.isclose(many.cluster_seconds, 1000 * sum(many.seconds[s] for s in ("ingest", "segment")))
