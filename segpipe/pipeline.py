"""The whole job as plain functions over paths: check -> ingest -> segment -> export -> metrics.

Each stage is callable on its own; :func:`run_job` chains them, one sequence for the CLI, the API and
the Prefect flow (which passes a :data:`StageRunner` that makes each stage a task). :func:`check` does
every validation before anything is written, so bad input never leaves a partial output behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import Client

from segpipe import progress
from segpipe.config import JobSpec
from segpipe.errors import InputError
from segpipe.geometry import SceneGeometry
from segpipe.io import exports
from segpipe.io.layout import RunLayout
from segpipe.io.lease import check_free, output_lease
from segpipe.io.paths import is_remote
from segpipe.io.raster import RasterInfo
from segpipe.io.scene import Scene
from segpipe.io.slide import level_for
from segpipe.io.store import (
    changed_store_error,
    consolidate,
    drop_consolidated,
    open_or_create,
    remove_store,
    store_changes,
    write_atomic,
)
from segpipe.io.truth import Truth, check_truth
from segpipe.methods.segment import MethodPlan, plan_method, result_fingerprint, segment
from segpipe.runtime.placement import cpu_stage
from segpipe.tiling.grid import TileGrid, TileRun, TileTask
from segpipe.tiling.ingest import fingerprint, ingest, job_source, selected_bands, source_info

if TYPE_CHECKING:  # the later stages are imported where they run: start-up pays only for what a job uses
    from segpipe.objects.instances import InstanceSummary
    from segpipe.objects.measure import ObjectReport
    from segpipe.report.tables import MetricsReport


@dataclass
class Checked:
    """A job whose inputs have all been validated, and its run's layout."""

    job: JobSpec
    info: RasterInfo
    plan: MethodPlan
    truth: Truth | None
    layout: RunLayout
    replace: bool = False  # the output holds stores from other settings, and the job says overwrite

    @property
    def geometry(self) -> SceneGeometry:
        return self.info.grid

    @property
    def exports(self) -> list[str]:
        return list(self.layout.exports)

    @property
    def instance_classes(self) -> list[int]:
        spec = self.job.instances
        return list(spec.classes) if spec and spec.classes else list(range(1, self.plan.n_classes))

    @property
    def connectivity(self) -> int:
        """scipy connectivity: 1 = face neighbours, ndim = full (diagonals included)."""
        spec = self.job.instances
        return len(self.info.shape) if spec is None or spec.connectivity == "full" else 1


def plan_layout(job: JobSpec, info: RasterInfo, plan: MethodPlan) -> RunLayout:
    """The run's layout (:class:`~segpipe.io.layout.RunLayout`): its paths, the exports it writes, and the
    fingerprints of its stores, each made once here."""
    scene_fp = fingerprint(job, info)
    result_fp = result_fingerprint(job, plan, scene_fp)
    names = tuple(job.exports) if job.exports is not None else tuple(exports.defaults(info.kind))
    polygons = job.instances is not None and info.grid.has_polygons
    return RunLayout(Path(job.output), job.store_root, names, scene_fp, result_fp,
                     None if job.instances is None else instances_fingerprint(result_fp, job), polygons)


def instances_fingerprint(result_fp: dict[str, Any], job: JobSpec) -> dict[str, Any]:
    """What the instance work store depends on: the result and the instance settings."""
    return {"result": result_fp, "instances": job.instances.model_dump(mode="json")}


def check_output_stores(c: Checked) -> Checked:
    """An output another run holds is refused (:mod:`segpipe.io.lease`); stores in the output made from other
    input or settings are an error naming what differs, before the cluster starts, unless the job says
    ``overwrite``: then they are replaced when the run starts."""
    lay = c.layout
    check_free(lay.output, lay.store_root)
    wanted = [("scene store", lay.scene_store, lay.scene_fp), ("result store", lay.result_store, lay.result_fp)]
    if lay.instances_fp is not None:
        wanted.append(("instance work store", lay.instances_store, lay.instances_fp))
    for what, path, fp in wanted:
        changed = store_changes(path, fp, what)
        if changed and not c.job.overwrite:
            raise changed_store_error(what, path, changed)
        if changed:
            c.replace = True
            break
    return c


