"""Prefect flow: one month of a land-cover series (a STAC mosaic), and its change against the month before.

A scheduled run takes the period that ended (``period="last"``), skips when that month has no items or
nothing new since its last run, and otherwise writes ``<output>/period=YYYY-MM/`` (COG, report, mosaic.json)
with ``change/`` (transition COG and matrix) against the latest earlier period. The work is
:mod:`segpipe.periods`; this flow adds Prefect's state, retries and artifacts around it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from segpipe.config import load_job
from segpipe.periods import PlannedPeriod, plan_period, run_period, skip_reason
from segpipe.pipeline import in_process
from segpipe.progress import Reporter
from segpipe.runtime.cluster import connect
from segpipe_flows.segment_scene import dask_client

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@task(name="plan-period")
def plan_task(job: str, output: str | None, period: str) -> PlannedPeriod:
    overrides = {"output": str(Path(output).resolve())} if output else {}
    return plan_period(load_job(job, overrides), period)


@task(name="segment-period", retries=1, task_run_name="segment-period-{plan.label}")
def period_task(plan: PlannedPeriod, scheduler: str) -> dict[str, Any]:
    with dask_client(scheduler) as client:
        done = run_period(plan, client, Reporter(write=get_run_logger().info))
    if done.change is not None:
        from segpipe.report.change import format_markdown

        create_table_artifact(key="transitions", table=done.change.table(),
                              description=f"Class transitions {done.previous} -> {done.label} (pixels, area)")
        create_markdown_artifact(key="change", markdown=format_markdown(done.change))
    return done.summary()


@flow(name="landcover-period")
def landcover_period(job: str, output: str | None = None, period: str = "last",
                     scheduler: str | None = None) -> dict[str, Any]:
    """Segment the month ``period`` (YYYY-MM, or ``last``: the month that ended) of the job's STAC mosaic."""
    log = get_run_logger()
    plan = plan_task(job, output, period)
    if plan.checked is None:
        log.info(f"period {plan.label}: {skip_reason(plan)}")
        return {"period": plan.label, "status": plan.status, "folder": str(plan.folder), "items": plan.items,
                **({"note": plan.note} if plan.note else {})}
    cluster = plan.checked.job.cluster
    if scheduler:
        cluster = cluster.at(scheduler)
    with connect(cluster, in_process=in_process(plan.checked) and not scheduler, say=log.info) as client:
        return period_task(plan, client.scheduler.address)
