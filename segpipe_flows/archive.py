"""Prefect flow: process a folder (or glob) of scenes, slides or volumes, one Prefect task per item.

Items already finished from the same input file with the same settings are skipped; an item finished
with other settings is refused, naming what differs as the CLI does, or redone when the job says
``overwrite: true`` (:func:`segpipe.archive.verdict`); a failing item is reported in the
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
from segpipe.archive import Item, begin, discover, done_before, item_job, item_settings, mark_done, ran, verdict
from segpipe.config import load_job
from segpipe.errors import InputError
from segpipe.io.lease import OutputBusy, wait_free
from segpipe.pipeline import check, check_output_stores, leased
from segpipe.progress import Reporter
from segpipe.runtime.cluster import connect

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@task(name="segment-item", task_run_name="segment-{item.name}")
def segment_item(item: Item, job: str, scheduler: str) -> tuple[str, dict[str, Any] | None]:
    """``("done", scores)``; ``("skipped (done before)", scores)`` for an item finished from the same input with
    the same settings; ``("refused: ...", None)`` for one made with other settings that the job does not say
    ``overwrite`` for, ``("redone (settings changed: ...)", scores)`` where it does; or ``("skipped: ...",
    None)`` when another run holds the item and the job does not say ``busy: refuse`` (``busy: wait`` waits)."""
    log = get_run_logger()
    if item.problem:  # found at discovery (a DICOM series split across folders): this item fails alone
        raise InputError(item.problem)
    checked = check(item_job(job, item), stores=False)  # the stores of an earlier input version move away first
    settings = item_settings(checked.job, checked.layout)
    before = done_before(item, settings)
    status = verdict(before, checked.job.overwrite)
    if status is not None:
        log.info(f"{item.name}: {status}")
        return status, before.summary if before is not None and not before.changes else None
    if checked.job.busy == "wait":
        wait_free(item.output, checked.layout.store_root, say=log.info)
    try:
        with leased(checked, log.info):  # before begin(), which may move an earlier version's results away
            moved = begin(item)
            try:  # stores of other settings not marked done (a run of them cut short) are refused as the CLI does
                checked = check_output_stores(checked)
            except OutputBusy:
                raise
            except InputError as refused:
                log.info(f"{item.name}: refused: {refused}")
                return f"refused: {refused}", None
            if moved is not None:
                log.info(f"{item.name}: results of an earlier input version moved to {moved}")
            with Client(scheduler) as client:
                outcome = execute(checked, client=client, reporter=Reporter(write=log.info))
            summary = outcome.report.summary if outcome.report else None
            mark_done(item, summary, settings)
    except OutputBusy as busy:
        if checked.job.busy == "refuse":
            raise
        log.info(f"{item.name}: skipped: {busy}")
        return f"skipped: {busy}", None
    return ran(before), summary


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
    rows: dict[str, dict[str, Any]] = {}
    cluster = load_job(job, {"input": items[0].source, "output": items[0].output}).cluster
    if scheduler:
        cluster = cluster.model_copy(update={"scheduler": scheduler})
    with connect(cluster) as client:
        futures = {i.name: (i, segment_item.submit(i, job, client.scheduler.address)) for i in items}
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