def _pixel_size(info: RasterInfo) -> tuple[float, ...] | None:
    """The scene's pixel size for a model's resolution; None for a raster without a CRS (pixel units)."""
    return None if info.grid.units == "px" else info.pixel_size


def check(job: JobSpec, stores: bool = True) -> Checked:
    """Validate input image or volume, bands, method/model, tiling, exports and ground truth; writes nothing.

    With ``stores``, also the stores already in the output (:func:`check_output_stores`).
    """
    info = job_source(job, job.level or 0)
    geometry = info.grid
    if job.level is not None and not geometry.has_levels:
        raise InputError(f"level applies to whole-slide images; this input is a {info.kind}")
    bands = selected_bands(job, info)
    misfit = exports.misfit(list(job.exports or []), info.kind, _source_format(info))
    if misfit:
        raise InputError(misfit)
    plan = plan_method(job, len(bands), len(info.shape), _pixel_size(info), grid=geometry)
    unfit = exports.settings_problem(list(job.exports or []), job.export_settings(), plan.class_names)
    if unfit:
        raise InputError(unfit)
    if geometry.has_levels and job.level is None and plan.model is not None and plan.model.resolution:
        # The pyramid level nearest the model's resolution (from finer) is read, then resampled to it.
        level = level_for(info.path, min(plan.model.resolution), job.mpp and (job.mpp[0], job.mpp[1]))
        if level:
            from segpipe.models.load import model_scale

            info = source_info(job.input, level, job.mpp)
            plan.scale = model_scale(plan.model, str(job.method.model), _pixel_size(info))
    if job.tile_size > max(info.shape) and "tile_size" in job.model_fields_set:
        # Asked for explicitly, a tile larger than the scene is probably a mistake; the default (512) is
        # simply one tile on a small scene.
        raise InputError(f"tile_size {job.tile_size} is larger than the scene ({info.describe()})")
    if job.probabilities and plan.model is None and not (plan.classical and plan.classical.soft):
        raise InputError(f"probabilities come from a model or fcm memberships; method {job.method.name!r} "
                         "gives classes only")
    truth = check_truth(job.truth, info, plan.class_names, plan.n_classes) if job.truth else None
    if job.instances and job.instances.classes:
        bad = [k for k in job.instances.classes if not 0 <= k < plan.n_classes]
        if bad:
            raise InputError(f"instances.classes {bad} are not classes of this method (0..{plan.n_classes - 1})")
    out = Path(job.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a folder: {out}")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"output path {out} lies under {blocking}, which is a file, not a folder")
    for folder in dict.fromkeys([out, *([] if is_remote(job.store_root) else [Path(job.store_root)])]):
        check_writable(folder)
    checked = Checked(job, info, plan, truth, plan_layout(job, info, plan))
    return check_output_stores(checked) if stores else checked


def _source_format(info: RasterInfo) -> str:
    """The input's format as the exports' registry names it: a volume is a DICOM series or a NIfTI file (a
    DICOM-SEG refers back to the series' slices), anything else (an array given to the API) its reader's format."""
    if info.kind != "volume":
        return info.source_format
    from segpipe.io.volume import is_dicom_series, is_nifti

    return "nifti" if is_nifti(info.path) else "dicom" if is_dicom_series(info.path) else info.source_format


def check_writable(folder: Path) -> None:
    """Refuse an output folder this process cannot write, judged at the folder or, where it does not exist yet,
    at its nearest existing parent (where ``mkdir`` would make it).

    Why: otherwise the first write fails deep in ingest with a PermissionError traceback, and ``validate`` says
    "valid". ``os.access`` also answers for root where no permission bit would stop it: a read-only mount
    (EROFS) and an immutable folder (``chattr +i``).
    """
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        where = "it" if existing == folder else f"{existing}, where it would be made,"
        raise InputError(f"output folder {folder} cannot be written: {where} is not writable "
                         "(permissions, a read-only mount or an immutable folder)")


# Scenes up to this many pixels (voxels) run a classical method in threads of the client's process when the
# cluster's ``processes`` is auto. Measured on a 16.8 Mpx otsu job (2 cores): threads saved 1.9 s of worker
# start and 0.6 s of shutdown and lost 0.9 s in segmentation to the GIL; the loss grows with the scene.
IN_PROCESS_PIXELS = 2**25


def in_process(c: Checked) -> bool:
    """Whether the job's LocalCluster should be threads of this process rather than worker processes."""
    spec = c.job.cluster
    if spec.kind != "local" or spec.processes == "yes":
        return False
    if spec.processes == "no":
        return True
    return c.plan.model is None and math.prod(c.info.shape) <= IN_PROCESS_PIXELS


@cpu_stage
def run_ingest(c: Checked, client: Client) -> Scene:
    return ingest(c.job, c.info, client, c.layout)


@cpu_stage
def run_segment(c: Checked, scene: Scene, client: Client) -> str:
    return segment(c.job, scene, c.plan, c.layout, client)


@cpu_stage
def run_export(c: Checked, scene: Scene, result: str, client: Client, names: list[str] | None = None) -> list[Path]:
    """Write the requested exports (:data:`segpipe.io.exports.EXPORTS`), or those of them in ``names``; each file
    is renamed into place only when complete."""
    run = exports.ExportRun(result=result, scene=scene.path, output=c.layout.output,
                            class_names=c.plan.class_names, probabilities=c.job.probabilities, client=client,
                            source=c.info.path, method=c.plan.name, model=c.plan.model is not None,
                            settings=c.job.export_settings(),
                            objects=c.layout.polygons_path if c.layout.polygons else None)
    return exports.write(c.exports if names is None else names, run)


@cpu_stage
def run_instances(c: Checked, result: str, client: Client) -> InstanceSummary | None:
    """Connected components of the instance classes with global IDs into ``result.zarr/instances``."""
    from segpipe.objects.instances import label_instances
    from segpipe.objects.split import split_instances

    if c.job.instances is None:
        return None
    work = c.layout.instances_store
    group = open_or_create(work, c.layout.instances_fp, "instance work store")
    spec = c.job.instances
    if spec.split == "watershed":
        return split_instances(result, group, work, c.job.tile_size, c.instance_classes, c.connectivity,
                               spec.marker_distance, spec.halo, client)
    return label_instances(result, group, work, c.job.tile_size, c.instance_classes, c.connectivity, client,
                           unit=c.geometry.tile_word)


@cpu_stage
def run_objects(c: Checked, scene: Scene, result: str, inst: InstanceSummary | None,
                client: Client) -> ObjectReport | None:
    """Object statistics and matches (metrics/objects.*) and, for 2-D scenes, polygons (objects.gpkg)."""
    if inst is None:
        return None
    from segpipe.objects.measure import object_report, tile_objects, tile_polygons, truth_classes, write_polygons
    from segpipe.report.tables import write_object_report

    grid = TileGrid(scene.shape, c.job.tile_size)
    tasks = TileTask.each(scene.shape, c.job.tile_size, scene=scene.path, result=result)
    unit = scene.geometry.tile_word
    parts = progress.counted(client, "objects", [client.submit(tile_objects, t, truth=c.truth, pure=False)
                                                 for t in tasks], unit)
    report = object_report(parts, grid, inst.classes, c.job.instances.match_iou, c.plan.class_names,
                           truth_class=truth_classes(c.truth), ap_classes=c.instance_classes)
    write_object_report(report, c.layout.metrics_dir, scene.geometry)
    if c.layout.polygons:
        pieces = progress.counted(client, "polygons", [client.submit(tile_polygons, t, transform=scene.transform,
                                                                     connectivity=c.connectivity, pure=False)
                                                       for t in tasks], unit)
        write_polygons([p for part in pieces for p in part], report.objects, scene.crs, c.layout.polygons_path)
    return report


@cpu_stage
def run_metrics(c: Checked, scene: Scene, result: str, client: Client,
                objects: ObjectReport | None = None) -> MetricsReport | None:
    """Per-tile (per-block) confusion matrices on the cluster, report files written atomically."""
    if c.truth is None:
        return None
    from segpipe.io.result import add_truth_array
    from segpipe.report.html import write_html_report
    from segpipe.report.metrics import tile_confusions
    from segpipe.report.tables import add_object_columns, build_report, write_report

    add_truth_array(result, scene.shape, scene.chunk)
    grid = TileGrid(scene.shape, c.job.tile_size)
    each = TileRun.of(scene.shape, c.job.tile_size, scene=scene.path, result=result)
    futures = [client.submit(tile_confusions, each.with_tiles([t.index]), truth=c.truth, n_classes=c.plan.n_classes,
                             pure=False) for t in grid]
    with progress.stage("metrics", len(futures), scene.geometry.tile_word) as advance:
        confusions = {key: cm for part in progress.gather(client, futures, advance) for key, cm in part}
    report = build_report(confusions, grid, scene.geometry, c.plan.class_names)
    if objects is not None:
        add_object_columns(report, objects)
    write_report(report, c.layout.metrics_dir)
    write_html_report(report, scene.path, result, c.layout.html_path, f"segpipe: {Path(c.info.path).name}")
    return report


def start(c: Checked) -> None:
    """Before the first stage: replace stores made from other settings (``overwrite``), and take the result
    store's consolidated metadata away while this run may add arrays to it (:func:`finish` writes it anew)."""
    if c.replace:
        for store in c.layout.stores():
            remove_store(store)
    drop_consolidated(c.layout.result_store)


def remove_stale_outputs(c: Checked, since: float) -> None:
    """After a successful overwrite: the output files (:data:`segpipe.io.layout.OUTPUT_FILES`) this run did not
    write again, i.e. last written before ``since``. Only then: a failed run leaves the previous files as they
    were."""
    for path in c.layout.output_files():
        if path.exists() and path.stat().st_mtime < since:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def finish(c: Checked) -> None:
    """After a successful run: drop the logits/region work store unless the job keeps it (``keep_work``), and
    consolidate the result store's metadata so that plain ``xr.open_zarr`` opens it quietly in one read.

    The result store's completion marks say every tile is final, so a rerun never needs the work store again.
    """
    if not c.job.keep_work:
        remove_store(c.layout.work_store)
    consolidate(c.layout.result_store)


@dataclass
class Outcome:
    """Where a run put its results."""

    scene: str
    result: str
    exported: list[Path]  # the export stage's files
    report: MetricsReport | None
    objects: ObjectReport | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage
    polygons: Path | None = None  # the objects' polygons (objects.gpkg), where the run wrote them
    item: Path | None = None  # the run's STAC Item (item.json), where it has one (an image with a CRS)

    @property
    def exports(self) -> list[Path]:
        """Every result file for users' tools: the exports, then the objects' polygons."""
        return [*self.exported, *([self.polygons] if self.polygons else [])]

    @property
    def cog(self) -> Path | None:
        return next((p for p in self.exports if p.suffix == ".tif"), None)

    @property
    def nifti(self) -> Path | None:
        return next((p for p in self.exports if p.name.endswith((".nii", ".nii.gz"))), None)


# How run_job runs a stage: ``runner(name, work)`` calls ``work(client)`` with a client of the job's cluster and
# returns what it returns. The CLI and the API run each stage straight on their client (:func:`on_client`); the
# Prefect flow makes each one a task of that name, so the flow and the CLI run the very same stage sequence.
StageRunner = Callable[[str, Callable[[Client], Any]], Any]


def on_client(client: Client) -> StageRunner:
    """The plain runner: every stage on ``client``, in this thread."""
    return lambda _name, work: work(client)


def job_label(c: Checked) -> str:
    """The run as its lease names it to a run it refuses: method, input, and the command that started it."""
    import sys

    source = c.info.path if c.info.mosaic is None else f"a mosaic of {len(c.info.mosaic.items)} item(s)"
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:160] if sys.argv and sys.argv[0] else "python"
    return f"{c.plan.name} of {source} ({command})"


