"""The whole job as plain functions over paths: check -> ingest -> segment -> export -> metrics.

Each stage is callable on its own (the Prefect flow makes each one a task); :func:`run_job` chains
them for the CLI. :func:`check` does every validation before anything is written, so bad input
never leaves a partial output behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distributed import Client

from segpipe.config import JobSpec
from segpipe.errors import InputError
from segpipe.georef import export_cog
from segpipe.grid import TileGrid
from segpipe.ingest import fingerprint, ingest, selected_bands, source_info
from segpipe.io.raster import RasterInfo
from segpipe.io.result import add_truth_array
from segpipe.metrics import tile_confusions
from segpipe.nifti import export_nifti
from segpipe.omezarr import export_ome_zarr
from segpipe.report import MetricsReport, build_report, write_report
from segpipe.scene import Scene
from segpipe.segment import MethodPlan, plan_method, segment
from segpipe.truth import Truth, check_truth


@dataclass
class Checked:
    """A job whose inputs have all been validated."""

    job: JobSpec
    info: RasterInfo
    plan: MethodPlan
    truth: Truth | None

    @property
    def cog_path(self) -> Path:
        return Path(self.job.output) / "segmentation.tif"

    @property
    def nifti_path(self) -> Path:
        return Path(self.job.output) / "segmentation.nii.gz"

    @property
    def ome_path(self) -> Path:
        return Path(self.job.output) / "image.ome.zarr"

    @property
    def exports(self) -> list[str]:
        if self.job.exports is not None:
            return list(self.job.exports)
        return {"slide": ["cog", "ome-zarr"], "volume": ["nifti"]}.get(self.info.kind, ["cog"])

    @property
    def metrics_dir(self) -> Path:
        return Path(self.job.output) / "metrics"


def check(job: JobSpec) -> Checked:
    """Validate input image or volume, bands, method/model, tiling, exports and ground truth; writes nothing."""
    info = source_info(job.input)
    bands = selected_bands(job, info)
    if job.tile_size > max(info.shape):
        raise InputError(f"tile_size {job.tile_size} is larger than the scene ({info.describe()})")
    wrong = {"volume": {"cog"}}.get(info.kind, {"nifti"}) & set(job.exports or [])
    if wrong:
        raise InputError(f"export {sorted(wrong)[0]!r} does not apply to a {info.kind} input "
                         f"(volumes: nifti, ome-zarr; images and slides: cog, ome-zarr)")
    plan = plan_method(job, len(bands), len(info.shape))
    truth = check_truth(job.truth, info) if job.truth else None
    out = Path(job.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path exists and is not a folder: {out}")
    return Checked(job, info, plan, truth)


def run_ingest(c: Checked, client: Client) -> Scene:
    return ingest(c.job, c.info, client)


def run_segment(c: Checked, scene: Scene, client: Client) -> str:
    return segment(c.job, scene, c.plan, fingerprint(c.job, c.info), client)


def run_export(c: Checked, scene: Scene, result: str, client: Client) -> list[Path]:
    """Write the requested exports; each one is renamed into place only when complete."""
    out = []
    if "cog" in c.exports:
        out.append(export_cog(result, c.cog_path))
    if "nifti" in c.exports:
        out.append(export_nifti(result, c.nifti_path))
    if "ome-zarr" in c.exports:
        out.append(export_ome_zarr(scene.path, result, c.ome_path, client, c.plan.class_names))
    return out


def run_metrics(c: Checked, scene: Scene, result: str, client: Client) -> MetricsReport | None:
    """Per-tile (per-block) confusion matrices on the cluster, report files written atomically."""
    if c.truth is None:
        return None
    add_truth_array(result, scene.shape, scene.chunk)
    grid = TileGrid(scene.shape, c.job.tile_size)
    futures = [client.submit(tile_confusions, scene.path, result, c.truth, c.plan.n_classes,
                             c.job.tile_size, [t.index], pure=False) for t in grid]
    confusions = {key: cm for part in client.gather(futures) for key, cm in part}
    report = build_report(confusions, grid, scene.crs, scene.transform, c.plan.class_names,
                          scene.group.attrs.get("affine"))
    write_report(report, c.metrics_dir)
    return report


@dataclass
class Outcome:
    """Where a run put its results."""

    scene: str
    result: str
    exports: list[Path]
    report: MetricsReport | None

    @property
    def cog(self) -> Path | None:
        return next((p for p in self.exports if p.suffix == ".tif"), None)

    @property
    def nifti(self) -> Path | None:
        return next((p for p in self.exports if p.name.endswith((".nii", ".nii.gz"))), None)


def run_job(c: Checked, client: Client, log: Callable[[str], None] = lambda _: None) -> Outcome:
    """Run every stage of a checked job on ``client``; ``log`` hears one line per stage."""
    n_workers = len(client.scheduler_info()["workers"])
    log(f"ingest {c.info.path} ({c.info.describe()}, {c.info.count} band(s)) on {n_workers} worker(s)")
    scene = run_ingest(c, client)
    unit = "block" if c.info.kind == "volume" else "tile"
    log(f"segment with {c.plan.name}, {len(TileGrid(scene.shape, c.job.tile_size))} {unit}(s)")
    result = run_segment(c, scene, client)
    log(f"export {', '.join(c.exports)}")
    exports = run_export(c, scene, result, client)
    if c.truth is not None:
        log(f"per-{unit} metrics")
    report = run_metrics(c, scene, result, client)
    return Outcome(scene.path, result, exports, report)
