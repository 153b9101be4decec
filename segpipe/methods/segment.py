"""Fan segmentation out over the Dask cluster, skipping work already marked done.

Patch models run in two passes: logits of fixed batches of the global patch grid (units of whole
batches, see :mod:`segpipe.methods.infer`), then overlap-add stitching per tile. Classical methods are fitted
once on scene-wide statistics on the client, then applied per tile with their halo. Tiles and batches
go to the workers in guided units (:mod:`segpipe.runtime.units`). Torch is imported only for model jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed import Client

from segpipe import progress
from segpipe.config import JobSpec
from segpipe.errors import InputError
from segpipe.geometry import Index, SceneGeometry
from segpipe.io.layout import RunLayout
from segpipe.io.result import add_probability_array, class_outputs, create_result, record_fit
from segpipe.io.scene import Scene
from segpipe.io.store import Marks, open_or_create
from segpipe.methods.classical import ClassicalMethod, FitContext, make_classical
from segpipe.methods.classical_tiles import class_shards, segment_classical_tiles, shard_groups
from segpipe.methods.names import FAMILY_OF
from segpipe.methods.regions import check_params, grow_regions, seed_pixels
from segpipe.methods.sliding_window import LogitsTarget, SlidingWindow
from segpipe.runtime.cluster import use_gpu
from segpipe.runtime.placement import has_gpu_workers
from segpipe.runtime.units import guided_units, run_units, worker_slots
from segpipe.tiling.grid import PatchGrid, TileGrid, TileRun
from segpipe.tiling.patches import valid_patches_in_rows
from segpipe.tiling.resample import ResampledScene
from segpipe.tiling.stats import sample_pixels, sample_windows, scene_stats
from segpipe.tiling.stitch import (
    GRID_STAGE,
    Decoding,
    Stitching,
    create_grid_logits,
    create_logits_store,
    model_tiles_for,
    stitch_back_tiles,
    stitch_tiles,
)

log = logging.getLogger("segpipe")

if TYPE_CHECKING:
    import zarr

    from segpipe.models.checkpoint import ModelSpec


@dataclass
class MethodPlan:
    """The checked method: a model spec or a classical method, and its class names."""

    name: str
    n_classes: int
    class_names: list[str]
    model: ModelSpec | None = None
    classical: ClassicalMethod | None = None
    model_sha256: str | None = None
    scale: tuple[float, ...] | None = None  # the model's pixel size over the scene's, when they differ


@dataclass(frozen=True)
class PlanInput:
    """What a method is checked against before anything is written: the scene's band count, spatial axes and
    pixel size, and its grid for methods that place things on it (region-growing seeds)."""

    job: JobSpec
    n_bands: int
    ndim: int
    pixel_size: tuple[float, ...] | None
    grid: SceneGeometry | None


def _plan_model(p: PlanInput) -> MethodPlan:
    from segpipe.models.load import check_patch, load_any, model_digest, model_scale

    m = p.job.method
    model, spec = load_any(m.model)
    if spec.dims != p.ndim:
        raise InputError(f"model {m.model.name} is a {spec.dims}-D network; this scene is {p.ndim}-D")
    if spec.in_channels != p.n_bands:
        raise InputError(f"model {m.model.name} expects {spec.in_channels} band(s), "
                         f"the scene provides {p.n_bands}; select bands with 'bands:'")
    if m.refine is not None and p.ndim != 2:
        raise InputError(f"method.refine: crf refines 2-D images only; this scene is {p.ndim}-D")
    card = spec.info.get("card") or {}
    if m.refine is not None and (card.get("returns") == "probabilities" or card.get("threshold", 0.5) != 0.5
                                 or card.get("multilabel")):
        raise InputError(f"method.refine: crf takes a model's logits cut at their arg-max; model {m.model.name} "
                         "returns probabilities, has its own threshold or is multi-label")
    scale = model_scale(spec, m.model.name, p.pixel_size)
    check_patch(model, m.model.name, m.patch_size, spec)
    names = p.job.class_names or spec.class_names or [f"class{i}" for i in range(spec.n_classes)]
    return MethodPlan(m.name, spec.n_classes, names, model=spec, model_sha256=model_digest(m.model), scale=scale)


def _plan_region_growing(p: PlanInput) -> MethodPlan:
    if p.ndim != 2:
        raise InputError("method 'region_growing' works on 2-D images only")
    params = check_params(p.job.method.params)
    if p.grid is not None:
        seed_pixels(params, p.grid)
    return MethodPlan(p.job.method.name, 2, p.job.class_names or ["outside", "region"])


def _plan_split_merge(p: PlanInput) -> MethodPlan:
    from segpipe.methods.split_merge import check_params as check_split_merge

    if p.ndim != 2:
        raise InputError("method 'split_merge' works on 2-D images only")
    n = check_split_merge(p.job.method.params).classes
    return MethodPlan(p.job.method.name, n, p.job.class_names or [f"class{i}" for i in range(n)])


def _plan_classical(p: PlanInput) -> MethodPlan:
    method = make_classical(p.job.method.name, p.job.method.params)
    method.check_bands(p.n_bands)
    method.check_dims(p.ndim)
    names = p.job.class_names or [f"class{i}" for i in range(method.n_classes)]
    return MethodPlan(p.job.method.name, method.n_classes, names, classical=method)


@dataclass(frozen=True)
class SegmentRun:
    """One segment stage's work: the job, its scene and checked plan, the run's layout (the result and work
    stores and the result's fingerprint), the tiles still pending and the progress to advance."""

    job: JobSpec
    scene: Scene
    plan: MethodPlan
    layout: RunLayout
    pending: list[Index]
    advance: progress.Advance

    @property
    def result(self) -> str:
        return self.layout.result_store

    def work_group(self) -> zarr.Group:
        """The work store, made from the result's fingerprint (a rerun of other settings never reuses it)."""
        return open_or_create(self.layout.work_store, self.layout.result_fp, "work store")


def _run_region_growing(r: SegmentRun, client: Client) -> None:
    grow_regions(r.scene, r.work_group(), r.layout.work_store, r.result, r.job.tile_size,
                 r.job.method.params, client, r.pending, r.advance)


def _run_split_merge(r: SegmentRun, client: Client) -> None:
    from segpipe.methods.split_merge import split_and_merge

    split_and_merge(r.scene, scene_stats(r.scene, client), r.work_group(), r.layout.work_store, r.result,
                    r.job.tile_size, r.job.method.params, client, r.pending, r.advance)


def _run_classical(r: SegmentRun, client: Client) -> None:
    """Fit on the client, then the pending tiles in guided units that take whole shards of the class map
    (:func:`segpipe.methods.classical_tiles.shard_groups`), so no two tasks write one shard."""
    state = fit_classical(r.plan.classical, r.scene, client)
    record_fit(r.result, state)
    run = TileRun.of(r.scene.shape, r.job.tile_size, scene=r.scene.path, result=r.result)
    shards = class_outputs(r.result)[0].shards
    kw = {"method": r.job.method.name, "params": r.job.method.params, "state": state}
    if shards is None:  # one object per chunk (a volume, or a result made before shards): units of single tiles
        run_units(client, segment_classical_tiles, run, r.pending, r.advance, **kw)
        return
    units = [[t for group in unit for t in group]
             for unit in guided_units(shard_groups(run.grid, r.pending, shards), worker_slots(client))]
    futures = [client.submit(segment_classical_tiles, run.with_tiles(unit), pure=False, **kw) for unit in units]
    progress.gather(client, futures, r.advance, [len(u) for u in units])


@dataclass(frozen=True)
class MethodFamily:
    """How a family of methods is checked (``plan``, before any write) and run (``run``, the segment stage)."""

    plan: Callable[[PlanInput], MethodPlan]
    run: Callable[[SegmentRun, Client], None]


# family name (segpipe.methods.names.FAMILY_OF's values) -> its plan and run: the one place methods are dispatched
FAMILIES: dict[str, MethodFamily] = {
    "model": MethodFamily(_plan_model, lambda r, client: run_model(r, client)),  # defined below
    "region_growing": MethodFamily(_plan_region_growing, _run_region_growing),
    "split_merge": MethodFamily(_plan_split_merge, _run_split_merge),
    "classical": MethodFamily(_plan_classical, _run_classical),
}


def plan_method(job: JobSpec, n_bands: int, ndim: int = 2, pixel_size: tuple[float, ...] | None = None,
                grid: SceneGeometry | None = None) -> MethodPlan:
    """Check that the method can run on a scene with ``n_bands`` bands, ``ndim`` spatial axes and ``pixel_size``
    (and, given its ``grid``, that region-growing seeds lie on it).

    Runs before anything is written.
    """
    family = FAMILIES[FAMILY_OF[job.method.name]]
    plan = family.plan(PlanInput(job, n_bands, ndim, pixel_size, grid))
    if len(plan.class_names) != plan.n_classes:
        raise InputError(f"class_names lists {len(plan.class_names)} names for {plan.n_classes} classes")
    return plan


def _pending(marks: Marks, grid: TileGrid) -> list[Index]:
    done = marks.keys()
    return [t.index for t in grid if t.key not in done]


def result_fingerprint(job: JobSpec, plan: MethodPlan, scene_fp: dict[str, Any]) -> dict[str, Any]:
    """What the result depends on; batch size does not change a single pixel, so it may differ on resume."""
    method = job.method.model_dump(mode="json", exclude={"model", "batch_size"})
    if method.get("refine") is None:  # results made before refinement existed have no such key
        method.pop("refine", None)
    fp = {"scene": scene_fp, "method": method, "model_sha256": plan.model_sha256, "tile_size": job.tile_size}
    if job.probabilities:  # tiles finished without them would lack them: another result
        fp["probabilities"] = True
    return fp


def segment(job: JobSpec, scene: Scene, plan: MethodPlan, layout: RunLayout, client: Client) -> str:
    """Segment the scene into the layout's result store (made from its result fingerprint,
    :func:`result_fingerprint`) and return its path."""
    result = layout.result_store
    # Shards only where one task writes each (classical methods); every other writer works tile by tile.
    shards = class_shards(scene.shape, job.tile_size, scene.chunk) if plan.classical is not None else None
    create_result(result, layout.result_fp, scene.geometry, scene.chunk, plan.class_names, shards)
    if job.probabilities:
        add_probability_array(result, plan.class_names, scene.shape, scene.chunk)
    grid = TileGrid(scene.shape, job.tile_size)
    total = len(grid)
    pending = _pending(Marks(result, layout.segment_mark), grid)
    unit = scene.geometry.tile_word
    if not pending:
        progress.say(f"segment: all {total} {unit}s already done")
        return result  # finished earlier; its work store may be gone already
    if len(pending) < total:
        progress.say(f"resuming: {total - len(pending)} of {total} {unit}s already done")
    with progress.stage("segment", total, unit, done=total - len(pending)) as advance:
        FAMILIES[FAMILY_OF[job.method.name]].run(SegmentRun(job, scene, plan, layout, pending, advance), client)
    return result


def run_model(r: SegmentRun, client: Client) -> None:
    """Model logits for the pending tiles, stitched into the result.

    A model trained at another pixel size runs on the model grid (:mod:`segpipe.tiling.resample`): the model-grid
    tiles that the pending scene tiles need are inferred and blended into the work store, then each scene
    tile is resampled back from them. With ``refine: crf`` the blended logits go to the work store as well,
    for the tiles within the CRF's halo of the pending ones, and a pass of :mod:`segpipe.methods.crf` makes
    the classes.
    """
    job, scene, plan, pending, advance = r.job, r.scene, r.plan, r.pending, r.advance
    m = job.method
    work, result = r.layout.work_store, r.result
    group = r.work_group()
    view = scene if plan.scale is None else ResampledScene(scene, plan.scale)
    create_logits_store(group, PatchGrid(view.shape, m.patch_size, m.overlap), plan.n_classes)
    tiles = pending
    crf = m.refine.crf if m.refine is not None else None
    into_work = plan.scale is not None or crf is not None
    if into_work:
        create_grid_logits(group, view.shape, plan.n_classes, job.tile_size)
        done = Marks(work, GRID_STAGE).keys()
        mgrid = TileGrid(view.shape, job.tile_size)
        if crf is not None:
            from segpipe.methods.crf import unary_tiles

            needed = unary_tiles(view, scene.shape, job.tile_size, pending, crf.halo)
        else:
            needed = model_tiles_for(view, job.tile_size, pending)
        tiles = [t for t in needed if mgrid.tile(t).key not in done]
    norm = normalisation(plan.model, scene, client)
    decoding = Decoding.of_card(plan.model.info.get("card"))
    # Blending into the work store makes no scene tile final: its own progress, in the tiles it blends (the
    # model grid's, or the scene's within the CRF's halo), so that the long part of the run is not silent.
    gpu = use_gpu(job.cluster) and has_gpu_workers(client)
    with progress.stage("model logits", len(tiles) if into_work else 0, "tile") as blended:
        window = SlidingWindow(str(m.model), m.patch_size, m.overlap, m.batch_size, norm, mirror=m.tta == "mirror",
                               gpu=gpu, scale=plan.scale, decoding=decoding)
        infer_and_stitch(client, window, LogitsTarget(view, work, result, job.tile_size, job.keep_work, into_work),
                         tiles, blended if into_work else advance)
    scene_tiles = TileRun.of(scene.shape, job.tile_size, scene=scene.path, result=result, work=work)
    if crf is not None:  # the scene's tiles are done here, each from its window of blended logits
        from segpipe.methods.crf import refine_tiles

        run_units(client, refine_tiles, scene_tiles, pending, advance, params=crf.model_dump(), norm=norm,
                  scale=plan.scale)
    elif plan.scale is not None:  # the scene's tiles are done here, after the model grid's
        run_units(client, stitch_back_tiles, scene_tiles, pending, advance, scale=plan.scale, decoding=decoding)


def patch_batches(client: Client, scene: Scene | ResampledScene, patch: int, overlap: float, batch_size: int,
                  scale: tuple[float, ...] | None = None) -> list[list[Index]]:
    """The scene's fixed batches: patches holding a valid pixel, in global row-major order, ``batch_size`` each.

    Validity is read on the workers, one unit of patch rows (z for volumes) per task; with ``scale``, of
    the patch grid on the model grid.
    """
    rows = list(range(PatchGrid(scene.shape, patch, overlap).counts[0]))
    units = guided_units(rows, worker_slots(client))
    found = client.gather([client.submit(valid_patches_in_rows, scene.path, patch, overlap, u, scale, pure=False)
                           for u in units])
    patches = [idx for part in found for idx in part]
    return [patches[k:k + batch_size] for k in range(0, len(patches), batch_size)]


# At most this many patches per inference task. Units in flight hold the scratch that stitching has not yet
# freed, so they are kept small: on a CPU worker 32 patches of 256² are seconds of work (the Dask task
# overhead is milliseconds); a GPU forwards them ~50x faster and gets longer units. Measured on a 6144²
# scene (all C logits stored then): 256-patch units kept 4.4 B/px at the peak, 64-patch units 2.0.
UNIT_PATCHES = {"cpu": 32, "gpu": 1024}


def normalisation(spec: ModelSpec, scene: Scene, client: Client) -> dict[str, Any]:
    """How every patch is normalised: the model's fixed values, or the scene's own z-score or min-max.

    A z-score is taken once over the whole scene's valid pixels (population standard deviation, a zero one
    replaced by 1, as MONAI's NormalizeIntensity does), a min-max likewise, never per tile: tiles must not
    change the answer.
    """
    if spec.scene_norm is None:
        return {"mean": list(spec.mean), "std": list(spec.std), "clip": spec.clip}
    stats = scene_stats(scene, client)
    pooled = spec.scene_norm.endswith("-pooled")
    if spec.scene_norm.startswith("minmax"):  # (x - min) / (max - min), a flat band divided by 1 (nnU-Net: 1e-8)
        low, high = np.asarray(stats.minimum, np.float64), np.asarray(stats.maximum, np.float64)
        if pooled:
            low, high = np.full_like(low, low.min()), np.full_like(high, high.max())
        return {"mean": low.tolist(), "std": np.where(high > low, high - low, 1.0).tolist(), "clip": None}
    mean, std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
    if pooled:  # every band counts the same valid pixels: pool their moments
        both = mean.mean()
        std = np.full_like(std, np.sqrt(max(float(np.mean(std**2 + mean**2)) - both**2, 0.0)))
        mean = np.full_like(mean, both)
    return {"mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist(), "clip": None}


def infer_and_stitch(client: Client, window: SlidingWindow, target: LogitsTarget, tiles: list[Index],
                     advance: progress.Advance | None = None) -> None:
    """Logits of the batches the ``tiles`` still need, each tile stitched as soon as its patches are done.

    Batches not yet marked done and holding a patch over one of ``tiles`` run in guided units of whole
    batches (a rerun that lost a few tiles after its work store was removed recomputes just their
    neighbourhood). Each tile's stitch task is submitted right after the last inference unit it waits
    for, so Dask, which prefers earlier submissions, interleaves stitching with inference in scene order;
    unless ``target.keep``, a stitched patch whose every tile is final is deleted from the work store, so scratch
    follows the band of work in flight rather than the scene. With ``window.scale``, ``target.scene`` is the model grid
    and ``tiles`` are its tiles, blended into the work store (see :func:`segpipe.tiling.stitch.stitch_tiles`), as
    they are with ``target.into_work``.
    """
    from segpipe.methods.infer import INFER_STAGE, batch_key, infer_batches

    scene, work, result, tile_size, keep, into_work = (target.scene, target.work, target.result, target.tile_size,
                                                        target.keep, target.into_work)
    patch, overlap, batch_size, scale = window.patch, window.overlap, window.batch_size, window.scale

    grid = PatchGrid(scene.shape, patch, overlap)
    tgrid = TileGrid(scene.shape, tile_size)
    covering = {t: grid.covering(tgrid.tile(t).core) for t in tiles}
    needed = {i for c in covering.values() for i in c}
    done = Marks(work, INFER_STAGE).keys()
    batches = patch_batches(client, scene, patch, overlap, batch_size, scale)
    pending = [(k, b) for k, b in enumerate(batches) if batch_key(batch_size, k) not in done and needed.intersection(b)]
    resources = {"GPU": 1} if window.gpu else None
    cpu_slots = worker_slots(client)
    slots = worker_slots(client, resources) if window.gpu else cpu_slots
    units = guided_units(pending, slots, largest=max(1, UNIT_PATCHES["gpu" if window.gpu else "cpu"] // batch_size))
    unit_of = {i: u for u, unit in enumerate(units) for _, b in unit for i in b}
    waits = {t: sorted({unit_of[i] for i in covering[t] if i in unit_of}) for t in tiles}
    ready_after: dict[int, list[Index]] = {}
    for t in tiles:
        ready_after.setdefault(waits[t][-1] if waits[t] else -1, []).append(t)
    stitch_run = TileRun.of(scene.shape, tile_size, scene=scene.path, result=result, work=work)
    how = Stitching(patch, overlap, scale, free=not keep, into_work=into_work, decoding=window.decoding or Decoding())
    inferred: list = []
    stitched: list = []
    stitched_sizes: list[int] = []

    def stitch(ready: list[Index]) -> None:
        for group in guided_units(ready, cpu_slots):
            after = [inferred[u] for u in sorted({u for t in group for u in waits[t]})]
            stitched.append(client.submit(stitch_tiles, stitch_run.with_tiles(group), how, after, pure=False))
            stitched_sizes.append(len(group))

    stitch(ready_after.get(-1, []))
    for u, unit in enumerate(units):
        inferred.append(client.submit(infer_batches, window, scene.path, work, unit, resources=resources,
                                      pure=False))
        stitch(ready_after.get(u, []))
    progress.gather(client, stitched, advance, stitched_sizes)
    results = client.gather(inferred)
    fitted = min((micro for _, micro in results), default=batch_size)
    if fitted < batch_size:  # said once per run, on the client: the run went on with smaller sub-batches
        log.warning("segpipe: the GPU ran out of memory on batches of %d patches; went on with sub-batches "
                    "of %d (set a smaller batch_size to avoid the retries)", batch_size, fitted)


def fit_classical(method: ClassicalMethod, scene: Scene, client: Client) -> dict[str, Any]:
    """Fit a classical method's scene-wide state (thresholds, centres) on the client."""
    def windows(halo: int) -> list[tuple[np.ndarray, np.ndarray, tuple[slice, slice]]]:
        out = []
        for w in sample_windows(scene):
            outer = w.grow(halo, scene.shape)
            img, valid = scene.read(outer)
            out.append((img, valid, w.relative_to(outer)))
        return out

    ctx = FitContext(stats=scene_stats(scene, client), n_bands=scene.count,
                     sample_pixels=lambda: sample_pixels(scene, client), sample_windows=windows)
    return method.fit(ctx)