def leased(c: Checked, log: Callable[[str], None] = lambda _: None):  # noqa: ANN201 - a context manager
    """The run's lease on its output and stores (:func:`segpipe.io.lease.output_lease`), before its first write."""
    return output_lease(c.layout.output, c.layout.store_root, job_label(c), log)


def run_job(c: Checked, client: Client, log: Callable[[str], None] = lambda _: None,
            runner: StageRunner | None = None) -> Outcome:
    """Run every stage of a checked job on ``client``; ``log`` hears one line per stage (progress within a
    stage goes to the reporter installed with :func:`segpipe.progress.reporting`, if any).

    ``runner`` runs each stage (see :data:`StageRunner`; default :func:`on_client`). Each stage's wall time is
    kept in the outcome and in ``metrics/summary.json`` (beside the scores with ground truth). The run holds
    its output's lease throughout (taken here unless the caller holds it already).
    """
    with leased(c, log):
        return _run_stages(c, client, log, runner)


def _run_stages(c: Checked, client: Client, log: Callable[[str], None], runner: StageRunner | None) -> Outcome:
    check_output_stores(c)  # again under the lease: a run that held the output until now may have written stores
    seconds: dict[str, float] = {}
    run = runner or on_client(client)

    def stage(name: str, work: Callable[[Client], Any]) -> Any:
        t0 = time.perf_counter()
        value = run(name, work)
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
        return value

    if c.replace:
        log("replacing the results of other settings in the output (overwrite)")
    began = time.time()
    start(c)
    exports.warm(c.exports)  # writers' fixed costs loaded while the workers ingest and segment
    _log_start(c, client, log)
    scene = stage("ingest", lambda cl: run_ingest(c, cl))
    unit = c.geometry.tile_word
    log(f"segment with {c.plan.name}, {len(TileGrid(scene.shape, c.job.tile_size))} {unit}(s)")
    result = stage("segment", lambda cl: run_segment(c, scene, cl))
    instances = None
    if c.job.instances is not None:
        log(f"instances of class(es) {c.instance_classes} across {unit}s")
        instances = stage("instances", lambda cl: run_instances(c, result, cl))
    # Exports that carry the objects (QuPath's detections) are written once the objects' polygons are.
    late = [n for n in c.exports if exports.EXPORTS[n].reads_objects]
    early = [n for n in c.exports if n not in late]
    exported: list[Path] = []
    if early or not late:
        log(f"export {', '.join(early)}")
        exported = stage("export", lambda cl: run_export(c, scene, result, cl, early))
    objects = stage("objects", lambda cl: run_objects(c, scene, result, instances, cl))
    if late:
        log(f"export {', '.join(late)}")
        exported = [*exported, *stage("export", lambda cl: run_export(c, scene, result, cl, late))]
    if c.truth is not None:
        log(f"per-{unit} metrics")
    report = stage("metrics", lambda cl: run_metrics(c, scene, result, cl, objects))
    finish(c)
    write_summary(c, report, seconds)
    if c.replace:
        remove_stale_outputs(c, began)
    polygons = c.layout.polygons_path if c.layout.polygons else None
    item = write_item(c, [*exported, *([polygons] if polygons else [])])
    return Outcome(scene.path, result, exported, report, objects, seconds, polygons, item)


