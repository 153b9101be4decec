"""Land cover period after period: one mosaic job per month into ``<output>/period=YYYY-MM/``, and the change
against the period before.

Why a period is a folder of its own with a mark: a scheduled run asks "what does the month that ended hold?".
The mark (``_segpipe_done/period.json``) records the items the period's mosaic was made from, so the next run
of the same month skips when nothing new arrived and recomputes the period (replacing its stores) when an item
arrived late. Each period reports its class areas (``metrics/classes.csv``, with or without truth); the change
product compares the period with the latest earlier period that finished; both lie on one grid because the job
fixes the area (bbox or aoi), CRS and resolution.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from affine import Affine
from rasterio.crs import CRS

from segpipe.config import JobSpec, MosaicSpec, load_job
from segpipe.errors import InputError
from segpipe.io.layout import ITEM, result_path
from segpipe.io.lease import OutputBusy, wait_free
from segpipe.io.store import write_atomic
from segpipe.pipeline import Checked, check, check_output_stores, leased

if TYPE_CHECKING:
    from distributed import Client

    from segpipe.pipeline import Outcome
    from segpipe.progress import Reporter
    from segpipe.report.areas import ClassAreas
    from segpipe.report.change import ChangeReport

PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
FOLDER = "period={}"
MARK = "_segpipe_done/period.json"


def period_label(period: str, today: date | None = None) -> str:
    """``YYYY-MM`` as given, or ``last``: the month that ended before ``today`` (UTC by default)."""
    if period == "last":
        d = today or datetime.now(UTC).date()
        return f"{d.year - (d.month == 1)}-{12 if d.month == 1 else d.month - 1:02d}"
    if not PERIOD.match(period):
        raise InputError(f"period {period!r} is not a month (YYYY-MM) or 'last'")
    return period


def period_folder(root: str | Path, label: str) -> Path:
    return Path(root) / FOLDER.format(label)


def period_job(job: JobSpec, label: str) -> JobSpec:
    """The job for one month: its mosaic's datetime is the month, its output (and store) the period's folder."""
    if not isinstance(job.input, MosaicSpec):
        raise InputError("a period run needs a mosaic input (input: with stac: or rasters:), whose datetime the "
                         "period sets")
    if job.input.rasters is not None:
        raise InputError("a period run selects items by date: give a STAC input (rasters have no dates)")
    pj = job.model_copy(deep=True)
    pj.input.datetime = label
    pj.output = period_folder(job.output, label)
    if job.store is not None:
        pj.store = f"{job.store.rstrip('/')}/{FOLDER.format(label)}"
    return pj


def series_grid(root: str | Path, label: str) -> tuple[CRS, Affine] | None:
    """The grid of a land-cover series: the earliest finished period's other than ``label`` (from its mark), or
    None before any period recorded one."""
    for folder in sorted(Path(root).glob(FOLDER.format("*"))):
        mark = _read_mark(folder)
        if folder.name != FOLDER.format(label) and mark is not None and mark.get("grid"):
            return CRS.from_wkt(mark["grid"]["crs"]), Affine(*mark["grid"]["transform"])
    return None


def _off_series(c: Checked, crs: CRS, transform: Affine) -> str | None:
    """Why this period's grid is not on the series' lattice, when only the pixel edges' phase differs (another
    CRS or pixel size is the job's own doing, refused by the change product naming it)."""
    from segpipe.io.mosaic import off_grid

    grid = c.info.grid
    if crs != grid.crs or abs(abs(transform.a) - abs(grid.transform.a)) > 1e-9 * abs(grid.transform.a):
        return None
    return off_grid(crs, transform, grid)


def previous_period(root: str | Path, label: str) -> str | None:
    """The latest earlier period under ``root`` that finished (has its mark), as its label."""
    done = []
    for folder in Path(root).glob(FOLDER.format("*")):
        found = folder.name.split("=", 1)[1]
        if PERIOD.match(found) and found < label and (folder / MARK).is_file():
            done.append(found)
    return max(done) if done else None


