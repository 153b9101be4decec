"""Prefect flow: process a folder (or glob) of scenes, slides or volumes, one Prefect task per item.

Items already finished from the same input file are skipped; a failing item is reported in the
table artifact and the returned summary without stopping the others. All items share one Dask
cluster; each item's tiles fan out on it.
"""

from __future__ import annotations

import os
from typing import Any

from distributed import Client
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from segpipe.api import execute
from segpipe.archive import Item, begin, discover, is_done, item_job, mark_done, read_summary
from segpipe.config import load_job
from segpipe.io.lease import OutputBusy, wait_free
from segpipe.pipeline import check, check_output_stores, leased
from segpipe.progress import Reporter
from segpipe.runtime.cluster import connect

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@task(name="segment-item", task_run_name="segment-{item.name}")
def segment_item(item: Item, job: str, scheduler: str) -> tuple[str, dict[str, Any] | None]:
    """``("done", scores)``, or ``("skipped: ...", None)`` when another run holds the item and the job does
    not say ``busy: refuse`` (``busy: wait`` waits for it)."""
    log = get_run_logger()
    checked = check(item_job(job, item), stores=False)  # the stores of an earlier input version move away first
    if checked.job.busy == "wait":
        wait_free(item.output, checked.layout.store_root, say=log.info)
    try:
        with leased(checked, log.info):  # before begin(), which may move an earlier version's results away
            moved = begin(item)
            checked = check_output_stores(checked)
            if moved is not None:
                log.info(f"{item.name}: results of an earlier input version moved to {moved}")
            with Client(scheduler) as client:
                outcome = execute(checked, client=client, reporter=Reporter(write=log.info))
            summary = outcome.report.summary if outcome.report else None
            mark_done(item, summary)
    except OutputBusy as busy:
        if checked.job.busy == "refuse":
            raise
        log.info(f"{item.name}: skipped: {busy}")
        return f"skipped: {busy}", None
    return "done", summary


def _row(item: Item, status: str, summary: dict[str, Any] | None, error: str = "") -> dict[str, Any]:
    s = summary or {}
    return {"item": item.name, "status": status, "global_mean_iou": s.get("global_mean_iou"),
            "global_dice": s.get("global_dice"),
            "global_accuracy": s.get("global_accuracy"), "output": item.output, "error": error}


@flow(name="segment-archive")
def archive(inputs: str, job: str, output: str, scheduler: str | None = None) -> list[dict[str, Any]]:
    """Segment every scene matching ``inputs`` with the job template ``job`` into ``output/<name>/``."""
    log = get_run_logger()
    items = discover(inputs, output)
    todo = [i for i in items if not is_done(i)]
    rows = {i.name: _row(i, "skipped (done before)", read_summary(i)) for i in items if i not in todo}
    cluster = load_job(job, {"input": items[0].source, "output": items[0].output}).cluster
    if scheduler:
        cluster = cluster.model_copy(update={"scheduler": scheduler})
    with connect(cluster) as client:
        futures = {i.name: (i, segment_item.submit(i, job, client.scheduler.address)) for i in todo}
        for name, (item, fut) in futures.items():
            try:
                status, summary = fut.result()
                rows[name] = _row(item, status, summary)
            except Exception as exc:  # noqa: BLE001 - one bad item must not stop the archive
                log.error(f"{name} failed: {exc}")
                rows[name] = _row(item, "failed", None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    table = [rows[i.name] for i in items]
    create_table_artifact(key="archive-items", table=table, description=f"{len(items)} item(s) from {inputs}")
    return table