def _log_start(c: Checked, client: Client, log: Callable[[str], None]) -> None:
    """The lines before the first stage: a mosaic's items, the input and the cluster, the dashboard."""
    workers = client.scheduler_info()["workers"].values()
    threads = sum(w.get("nthreads", 1) for w in workers)
    mosaic = c.info.mosaic
    if mosaic is not None:
        log(f"mosaic of {len(mosaic.items)} item(s), {mosaic.composite} composite")
        for item_id, why in mosaic.skipped:  # reported, and the run goes on with the others
            log(f"item {item_id} left out: {why}")
        for item_id, why in mosaic.resampled:  # its pixels are not the grid's: loading resamples them
            log(f"item {item_id} resampled onto the grid (anchor {mosaic.anchor}): {why}")
    log(f"ingest {c.info.path} ({c.info.describe()}, {c.info.count} band(s)) on {len(workers)} worker(s), "
        f"{threads} thread(s)")
    dashboard = _dashboard(client)
    if dashboard:
        log(f"dashboard {dashboard}")


def write_item(c: Checked, exported: list[Path]) -> Path | None:
    """The run's STAC Item (:mod:`segpipe.report.stac_item`), written last: it lists every other file with its
    checksum and the scores of ``summary.json``. None for a volume or an image without a CRS (no Item)."""
    from segpipe.report.stac_item import RunFacts, global_scores, item_id, job_settings, wants_item
    from segpipe.report.stac_item import write_item as write_stac_item

    if not wants_item(c.geometry):
        return None
    lay = c.layout
    summary = json.loads(lay.summary_path.read_text()) if lay.summary_path.is_file() else None
    mosaic = c.info.mosaic
    facts = RunFacts(item_id(lay.output), c.geometry, c.plan.class_names,
                     job_settings(c.job, c.plan.name, c.plan.class_names, c.exports), global_scores(summary),
                     tuple(i.datetime for i in mosaic.items if i.datetime) if mosaic is not None else ())
    if mosaic is not None:
        facts.settings["segpipe:items"] = [i.id for i in mosaic.items]
    metrics = [lay.metrics_dir / n for n in ("summary.json", "report.html", "tiles.csv", "tiles.geojson",
                                             "objects.csv")]
    store = lay.result_store if is_remote(lay.result_store) else Path(lay.result_store)
    record = [lay.output / "mosaic.json"] if mosaic is not None else []  # ingest's record of the mosaic
    return write_stac_item(lay.item_path, facts, [*exported, store, *metrics, *record])