@dataclass
class PeriodOutcome:
    """What a period run did: ``done``, ``unchanged`` (nothing new since its last run), ``empty`` (no items) or
    ``busy`` (another run holds the period: skipped, as the job's ``busy`` says)."""

    label: str
    status: str
    folder: Path
    outcome: Outcome | None = None
    change: ChangeReport | None = None
    previous: str | None = None
    items: int = 0
    areas: ClassAreas | None = None  # pixels and area per class: the period's land-cover report

    def summary(self) -> dict[str, Any]:
        """A plain summary for logs and Prefect artifacts."""
        s: dict[str, Any] = {"period": self.label, "status": self.status, "folder": str(self.folder),
                             "items": self.items, "previous": self.previous}
        if self.outcome is not None:
            s["exports"] = [str(p) for p in self.outcome.exports]
            if self.outcome.report is not None:
                s["global_mean_iou"] = self.outcome.report.summary.get("global_mean_iou")
        if self.areas is not None:
            s["classes"] = self.areas.summary()["classes"]
        if self.change is not None:
            s["change"] = {"changed_fraction": self.change.changed_fraction,
                           "files": {k: str(p) for k, p in self.change.files.items()}}
        return s


@dataclass
class PlannedPeriod:
    """A period checked and ready to run, or known to need no run (``checked`` None)."""

    label: str
    status: str
    folder: Path
    checked: Checked | None
    items: int = 0
    recompute: bool = False  # the period finished before from other items: its stores are replaced
    note: str | None = None  # said once when the run starts: the period was put on the series' grid


def plan_period(job: JobSpec | str | Path, period: str, today: date | None = None) -> PlannedPeriod:
    """Check a period's job; decide whether it runs. Writes nothing; bad input raises :class:`InputError`."""
    from segpipe.io.mosaic import NoItems

    base = job if isinstance(job, JobSpec) else load_job(job)
    label = period_label(period, today)
    pj = period_job(base, label)
    folder = Path(pj.output)
    try:
        c = check(pj, stores=False)
        note = None
        series = series_grid(Path(base.output), label)
        why = _off_series(c, *series) if series is not None else None
        if why:
            # Its items' own grid would move this period off the series' (whose change products compare pixel
            # by pixel): anchored on the series' grid instead, whatever the job's anchor.
            _, t = series
            res = abs(t.a)
            pj.input.anchor = ((t.c / res) % 1.0, (t.f / res) % 1.0)
            note = (f"its items' grid is not the series' ({why}); put on the series' grid, "
                    "its items resampled")
            c = check(pj, stores=False)
    except NoItems:
        return PlannedPeriod(label, "empty", folder, None)
    n = len(c.info.mosaic.items)
    if pj.busy == "wait":  # the job says so: a schedule firing while this period still runs waits for it
        wait_free(folder, c.layout.store_root)
    mark = _read_mark(folder)
    scene_fp = c.layout.scene_fp
    if mark is not None and mark.get("scene") == scene_fp:
        return PlannedPeriod(label, "unchanged", folder, None, n)
    recompute = mark is not None and _without_items(mark.get("scene")) == _without_items(scene_fp)
    if recompute:  # the same job over new items: this period's results are replaced, by design
        c.job.overwrite = True
    try:
        checked = check_output_stores(c)
    except OutputBusy as busy:  # the last run of this period still goes on: skipped, unless the job says refuse
        if pj.busy == "refuse":
            raise
        return PlannedPeriod(label, "busy", folder, None, n, note=str(busy))
    return PlannedPeriod(label, "run", folder, checked, n, recompute, note)


def _without_items(scene_fp: dict[str, Any] | None) -> Any:
    if not scene_fp:
        return None
    mosaic = {k: v for k, v in scene_fp.get("mosaic", {}).items() if k != "items"}
    return {**scene_fp, "mosaic": mosaic}


def _read_mark(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARK).read_text())
    except (OSError, ValueError):
        return None


def skip_reason(plan: PlannedPeriod) -> str:
    """Why a planned period does not run, in a few words for the log and the flow's table."""
    if plan.status == "empty":
        return "no items; nothing to do"
    if plan.status == "busy":
        return f"skipped: {plan.note}"
    return f"nothing new since its last run ({plan.items} item(s)); skipped"


