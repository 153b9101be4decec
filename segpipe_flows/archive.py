"""Prefect flow: process a folder (or glob) of scenes, slides or volumes, one Prefect task per item.

Items already finished from the same input file with the same settings are skipped; an item finished
with other settings is refused, naming what differs as the CLI does, or redone when the job says
``overwrite: true`` (:func:`segpipe.archive.verdict`); a failing item is reported in the
table artifact and the returned summary without stopping the others. All items share one Dask
cluster; each item's tiles fan out on it. At most ``in_flight`` items run at once (default twice the workers):
the item logic is the library's (:mod:`segpipe.archive_run`), shared with ``segpipe archive``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed

from segpipe.archive import Item, discover
from segpipe.archive_run import (
    ItemResult,
    archive_cluster,
    archive_collection,
    default_in_flight,
    failed,
    run_item,
)
from segpipe.runtime.cluster import connect

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@task(name="segment-item", task_run_name="segment-{item.name}")
def segment_item(item: Item, job: str, scheduler: str) -> tuple[str, dict[str, Any] | None]:
    """``(status, scores)`` of one item (:func:`segpipe.archive_run.run_item`)."""
    done = run_item(item, job, scheduler, get_run_logger().info)
    return done.status, done.summary


@flow(name="segment-archive")
def archive(inputs: str, job: str, output: str, scheduler: str | None = None,
            in_flight: int | None = None) -> list[dict[str, Any]]:
    """Segment every scene matching ``inputs`` with the job template ``job`` into ``output/<name>/``."""
    log = get_run_logger()
    items = discover(inputs, output)
    cluster = archive_cluster(items, job)
    if scheduler:
        cluster = cluster.at(scheduler)
    bound = in_flight or default_in_flight(cluster)
    results: dict[str, ItemResult] = {}
    with connect(cluster, say=log.info) as client:
        address = client.scheduler.address
        waiting = iter(items)
        running = {}
        for item in itertools.islice(waiting, bound):
            running[segment_item.submit(item, job, address)] = item
        while running:
            fut = next(as_completed(list(running)))
            item = running.pop(fut)
            try:
                status, summary = fut.result()
                results[item.name] = ItemResult(item, status, summary)
            except Exception as exc:  # noqa: BLE001 - one bad item must not stop the archive
                log.error(f"{item.name} failed: {exc}")
                results[item.name] = failed(item, exc)
            nxt = next(waiting, None)
            if nxt is not None:
                running[segment_item.submit(nxt, job, address)] = nxt
    archive_collection(items, inputs, output)  # collection.json over the items' STAC Items, as the CLI writes it
    table = [results[i.name].row() for i in items]
    create_table_artifact(key="archive-items", table=table, description=f"{len(items)} item(s) from {inputs}")
    return table
