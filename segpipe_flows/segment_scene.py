"""Prefect flow: segment one scene.

Coarse Prefect, fine Dask: each pipeline stage is one Prefect task (retries, state, artifacts);
inside a task the per-tile work fans out over the Dask cluster whose address the flow passes
along. Tasks exchange store paths and small summaries, never pixel arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import Client, default_client
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from segpipe.api import check_job
from segpipe.pipeline import (
    Checked,
    finish,
    in_process,
    run_export,
    run_ingest,
    run_instances,
    run_metrics,
    run_objects,
    run_segment,
    start,
)
from segpipe.progress import Reporter, reporting
from segpipe.runtime.cluster import connect
from segpipe.tiling.scene import Scene

if TYPE_CHECKING:  # instances (scipy) and report (pandas) load only when a run uses them, as in the CLI
    from segpipe.objects.instances import InstanceSummary

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextmanager
def dask_client(address: str) -> Iterator[Client]:
    """The flow's own Dask client when a task runs in the flow's process, else a client of its own.

    Tasks run in threads of the flow's process by default: one client serves the whole flow instead of a
    connection handshake per stage. Progress within the stage goes to the task's Prefect log.
    """
    try:
        client = default_client()
    except ValueError:
        client = None
    with reporting(Reporter(write=get_run_logger().info)):
        if client is not None and client.scheduler.address == address:
            yield client
            return
        with Client(address) as own:
            yield own


@task(name="check-inputs")
def check_task(job_path: str, overrides: dict[str, Any]) -> Checked:
    return check_job(job_path, overrides)


@task(name="ingest", retries=1)
def ingest_task(checked: Checked, scheduler: str) -> str:
    with dask_client(scheduler) as client:
        return run_ingest(checked, client).path


@task(name="segment", retries=1)
def segment_task(checked: Checked, scene: str, scheduler: str) -> str:
    with dask_client(scheduler) as client:
        return run_segment(checked, Scene(scene), client)


@task(name="instances", retries=1)
def instances_task(checked: Checked, result: str, scheduler: str) -> InstanceSummary | None:
    with dask_client(scheduler) as client:
        return run_instances(checked, result, client)


@task(name="export")
def export_task(checked: Checked, scene: str, result: str, scheduler: str) -> list[str]:
    with dask_client(scheduler) as client:
        return [str(p) for p in run_export(checked, Scene(scene), result, client)]


@task(name="tile-metrics")
def metrics_task(checked: Checked, scene: str, result: str, instances: InstanceSummary | None,
                 scheduler: str) -> dict[str, Any] | None:
    with dask_client(scheduler) as client:
        objects = run_objects(checked, Scene(scene), result, instances, client)
        report = run_metrics(checked, Scene(scene), result, client, objects)
    if report is None:
        return None
    from segpipe.report.tables import format_summary

    create_table_artifact(key="tile-iou", table=report.rows,
                          description=f"Per-tile IoU/Dice/accuracy for {Path(checked.job.input).name}")
    s = report.summary
    create_markdown_artifact(key="global-iou", markdown=(
        f"# {Path(checked.job.input).name}\n\nglobal accuracy **{s['global_accuracy']}**, mean IoU "
        f"**{s['global_mean_iou']}**\n\n" + "\n".join(f"- {k}: IoU {v}" for k, v in s["global_iou"].items())))
    get_run_logger().info(format_summary(report))
    return s


@flow(name="segment-scene")
def segment_scene(job: str, output: str | None = None, scheduler: str | None = None,
                  tile_size: int | None = None) -> dict[str, Any]:
    """Segment the scene described by the job YAML ``job``; returns output paths and global scores."""
    overrides: dict[str, Any] = {}
    if output:
        overrides["output"] = str(Path(output).resolve())
    if tile_size:
        overrides["tile_size"] = tile_size
    if scheduler:
        overrides["cluster"] = {"scheduler": scheduler}
    checked = check_task(job, overrides)
    start(checked)  # replaces other settings' stores (overwrite), as the CLI does
    with connect(checked.job.cluster, in_process=in_process(checked)) as client:
        address = client.scheduler.address
        scene = ingest_task(checked, address)
        result = segment_task(checked, scene, address)
        instances = instances_task(checked, result, address)
        exports = export_task(checked, scene, result, address)
        summary = metrics_task(checked, scene, result, instances, address)
    finish(checked)
    return {"exports": exports, "result": result, "summary": summary}


if __name__ == "__main__":
    import sys

    print(segment_scene(sys.argv[1]))