def run_period(plan: PlannedPeriod, client: Client | None = None, reporter: Reporter | None = None) -> PeriodOutcome:
    """Run a planned period and compare it with the period before; marks the period done.

    On ``client``, or on the cluster the job's settings describe (started here only when there is work).
    """
    from segpipe.api import cluster_line
    from segpipe.pipeline import in_process
    from segpipe.runtime.cluster import connect

    say = reporter.say if reporter is not None else (lambda _line: None)
    if plan.checked is None:
        say(f"period {plan.label}: " + skip_reason(plan))
        return PeriodOutcome(plan.label, plan.status, plan.folder, items=plan.items)
    with contextlib.ExitStack() as held:
        try:  # the whole period under its lease: its run, class areas, change product and mark
            held.enter_context(leased(plan.checked, say))
        except OutputBusy as busy:  # taken between the plan and now
            if plan.checked.job.busy == "refuse":
                raise
            say(f"period {plan.label}: skipped: {busy}")
            return PeriodOutcome(plan.label, "busy", plan.folder, items=plan.items)
        if client is not None:
            return _run(plan, client, reporter, say)
        if not plan.checked.job.cluster.creates:  # a created cluster is announced once checked (connect)
            say(cluster_line(plan.checked))
        with connect(plan.checked.job.cluster, in_process=in_process(plan.checked), say=say) as own:
            return _run(plan, own, reporter, say)


def _run(plan: PlannedPeriod, client: Client, reporter: Reporter | None, say: Any) -> PeriodOutcome:
    from segpipe.api import execute

    c = plan.checked
    assert c is not None
    root = plan.folder.parent
    if plan.recompute:
        say(f"period {plan.label}: the items changed since its last run; recomputing")
    if plan.note:
        say(f"period {plan.label}: {plan.note}")
    outcome = execute(c, client=client, reporter=reporter)
    from segpipe.report.areas import class_areas, write_class_areas

    areas = class_areas(outcome.result, client, c.job.tile_size)  # the period's land-cover report
    write_class_areas(areas, plan.folder / "metrics")
    previous = previous_period(root, plan.label)
    change = None
    if previous is not None:
        from segpipe.report.change import change_product

        say(f"period {plan.label}: change against {previous}")
        before = result_path(_store_root(c.job, previous, root))
        change = change_product(before, outcome.result, plan.folder / "change", client,
                                tile_size=c.job.tile_size, before_label=previous, after_label=plan.label)
    if outcome.item is not None:
        series_item(outcome.item, root, plan.folder, change)
    grid = {"crs": c.info.crs.to_wkt(), "transform": list(c.info.mosaic.transform)[:6]}
    write_atomic(plan.folder / MARK, json.dumps({"period": plan.label, "scene": c.layout.scene_fp,
                                                 "previous": previous, "grid": grid}))
    return PeriodOutcome(plan.label, "done", plan.folder, outcome, change, previous, plan.items, areas)


def series_item(item: Path, root: Path, folder: Path, change: ChangeReport | None) -> Path | None:
    """The period's Item gets its class areas and change maps (:mod:`segpipe.report.stac_collection`), and the
    series' ``collection.json`` at ``root`` lists every period's Item as it is now."""
    from segpipe.report.stac_collection import add_assets, write_collection
    from segpipe.report.stac_item import item_id

    extra = [folder / "metrics" / "classes.csv", folder / "metrics" / "classes.json"]
    classes = None
    if change is not None:
        extra += list(change.files.values())
        classes = {change.files["cog"].name: change.legend}
    add_assets(item, extra, classes)
    items = [f / ITEM for f in sorted(Path(root).glob(FOLDER.format("*"))) if PERIOD.match(f.name[7:])]
    return write_collection(root, item_id(root), f"Land cover of {Path(root).resolve().name}, one item per month "
                            "(the change since the previous month as assets of the later one)", items,
                            title=f"segpipe land-cover series {Path(root).resolve().name}")


def _store_root(job: JobSpec, label: str, root: Path) -> str | Path:
    """Where an earlier period's stores live: beside its folder, or under the job's store prefix."""
    if job.store is None:
        return period_folder(root, label)
    prefix = job.store.rstrip("/").rsplit("/", 1)[0]
    return f"{prefix}/{FOLDER.format(label)}"