def write_summary(c: Checked, report: MetricsReport | None, seconds: dict[str, float]) -> None:
    """``metrics/summary.json``, written once when the run is done: the scores with ground truth, then the
    per-stage wall times (and a mosaic's items), which matter to every run, truth or not."""
    doc: dict[str, Any] = {}
    if report is not None:
        from segpipe.report.tables import summary_document

        doc = summary_document(report)
    doc["stage_seconds"] = seconds
    mosaic = c.info.mosaic
    if mosaic is not None:
        doc["mosaic"] = {"items": [i.id for i in mosaic.items],
                         "skipped": [{"id": k, "reason": why} for k, why in mosaic.skipped],
                         "anchor": mosaic.anchor, "transform": list(mosaic.transform),
                         "resampled": [{"id": k, "reason": why} for k, why in mosaic.resampled]}
    path = c.layout.summary_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, indent=2))


def _dashboard(client: Client) -> str | None:
    """The Dask dashboard's address, when the cluster serves one. An in-process cluster's link would name the host's
    network address, where the dashboard (on loopback) does not listen: it is given on loopback."""
    try:
        port = client.scheduler_info().get("services", {}).get("dashboard")
        if port and str(client.scheduler.address).startswith("inproc://"):
            return f"http://127.0.0.1:{port}/status"
        return client.dashboard_link if port else None
    except Exception:  # noqa: BLE001 - no dashboard is not an error
        return None
