"""Prefect flow: segment one scene.

Coarse Prefect, fine Dask: each pipeline stage is one Prefect task (retries, state, artifacts);
inside a task the per-tile work fans out over the Dask cluster whose address the flow passes
along. Tasks exchange store paths and small summaries, never pixel arrays.

The stages and their order are :func:`segpipe.pipeline.run_job`'s, the CLI's and the API's: the flow only
passes a runner that makes each stage a task, so the outputs (``summary.json``'s ``stage_seconds`` and mosaic
record included) cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import Client, default_client
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from segpipe.api import check_job
from segpipe.pipeline import Checked, StageRunner, in_process, leased, run_job
from segpipe.progress import Reporter, reporting
from segpipe.runtime.cluster import client_at, connect

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Stages that are retried once: they resume from their completion marks, so a retry redoes only what is missing.
RETRIES = {"ingest": 1, "segment": 1, "instances": 1}


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
        with client_at(address) as own:
            yield own


@task(name="check-inputs")
def check_task(job_path: str, overrides: dict[str, Any]) -> Checked:
    return check_job(job_path, overrides)


@task(name="stage", cache_policy=NO_CACHE)  # its input is the stage's work, a closure: nothing to cache by
def stage_task(work: Callable[[Client], Any], scheduler: str) -> Any:
    """One pipeline stage as a Prefect task, on a client of the cluster at ``scheduler``."""
    with dask_client(scheduler) as client:
        return work(client)


def as_tasks(scheduler: str) -> StageRunner:
    """The runner that makes each of :func:`run_job`'s stages a task named after it."""
    def run(name: str, work: Callable[[Client], Any]) -> Any:
        return stage_task.with_options(name=name, retries=RETRIES.get(name, 0))(work, scheduler)
    return run


def publish_metrics(checked: Checked, report: Any) -> None:
    """The per-tile table and the global scores as Prefect artifacts, and the summary in the flow's log."""
    from segpipe.report.tables import format_summary

    name = Path(checked.job.input).name
    create_table_artifact(key="tile-iou", table=report.rows, description=f"Per-tile IoU/Dice/accuracy for {name}")
    s = report.summary
    create_markdown_artifact(key="global-iou", markdown=(
        f"# {name}\n\nglobal accuracy **{s['global_accuracy']}**, mean IoU "
        f"**{s['global_mean_iou']}**\n\n" + "\n".join(f"- {k}: IoU {v}" for k, v in s["global_iou"].items())))
    get_run_logger().info(format_summary(report))


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
        overrides["cluster"] = {"kind": "scheduler", "scheduler": scheduler, "adapt": None, "slurm": None,
                                "gateway": None, "kubernetes": None}
    checked = check_task(job, overrides)
    log = get_run_logger().info
    with leased(checked, log), connect(checked.job.cluster, in_process=in_process(checked), say=log) as client:
        outcome = run_job(checked, client, log=log, runner=as_tasks(client.scheduler.address))
    if outcome.report is not None:
        publish_metrics(checked, outcome.report)
    return {"exports": [str(p) for p in outcome.exports], "result": outcome.result,
            "summary": outcome.report.summary if outcome.report is not None else None}


if __name__ == "__main__":
    import sys

    print(segment_scene(sys.argv[1]))
