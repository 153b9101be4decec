"""An archive run: every item of an input folder or glob through one job template, on one shared cluster.

The same for the CLI (``segpipe archive``), the Python API (:func:`segpipe.api.archive`) and the Prefect flow
(``segpipe_flows.archive``, which makes each item a task and calls :func:`run_item`). At most ``in_flight``
items run at once, each with a Dask client of its own: enough to keep the workers busy while one item is
checked, exported or scored (by default twice the workers), and a bound on the threads, clients and memory of
the archive process however many items there are; the first 10^4 items no longer mean 10^4 threads.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.archive import Item, begin, discover, done_before, item_job, item_settings, mark_done, ran, verdict
from segpipe.config import ClusterSpec, load_job
from segpipe.errors import InputError
from segpipe.io.lease import OutputBusy, wait_free
from segpipe.pipeline import check, check_output_stores, leased, run_job
from segpipe.progress import Reporter, reporting

Say = Callable[[str], None]


@dataclass(frozen=True)
class ItemResult:
    """One row of an archive run: how the item ended and its global scores."""

    item: Item
    status: str
    summary: dict[str, Any] | None = None
    error: str = ""

    def row(self) -> dict[str, Any]:
        s = self.summary or {}
        return {"item": self.item.name, "status": self.status, "global_mean_iou": s.get("global_mean_iou"),
                "global_dice": s.get("global_dice"), "global_accuracy": s.get("global_accuracy"),
                "output": self.item.output, "error": self.error}


def run_item(item: Item, template: str, address: str, say: Say) -> ItemResult:
    """Run one item on the cluster at ``address`` (a client of its own); an item's own problems raise.

    Skipped when finished before from the same input with the same settings; refused (a result, not an error)
    when made with other store settings the job does not say ``overwrite`` for, or whose stores in the output
    differ; skipped when another run holds it and the job does not say ``busy: refuse`` (``wait`` waits).
    """
    from segpipe.runtime.cluster import client_at

    if item.problem:  # found at discovery (a DICOM series split across folders): this item fails alone
        raise InputError(item.problem)
    checked = check(item_job(template, item), stores=False)  # an earlier input version's stores move away first
    settings = item_settings(checked.job, checked.layout)
    before = done_before(item, settings)
    status = verdict(before, checked.job.overwrite)
    if status is not None:
        say(f"{item.name}: {status}")
        return ItemResult(item, status, before.summary if before is not None and not before.changes else None)
    if checked.job.busy == "wait":
        wait_free(item.output, checked.layout.store_root, say=say)
    try:
        with leased(checked, say):  # before begin(), which may move an earlier version's results away
            moved = begin(item)
            try:
                checked = check_output_stores(checked)
            except OutputBusy:
                raise
            except InputError as refused:
                say(f"{item.name}: refused: {refused}")
                return ItemResult(item, f"refused: {refused}")
            if moved is not None:
                say(f"{item.name}: results of an earlier input version moved to {moved}")
            with client_at(address) as client, reporting(Reporter(write=say)):
                outcome = run_job(checked, client, log=say)
            summary = outcome.report.summary if outcome.report else None
            mark_done(item, summary, settings)
    except OutputBusy as busy:
        if checked.job.busy == "refuse":
            raise
        say(f"{item.name}: skipped: {busy}")
        return ItemResult(item, f"skipped: {busy}")
    return ItemResult(item, ran(before), summary)


def failed(item: Item, exc: BaseException) -> ItemResult:
    """The row of an item that raised: its first line, as the CLI would print it."""
    return ItemResult(item, "failed", None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def archive_cluster(items: list[Item], template: str) -> ClusterSpec:
    """The cluster the template describes (read with the first item's paths)."""
    return load_job(template, {"input": items[0].source, "output": items[0].output}).cluster


def default_in_flight(spec: ClusterSpec) -> int:
    """Twice the workers (the adaptive maximum when scaling), at least 2."""
    workers = spec.adapt.maximum if spec.adapt is not None else spec.n_workers
    return max(2, 2 * workers)


def bounded(items: list[Item], work: Callable[[Item], ItemResult], in_flight: int) -> Iterator[ItemResult]:
    """``work`` on each item, at most ``in_flight`` at once, results as items finish (a failing item is a row)."""
    lock = threading.Lock()
    pending = iter(items)

    def next_item() -> Item | None:
        with lock:
            return next(pending, None)

    with concurrent.futures.ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="segpipe-item") as pool:
        running: dict[concurrent.futures.Future[ItemResult], Item] = {}

        def submit() -> None:
            item = next_item()
            if item is not None:
                running[pool.submit(work, item)] = item

        for _ in range(in_flight):
            submit()
        while running:
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                item = running.pop(fut)
                try:
                    yield fut.result()
                except Exception as exc:  # noqa: BLE001 - one bad item must not stop the archive
                    yield failed(item, exc)
                submit()


def run_archive(inputs: str, template: str, output: str, *, cluster: ClusterSpec | None = None,
                in_flight: int | None = None, say: Say = lambda _line: None) -> list[ItemResult]:
    """Every item of ``inputs`` with the job template into ``output/<name>/``, on one cluster made from the
    template's (or ``cluster``) settings and closed at the end; rows in the order of the items."""
    from segpipe.runtime.cluster import connect, describe

    items = discover(inputs, output)
    spec = cluster or archive_cluster(items, template)
    bound = in_flight or default_in_flight(spec)
    if bound < 1:
        raise InputError(f"in_flight must be at least 1 (got {bound})")
    say(f"{len(items)} item(s) from {inputs}; {describe(spec)}; at most {bound} item(s) at once")
    rows: dict[str, ItemResult] = {}
    with connect(spec, say=say) as client:
        address = client.scheduler.address
        for result in bounded(items, lambda i: run_item(i, template, address, say), bound):
            rows[result.item.name] = result
            if result.status == "failed":
                say(f"{result.item.name} failed: {result.error}")
    archive_collection(items, inputs, output)
    return [rows[i.name] for i in items]


def archive_collection(items: list[Item], inputs: str, output: str) -> Path | None:
    """``collection.json`` in the archive's output over every item's STAC Item (those an image with a CRS got,
    whether run now or before): :mod:`segpipe.report.stac_collection`."""
    from segpipe.io.layout import ITEM
    from segpipe.io.paths import is_remote
    from segpipe.report.stac_collection import write_collection
    from segpipe.report.stac_item import item_id, source_name

    if is_remote(output):
        return None
    return write_collection(Path(output), item_id(Path(output)), f"segpipe archive run over {source_name(inputs)}: "
                            "one item per scene", [Path(i.output) / ITEM for i in items],
                            title=f"segpipe archive {Path(output).resolve().name}")
