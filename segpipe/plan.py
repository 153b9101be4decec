"""A run planned and priced before it runs: tiles, tasks, bytes, store objects, requests and wall time.

Why: a continental run (10^5 scenes on a cloud cluster) costs hours and money, and what breaks first at that
scale (object-store request rates, the scheduler's task count, the client's share of the work, the marks
left behind) is cheaper to read off a plan than to find out. :func:`plan_job` takes a checked job and counts,
with the stages' own rules (:class:`~segpipe.tiling.grid.TileGrid`, :func:`~segpipe.runtime.units.guided_units`,
the patch batches of :func:`~segpipe.methods.segment.infer_and_stitch`), what a run writes and submits; it reads
nothing but the input's header, which the check opened already. Wall time comes from measured rates of the
method on this kind of worker (:class:`Rates`: a YAML file, the shipped ``segpipe/sample/rates.yaml`` unless the
user's own, written by :func:`calibrate`, exists): pixels ÷ (rate × slots) per stage, plus each scene's fixed
seconds and the cluster's start.

Counts a run's data can change (a chunk or patch with no valid pixel is never written) are ranges: exact where the
input's header says every pixel is valid, otherwise what the run writes at most. Bytes are uncompressed (an
upper bound); requests are an estimate (one PUT per object written, one GET per object read).
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from segpipe.errors import InputError
from segpipe.geometry import Box
from segpipe.io.paths import is_remote
from segpipe.methods.names import FAMILY_OF
from segpipe.runtime.units import guided_units
from segpipe.tiling.grid import PatchGrid, TileGrid

if TYPE_CHECKING:
    from segpipe.config import JobSpec
    from segpipe.pipeline import Checked

SHIPPED_RATES = Path(__file__).resolve().parent / "sample" / "rates.yaml"
STAGES = ("ingest", "segment", "export", "metrics")
# The crop a calibration runs on, a side: a model's 1024² is seconds of work on two CPU cores; a classical method
# is ~50x faster per pixel and needs 4096² for its per-pixel time to stand out of its fixed seconds.
CALIBRATION_EDGE = {"model": 1024, "other": 4096}
CALIBRATION_BYTES = 256 * 2**20  # at most this much of the crop's pixels in memory at once
LEASE_RENEW_SECONDS = 30.0  # an s3:// lease object is renewed every quarter of its 120 s timeout (io/lease.py)


def user_rates_path() -> Path:
    """The user's rates file: ``$XDG_CONFIG_HOME/segpipe/rates.yaml`` (``~/.config`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "segpipe" / "rates.yaml"


# ---------------------------------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class StageRates:
    """The measured rates of one method (or family) on one device: Mpx/s per slot of each stage (a model's
    segment in patch pixels), the export's of the client process, fixed seconds per scene and per stage, and the
    cluster's start; ``key`` is the entry they were found under, ``origin`` the file."""

    key: str
    device: str
    mpx_s: dict[str, float]
    fixed: dict[str, float]
    start: float
    measured: str
    origin: Path

    def rate(self, stage: str) -> float | None:
        value = self.mpx_s.get(stage)
        return float(value) if value else None


@dataclass(frozen=True)
class Rates:
    """Stage rates by method or family and device, read from the shipped file and the user's over it."""

    entries: dict[str, dict[str, dict[str, Any]]]
    origins: dict[tuple[str, str], Path]
    prices: dict[str, Any]
    user: Path | None  # the user's file, where one was read

    @classmethod
    def load(cls, user: Path | None = None, shipped: Path = SHIPPED_RATES) -> Rates:
        """The shipped rates with the user's file (``user``, default :func:`user_rates_path`) over them, entry by
        entry; a user's file that is not valid YAML or has no ``rates`` mapping is refused in one line."""
        entries: dict[str, dict[str, dict[str, Any]]] = {}
        origins: dict[tuple[str, str], Path] = {}
        prices: dict[str, Any] = {}
        path = user if user is not None else user_rates_path()
        found = path if path.is_file() else None
        for source in [shipped, *([found] if found else [])]:
            doc = _read_rates(source)
            prices.update(doc.get("prices") or {})
            for key, devices in (doc.get("rates") or {}).items():
                if not isinstance(devices or {}, dict) or not all(isinstance(e or {}, dict)
                                                                   for e in (devices or {}).values()):
                    raise InputError(f"rates file {source}: rates.{key} must map cpu and gpu to stage rates (see "
                                     f"{SHIPPED_RATES})")
                for device, entry in (devices or {}).items():
                    entries.setdefault(str(key), {})[str(device)] = entry
                    origins[(str(key), str(device))] = source
        return cls(entries, origins, prices, found)

    def lookup(self, method: str, device: str) -> StageRates | None:
        """The rates of ``method`` on ``device``: its own entry, else its family's; None if neither has one."""
        for key in (method, FAMILY_OF.get(method, method)):
            entry = self.entries.get(key, {}).get(device)
            if not entry:
                continue
            origin = self.origins[(key, device)]
            try:
                return StageRates(key, device, {s: float(entry[s]) for s in STAGES if entry.get(s)},
                                  {s: float(v) for s, v in (entry.get("fixed") or {}).items()},
                                  float(entry.get("start", 0.0)), str(entry.get("measured", "")), origin)
            except (TypeError, ValueError, AttributeError):
                raise InputError(f"rates file {origin}: rates.{key}.{device} must give numbers (Mpx/s, seconds)"
                                 ) from None
        return None


def _read_rates(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"rates file {path} cannot be read ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rates", {}), dict):
        raise InputError(f"rates file {path} must hold a 'rates' mapping (see {SHIPPED_RATES})")
    return doc


# ---------------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Count:
    """A figure between ``low`` and ``high`` where the run's pixels decide it (a chunk with an invalid pixel writes
    validity; a chunk or patch without a valid one writes no class or logits); exact when the two agree, as they do
    where the input's header says every pixel is valid."""

    low: int
    high: int

    @classmethod
    def exact(cls, n: int) -> Count:
        return cls(n, n)

    def __add__(self, other: Count | int) -> Count:
        o = other if isinstance(other, Count) else Count.exact(other)
        return Count(self.low + o.low, self.high + o.high)

    __radd__ = __add__

    def times(self, n: int) -> Count:
        return Count(self.low * n, self.high * n)

    def text(self) -> str:
        return f"{self.high:,}" if self.low == self.high else f"{self.low:,}-{self.high:,}"


def _chunks_over(box: Box, chunk: int) -> int:
    """How many chunks of edge ``chunk`` a box touches."""
    return math.prod((b - 1) // chunk - a // chunk + 1 for a, b in zip(box.start, box.stop, strict=True))


@dataclass(frozen=True)
class Slots:
    """What a cluster runs at once: CPU threads (stages without a GPU) and GPU workers (model tasks)."""

    workers: int
    threads: int
    gpu: bool

    @property
    def cpu(self) -> int:
        return self.workers * self.threads

    @property
    def model(self) -> int:
        return self.workers if self.gpu else self.cpu

    @property
    def rated(self) -> int:
        """The slots a rate is per: cores on CPU, GPU workers (each with its host's CPU workers) on GPU."""
        return self.workers if self.gpu else self.cpu


@dataclass
class Plan:
    """What one run of a job writes, submits and takes, per scene and for all ``scenes``."""

    job: JobSpec
    method: str
    family: str
    kind: str
    input_shape: tuple[int, ...]
    shape: tuple[int, ...]
    bands: int
    input_bands: int
    dtype: str
    scenes: int
    slots: Slots
    in_place: bool
    known_valid: bool
    remote: bool
    tiles: int
    chunk: int
    tasks: dict[str, Count]
    objects: dict[str, Count]
    removed: Count
    read: dict[str, float]
    written: dict[str, float]
    puts: Count
    gets: int
    patch_pixels: int | None
    rates: StageRates | None
    seconds: dict[str, float] = field(default_factory=dict)
    start: float = 0.0
    in_flight: int = 1
    price_hour: float | None = None
    prices: dict[str, Any] = field(default_factory=dict)
    rates_file: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return math.prod(self.shape)

    @property
    def cluster_seconds(self) -> float:
        """All scenes' pixel work on the cluster, spread over its slots (stages of different items overlap)."""
        return self.scenes * sum(v for k, v in self.seconds.items() if k in ("ingest", "segment", "metrics"))

    @property
    def client_seconds(self) -> float:
        """The COG export of every scene, written by the client process (not spread over the workers)."""
        return self.scenes * self.seconds.get("export", 0.0)

    @property
    def latency_seconds(self) -> float:
        """Each scene's fixed seconds, ``in_flight`` scenes at a time."""
        if self.rates is None:
            return 0.0
        fixed = sum(self.rates.fixed.get(s, 0.0) for s in self._stages())
        return self.scenes * fixed / max(1, self.in_flight)

    def _stages(self) -> list[str]:
        return [s for s in STAGES if s in self.seconds]

    @property
    def wall(self) -> float:
        """Start, then one scene's stages in turn; for many scenes the slowest of the three resources."""
        if self.scenes == 1:
            fixed = sum(self.rates.fixed.get(s, 0.0) for s in self._stages()) if self.rates else 0.0
            return self.start + sum(self.seconds.values()) + fixed
        return self.start + max(self.cluster_seconds, self.client_seconds, self.latency_seconds)

    @property
    def bound(self) -> str:
        if self.scenes == 1:
            return "one scene's stages in turn"
        figures = {"the cluster's pixel work": self.cluster_seconds, "the client's COG export": self.client_seconds,
                   f"per-scene fixed seconds at {self.in_flight} scenes in flight": self.latency_seconds}
        return max(figures, key=lambda k: figures[k])

    def lines(self) -> list[str]:
        """The plan, one line per figure, as ``segpipe validate`` prints a job."""
        n = self.scenes
        each = " per scene" if n > 1 else ""

        def every(c: Count) -> str:
            return c.text() + (f" per scene, {c.times(n).text()} in all" if n > 1 else "")

        geo = "x".join(str(v) for v in self.shape[::-1])
        unit = "voxels" if len(self.shape) == 3 else "px"
        out = [f"method:   {self.method} ({self.family}) on a {self.kind} input"]
        if self.shape != self.input_shape or self.bands != self.input_bands or n > 1:
            real = "x".join(str(v) for v in self.input_shape[::-1])
            out.append(f"scenes:   {n:,} x {geo} {unit} x {self.bands} band(s) {self.dtype} (the job's input: {real} "
                       f"{unit} x {self.input_bands} band(s); a what-if of --scenes/--scene-size/--scene-bands)")
        out.append(f"pixels:   {self.pixels * n:,} ({_si(self.pixels * n)}){each and f'; {self.pixels:,} per scene'}")
        out.append(f"tiles:    {every(Count.exact(self.tiles))}: tiles of {self.job.tile_size} {unit}, Zarr chunks "
                   f"of {self.chunk}")
        cluster = (f"{self.slots.workers:,} GPU worker(s), each with {self.slots.threads} CPU thread(s)"
                   if self.slots.gpu else f"{self.slots.workers:,} worker(s) x {self.slots.threads} core(s) = "
                   f"{self.slots.cpu:,} slots")
        out.append(f"cluster:  {cluster}")
        out.append("tasks:    " + ", ".join(f"{k} {c.text()}" for k, c in self.tasks.items() if c.high)
                   + f" ({every(sum(self.tasks.values(), Count.exact(0)))})")
        source = "read in place from the source" if self.in_place else "copied into scene.zarr"
        out.append(f"read:     {_bytes(self.read['input'] * n)} of input pixels ({self.bands} band(s) x "
                   f"{np.dtype(self.dtype).itemsize} B, {source}), read {self.read['passes']:.1f} times over: "
                   f"{_bytes(self.read['input'] * self.read['passes'] * n)}")
        written = ", ".join(f"{k} {_bytes(v * n)}" for k, v in self.written.items() if v)
        out.append(f"written:  {_bytes(sum(self.written.values()) * n)} uncompressed at most ({written})")
        objs = ", ".join(f"{k} {c.text()}" for k, c in self.objects.items() if c.high)
        total = sum(self.objects.values(), Count.exact(0))
        out.append(f"objects:  {every(total)} written ({objs}{each})")
        if self.removed.high:
            out.append(f"removed:  {every(self.removed)} of them again (the work store: scratch, deleted as tiles "
                       "finish and at the end)")
        if self.remote:
            puts, gets = self.puts.times(n), self.gets * n
            out.append(f"requests: ~{puts.high:,} PUT, ~{gets:,} GET to the object store (an estimate: a PUT per "
                       "object written, a GET per object read)")
        rates = self.rates
        if rates is None:
            out.append(f"rates:    none for {self.method} on {'gpu' if self.slots.gpu else 'cpu'} in {self.rates_file}:"
                       " run segpipe plan --calibrate JOB to measure them")
            return out
        unit_rate = "per GPU worker" if self.slots.gpu else "per core"
        seg = "patch Mpx/s" if self.patch_pixels is not None else "Mpx/s"
        parts = [f"{s} {rates.mpx_s[s]:g} {seg if s == 'segment' else 'Mpx/s'}" for s in ("ingest", "segment",
                 "metrics") if s in self.seconds and s in rates.mpx_s]
        parts.append(f"export {rates.mpx_s.get('export', 0):g} Mpx/s in the client")
        origin = "the shipped segpipe/sample/rates.yaml" if rates.origin == SHIPPED_RATES else str(rates.origin)
        out.append(f"rates:    {', '.join(parts)} ({unit_rate}); '{rates.key}' on {rates.device} from {origin} "
                   f"({rates.measured})")
        stages = ", ".join(f"{k} {_duration(v * n)}" for k, v in self.seconds.items())
        out.append(f"time:     {stages}{' of work in all' if n > 1 else ''}; start {_duration(self.start)}")
        if n > 1:
            out.append(f"bounds:   cluster {_duration(self.cluster_seconds)} over {self.slots.rated:,} slots, client "
                       f"{_duration(self.client_seconds)} of COG export, per-scene fixed "
                       f"{_duration(self.latency_seconds)} at {self.in_flight} scene(s) in flight")
        out.append(f"wall:     {_duration(self.wall)} with {self.slots.workers:,} worker(s) ({self.bound})")
        out.extend(self._cost())
        return out

    def _cost(self) -> list[str]:
        if self.price_hour is None:
            return []
        hours = self.wall / 3600
        workers = self.slots.workers * hours * self.price_hour
        line = f"cost:     ${workers:,.0f} for {self.slots.workers * hours:,.0f} worker-hours at ${self.price_hour:g}/h"
        if self.remote:
            put, get = float(self.prices.get("put_per_1000", 0)), float(self.prices.get("get_per_1000", 0))
            requests = self.puts.high * self.scenes / 1000 * put + self.gets * self.scenes / 1000 * get
            line += (f" + ${requests:,.0f} of requests (${put:g} per 1,000 PUT, ${get:g} per 1,000 GET) = "
                     f"${workers + requests:,.0f}")
        return [line + " (no storage, transfer or scheduler node)"]


def _si(n: float) -> str:
    unit, size = next((u, s) for u, s in (("Tpx", 1e12), ("Gpx", 1e9), ("Mpx", 1e6)) if n >= s or u == "Mpx")
    return f"{n / size:.4g} {unit}"


def _bytes(n: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Scenes:
    """What is planned: ``count`` scenes like the job's input, of its shape and bands unless said otherwise
    (``--scene-size``, ``--scene-bands``: an archive of N items like this one, without having their data)."""

    count: int = 1
    shape: tuple[int, ...] | None = None
    bands: int | None = None


def plan_job(checked: Checked, workers: int, gpu: bool, rates: Rates, *, threads: int | None = None,
             scenes: Scenes = Scenes(), start: float | None = None,  # noqa: B008 - frozen
             in_flight: int | None = None, price_hour: float | None = None) -> Plan:
    """Count what a run of ``checked`` writes and submits on ``workers`` workers (GPU workers with ``gpu``) of
    ``threads`` cores each (default the job's), and time it from ``rates``; reads nothing but the input's header.

    ``start`` replaces the rates' start seconds (a cloud cluster's nodes take minutes); ``in_flight`` is how many
    scenes run at once (default twice the workers, as an archive run does); ``price_hour`` a worker's hourly price.
    """
    from segpipe.tiling.ingest import in_place, selected_bands

    job, info = checked.job, checked.info
    if workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers})")
    if scenes.count < 1:
        raise InputError(f"--scenes must be at least 1 (got {scenes.count})")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1 (got {threads})")
    spec = job.cluster
    family = FAMILY_OF[job.method.name]
    notes: list[str] = []
    if gpu and family != "model":
        notes.append(f"note:     --gpu does not help {job.method.name}: a {family} method runs on CPU cores only; "
                     "planned on CPU workers")
        gpu = False
    default_threads = spec.n_workers * spec.threads_per_worker if gpu else spec.threads_per_worker
    slots = Slots(workers, threads or default_threads, gpu)
    shape = tuple(scenes.shape) if scenes.shape else tuple(info.shape)
    if len(shape) != len(info.shape):
        raise InputError(f"--scene-size gives {len(shape)} axes; this input has {len(info.shape)} "
                         "(WxH for images, WxHxD for volumes)")
    bands = scenes.bands or len(selected_bands(job, info))
    nd = len(shape)
    chunk = job.chunk_for(nd)
    tgrid, cgrid = TileGrid(shape, job.tile_size), TileGrid(shape, chunk)
    tiles, chunks = len(tgrid), len(cgrid)
    plan = checked.plan
    reads_in_place = isinstance(job.input, str) and in_place(job, info)
    valid = _known_valid(checked)
    maybe = (lambda n: Count.exact(n)) if valid else (lambda n: Count(0, n))
    remote = is_remote(job.store_root)

    itemsize = np.dtype(info.dtype).itemsize
    ingest_bands = _ingest_bands(shape, chunk, bands * itemsize)
    tasks: dict[str, Count] = {"ingest": Count.exact(ingest_bands)}
    objects: dict[str, Count] = {}
    written: dict[str, float] = {}
    pixels = math.prod(shape)
    scene_meta = 2 + (0 if reads_in_place else 1)  # group and valid (and image) zarr.json
    # a copied scene's pixels: a chunk or shard each, but an all-zero one (the fill value) is never written
    image = 0 if reads_in_place else _sharded_objects(cgrid, _image_shards(bands, shape, chunk, bands * itemsize))
    objects["scene.zarr"] = Count.exact(scene_meta) + Count(0, image) + maybe(0 if valid else chunks)
    written["scene.zarr"] = (0 if reads_in_place else pixels * bands * itemsize) + (0 if valid else pixels)
    marks = Count.exact(ingest_bands)  # a mark per band of chunk rows (ingest); the segment stage's below
    class_objects = maybe(chunks)  # the class map: a chunk each, unless its writer shards it
    scene_passes = 0.0 if (reads_in_place and valid and job.nodata is None) else 1.0  # ingest reads to copy or mask
    gets = 0
    work = Count.exact(0)
    removed = Count.exact(0)
    patch_pixels = None
    n_classes = plan.n_classes
    store_chunk_reads = 0 if reads_in_place else 1  # a scene read costs GETs of scene.zarr only when copied

    stats_slabs = len(_row_bands_of(shape, bands, chunk))
    if family == "classical":
        method = plan.classical
        fit = Count.exact(stats_slabs)
        if _samples(method):
            step = max(1, int((pixels / _sample_size()) ** (1 / nd)))
            fit = fit + len(_row_bands_of(shape, bands, step))
        if np.dtype(info.dtype).kind not in "iub" or itemsize > 2:  # float images: a second pass bins the histogram
            fit = fit + stats_slabs
        tasks["statistics"] = fit
        units, class_objects, segment_marks = _classical_units(shape, job.tile_size, chunk, tgrid, chunks,
                                                               slots.cpu, maybe)
        tasks["segment"] = Count.exact(units)
        marks = marks + segment_marks
        scene_passes += 1.0  # the statistics
        halo = method.halo
        grown = sum(math.prod(t.core.grow(halo, shape).shape) for t in tgrid)
        scene_passes += grown / pixels
        gets += (chunks + sum(_chunks_over(t.core.grow(halo, shape), chunk) for t in tgrid)) * store_chunk_reads
    elif family == "model":
        m = job.method
        view = shape if plan.scale is None else _model_grid(shape, plan.scale)
        pgrid = PatchGrid(view, m.patch_size, m.overlap)
        n_patches = math.prod(pgrid.counts)
        patch_pixels = n_patches * math.prod(pgrid.size)
        counted = _model_tasks(view, job.tile_size, pgrid, m.batch_size, slots)
        into_work = plan.scale is not None or m.refine is not None
        mtiles = len(TileGrid(view, job.tile_size))
        if plan.model is not None and plan.model.scene_norm is not None:
            tasks["statistics"] = Count.exact(stats_slabs)
            scene_passes += 1.0
            gets += chunks * store_chunk_reads
        tasks["patches"] = Count.exact(counted["patches"])
        tasks["infer"] = Count(1, counted["infer"]) if not valid else Count.exact(counted["infer"])
        tasks["stitch"] = Count.exact(counted["stitch"])
        marks = marks + tiles  # each scene tile marked when stitched (or resampled back, or refined)
        if into_work:
            tasks["tiles"] = Count.exact(len(guided_units(range(tiles), slots.cpu)))
        batches = -(-n_patches // m.batch_size)
        logits = maybe(n_patches)
        work = Count.exact(2) + logits + maybe(batches)  # group and logits zarr.json, a chunk per patch, batch marks
        if into_work:
            work = work + Count.exact(1 + 2 * mtiles)  # grid_logits: its zarr.json, a chunk and a mark per tile
        written["work.zarr"] = patch_pixels * (n_classes - 1) * 2 + (pixels * (n_classes - 1) * 2 if into_work else 0)
        scene_passes += patch_pixels / pixels
        vgrid = TileGrid(view, job.tile_size)
        neighbours = {i: len(vgrid.overlapping(pgrid.window(i)))
                      for i in itertools.product(*(range(c) for c in pgrid.counts))}
        covering = [pgrid.covering(t.core) for t in vgrid]
        # freeing a patch, a tile checks the marks of every tile under it (stitch_tiles): at most this many HEADs
        overlapping = sum(neighbours[i] for cover in covering for i in cover)
        covering_reads = sum(len(cover) for cover in covering)
        # patches read their scene chunks; each tile reads its covering patches' logits and checks its mark and,
        # freeing patches, its neighbours' marks (one HEAD each)
        gets += (sum(_chunks_over(pgrid.window(i).grow(0, view), chunk)
                     for i in itertools.product(*(range(c) for c in pgrid.counts))) * store_chunk_reads
                 + covering_reads + mtiles + (0 if job.keep_work else overlapping))
        if not job.keep_work:
            removed = work
    else:
        notes.append(f"note:     {family} keeps a work store of its own and runs passes of its own: its tasks and "
                     "work-store objects are not counted here")
        tasks["segment"] = Count.exact(len(guided_units(range(tiles), slots.cpu)))
        marks = marks + tiles
        scene_passes += 1.0
    objects["work.zarr"] = work

    # the result: group, class and coordinates' zarr.json, coordinate chunks, then the class map's chunks or shards
    coords = _coordinate_objects(checked, nd)
    result = Count.exact(2 + coords) + class_objects
    written["result.zarr"] = pixels
    if job.probabilities:
        result = result + Count.exact(1) + maybe(chunks)
        written["result.zarr"] += pixels * n_classes * 2
    if checked.truth is not None:  # truth's zarr.json, and a chunk wherever the truth holds a label
        result = result + Count.exact(1) + Count(0 if checked.truth.ignore else chunks, chunks)
        written["result.zarr"] += pixels
        tasks["metrics"] = Count.exact(tiles)
        gets += 2 * tiles  # each tile's class and truth
    objects["result.zarr"] = result
    objects["marks"] = marks
    gets += chunks * (2 if job.probabilities else 1)  # the export reads the result
    gets += sum(c.high for c in tasks.values()) * 2  # each task opens its store: a zarr.json or two

    outputs, export_bytes = _output_files(checked, pixels, n_classes)
    objects["output files"] = Count.exact(outputs)
    written["exports"] = export_bytes
    puts = sum((v for k, v in objects.items() if k != "output files"), Count.exact(0))

    read = {"input": float(pixels * bands * itemsize), "passes": scene_passes}
    rated = rates.lookup(job.method.name, "gpu" if gpu else "cpu")
    out = Plan(job, job.method.name, family, info.kind, tuple(info.shape), shape, bands,
               len(selected_bands(job, info)), str(info.dtype), scenes.count, slots, reads_in_place, valid, remote,
               tiles, chunk, tasks, objects, removed, read, written, puts, gets, patch_pixels, rated,
               in_flight=in_flight or max(2, 2 * workers), price_hour=price_hour, prices=rates.prices,
               rates_file=str(rates.user or SHIPPED_RATES), notes=notes)
    if rated is not None:
        out.seconds = _stage_seconds(out, rated, checked.truth is not None)
        out.start = rated.start if start is None else start
        if remote:  # each scene's lease object: taken, renewed while the scene runs, released
            each = out.wall * min(scenes.count, out.in_flight) / scenes.count
            out.puts = out.puts + Count.exact(2 + int(each / LEASE_RENEW_SECONDS))
    elif start is not None:
        out.start = start
    return out


def _stage_seconds(p: Plan, r: StageRates, truth: bool) -> dict[str, float]:
    """One scene's pixel work per stage on the plan's slots (export: in the client), without fixed seconds."""
    out: dict[str, float] = {}
    for stage in STAGES:
        if stage == "metrics" and not truth:
            continue
        rate = r.rate(stage)
        if rate is None:
            continue
        pixels = p.patch_pixels if stage == "segment" and p.patch_pixels is not None else p.pixels
        out[stage] = pixels / (rate * 1e6 * (1 if stage == "export" else p.slots.rated))
    return out


def _model_tasks(view: tuple[int, ...], tile_size: int, pgrid: PatchGrid, batch_size: int,
                 slots: Slots) -> dict[str, int]:
    """The model path's tasks as :func:`segpipe.methods.segment.infer_and_stitch` submits them, every patch
    assumed to hold a valid pixel: validity units of patch rows, inference units of whole batches, and stitch
    units of the tiles each inference unit makes ready."""
    from segpipe.methods.segment import UNIT_PATCHES

    tgrid = TileGrid(view, tile_size)
    patches = list(itertools.product(*(range(c) for c in pgrid.counts)))
    batches = [patches[k:k + batch_size] for k in range(0, len(patches), batch_size)]
    largest = max(1, UNIT_PATCHES["gpu" if slots.gpu else "cpu"] // batch_size)
    units = guided_units(list(enumerate(batches)), slots.model, largest=largest)
    unit_of = {i: u for u, unit in enumerate(units) for _, b in unit for i in b}
    ready: dict[int, list] = {}
    for t in tgrid:
        waits = [unit_of[i] for i in pgrid.covering(t.core) if i in unit_of]
        ready.setdefault(max(waits) if waits else -1, []).append(t.index)
    stitch = sum(len(guided_units(group, slots.cpu)) for group in ready.values())
    rows = len(guided_units(range(pgrid.counts[0]), slots.cpu))
    return {"patches": rows, "infer": len(units), "stitch": stitch}


def _image_shards(bands: int, shape: tuple[int, ...], chunk: int, bytes_per_pixel: int) -> tuple[int, ...] | None:
    from segpipe.tiling.ingest import image_shards

    return image_shards(bands, shape, chunk, bytes_per_pixel)


def _ingest_bands(shape: tuple[int, ...], chunk: int, bytes_per_pixel: int) -> int:
    """Ingest tasks (and marks): one per band of chunk rows (:func:`segpipe.tiling.ingest.band_layout`)."""
    from segpipe.tiling.ingest import band_layout

    rows = -(-shape[0] // chunk)
    return -(-rows // band_layout(shape, chunk, bytes_per_pixel)[0])


def _sharded_objects(cgrid: TileGrid, shards: tuple[int, ...] | None) -> int:
    """Objects of an array on ``cgrid``'s chunks: a chunk each, or a shard each (the spatial part of ``shards``)."""
    if shards is None:
        return len(cgrid)
    spatial = shards[-len(cgrid.shape):]
    return math.prod(-(-n // s) for n, s in zip(cgrid.shape, spatial, strict=True))


def _classical_units(shape: tuple[int, ...], tile_size: int, chunk: int, tgrid: TileGrid, chunks: int, slots: int,
                     maybe: Callable[[int], Count]) -> tuple[int, Count, Count]:
    """A classical segment stage as :func:`segpipe.methods.segment._run_classical` cuts it: its tasks, the class
    map's objects and the completion marks. An image's class map is sharded by bands of tile rows, units take whole
    shards and each shard is marked in one object; a volume's is a chunk each, marked a run of tiles at a time
    (:func:`segpipe.methods.classical_tiles.tile_runs`)."""
    from segpipe.methods.classical_tiles import class_shards, shard_groups, tile_runs

    shards = class_shards(shape, tile_size, chunk)
    every = [t.index for t in tgrid]
    if shards is None:
        units = guided_units(every, slots)
        runs = sum(len(tile_runs(tgrid, unit)) for unit in units)
        return len(units), maybe(chunks), maybe(runs)
    groups = shard_groups(tgrid, every, shards)
    units = guided_units(groups, slots)
    return len(units), maybe(len(groups)), maybe(len(groups))


def _model_grid(shape: tuple[int, ...], scale: tuple[float, ...]) -> tuple[int, ...]:
    from segpipe.tiling.resample import Axis

    return tuple(Axis(n, r).n_out for n, r in zip(shape, scale, strict=True))


def _row_bands_of(shape: tuple[int, ...], bands: int, multiple: int) -> list[Box]:
    """The statistics' slabs (:func:`segpipe.tiling.stats._row_bands`) of a scene of ``shape`` and ``bands``."""
    from segpipe.tiling.stats import _row_bands

    return _row_bands(SimpleNamespace(shape=shape, count=bands), multiple)  # type: ignore[arg-type]


def _sample_size() -> int:
    from segpipe.tiling.stats import SAMPLE_PIXELS

    return SAMPLE_PIXELS


def _samples(method: Any) -> bool:
    """Whether a classical method's fit takes the scene-wide pixel sample (a second pass of slabs): the
    clustering methods, whose ``fit`` reads ``ctx.sample_pixels`` directly or through their shared helper."""
    names = type(method).fit.__code__.co_names
    return "sample_pixels" in names or "_standardised_sample" in names


def _known_valid(c: Checked) -> bool:
    """Whether the header says every pixel is valid (no chunk or patch is then skipped): an integer raster with no
    nodata, mask or alpha and no ``nodata`` in the job, or an integer volume without one. Slides (tissue masks)
    and mosaics (item footprints) are known only from their pixels."""
    info, job = c.info, c.job
    if info.mosaic is not None or job.nodata is not None or np.dtype(info.dtype).kind not in "iub":
        return False
    if info.kind == "volume":
        return True
    if info.kind != "raster":
        return False
    from segpipe.io.readers import open_reader
    from segpipe.tiling.ingest import selected_bands

    with open_reader("raster", info.path, selected_bands(job, info), None, info.level) as reader:
        return reader.valid_everywhere()


def _coordinate_objects(c: Checked, nd: int) -> int:
    """Objects of the result's coordinates: x and y (an array and a chunk each) and spatial_ref's zarr.json of an
    image with a CRS; z, y and x of a volume whose axes are the world's."""
    geo = c.geometry
    if nd == 3:
        return 0 if geo.world_axes() is None else 6
    return 4 + (1 if geo.crs is not None else 0)


def _output_files(c: Checked, pixels: int, n_classes: int) -> tuple[int, float]:
    """Files in the output folder (exports, metrics, a mosaic's record) and the exports' bytes at most."""
    files, size = 1, 0.0  # metrics/summary.json
    for name in c.exports:
        if name == "cog":
            files += 1
            size += pixels * 4 / 3  # uint8 classes and their overviews
            if c.job.probabilities:
                files += 1
                size += pixels * (n_classes + 1) * 4 / 3
        elif name == "nifti":
            files += 1
            size += pixels
        elif name == "dicom-seg":  # one bit per voxel and segment, empty frames left out
            files += 1
            size += pixels * max(1, n_classes - 1) / 8
        elif name == "polygons":  # measured 0.4 bytes per pixel (otsu on a satellite image: noisy); bound 1
            files += 1
            size += pixels
        elif name == "qupath":  # GeoJSON text; measured (otsu, CMU slide) 1.3 bytes per pixel at level 0, 3.7 at
            files += 1  # level 1, whose level-0 coordinates have fractions: bound 4
            size += pixels * 4
        else:  # ome-zarr: a store of its own, counted as one file here
            files += 1
            size += pixels * (1 + c.info.count) * 4 / 3
    if c.truth is not None:
        files += 3  # tiles.csv, tiles.geojson (report.html too, by now) ...
    if c.info.mosaic is not None:
        files += 1
    from segpipe.report.stac_item import wants_item

    if wants_item(c.geometry):
        files += 1  # item.json, the run's STAC Item
    return files, size


# ---------------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """What a calibration measured and where it wrote it."""

    method: str
    device: str
    entry: dict[str, Any]
    path: Path
    shape: tuple[int, ...]
    slots: int

    def line(self) -> str:
        e = self.entry
        parts = [f"{s} {e[s]:g}" for s in ("ingest", "segment", "metrics") if s in e]
        per = "per GPU worker" if self.device == "gpu" else "per core"
        geo = "x".join(str(v) for v in self.shape[::-1])
        return (f"measured: {self.method} on {self.device}: {', '.join(parts)} Mpx/s {per}, export "
                f"{e['export']:g} Mpx/s in the client, start {e['start']:g} s, on a {geo} crop with {self.slots} "
                f"slot(s) -> {self.path}")


def calibrate(job: JobSpec, path: Path, workers: int, threads: int, gpu: bool,
              edge: int | None = None) -> Calibration:
    """Run the job's method on an ``edge``² crop of its input (from the middle, mirrored out where the input is
    smaller; default :data:`CALIBRATION_EDGE`, within :data:`CALIBRATION_BYTES`) and on one of half that side, in
    a temporary folder, on a LocalCluster of ``workers`` x ``threads``; fit each stage's seconds as fixed + pixels
    / rate between the two and write the rates to ``path`` under the method's name (the file's other entries
    stay). A first run warms the workers (imports, the model) and is not measured; the start is this process's
    time until the job was checked, the cluster's start and what the first run took over the second. Volumes and
    slides run whole (up to 4 x 1024² voxels or pixels)."""
    import psutil

    from segpipe.pipeline import check
    from segpipe.tiling.ingest import selected_bands

    checked = check(job, stores=False)
    # what a run spends before its cluster: the interpreter, imports and the check (a model loaded), until now
    before = time.time() - psutil.Process().create_time()
    family = FAMILY_OF[job.method.name]
    if gpu and family != "model":
        raise InputError(f"--gpu does not help {job.method.name}: a {family} method runs on CPU cores; "
                         "calibrate without --gpu")
    gpus = 0
    if gpu:
        from segpipe.runtime.cluster import cuda_devices

        gpus = cuda_devices()
        if gpus < 1:
            raise InputError("calibrating GPU rates needs a GPU on this machine (none is visible)")
    info = checked.info
    if info.mosaic is not None:
        raise InputError("calibration crops one raster; this job's input is a mosaic: calibrate with a job on one "
                         "of its items")
    if info.kind != "raster" and math.prod(info.shape) > 4 * CALIBRATION_EDGE["model"] ** 2:
        raise InputError(f"calibration crops GeoTIFFs; this {info.kind} is larger than 4 x "
                         f"{CALIBRATION_EDGE['model']}² px: calibrate with a job on a smaller one of its kind")
    if edge is None:  # a few seconds of a model's work; a cheap method's per-pixel time must show above its fixed
        edge = CALIBRATION_EDGE["model" if family == "model" else "other"]
    bytes_per_px = len(selected_bands(job, info)) * np.dtype(info.dtype).itemsize
    edge = max(256, min(edge, int(math.sqrt(CALIBRATION_BYTES / bytes_per_px)) // 256 * 256))
    with tempfile.TemporaryDirectory(prefix="segpipe-calibrate-") as tmp:
        folder = Path(tmp)
        if info.kind == "raster":
            full = _crop(info, folder / "crop.tif", edge)
            half = _crop(info, folder / "half.tif", edge // 2)
            inputs = [full, full, half, full, half]
        else:
            inputs = [info.path, info.path, info.path]
        cluster_start, runs = _timed_runs(job, checked, folder, inputs, workers, threads, gpu)
    warm, measured, *rest = _fastest(runs)
    device = "gpu" if gpu else "cpu"
    slots = gpus if gpu else workers * threads  # a GPU worker each, with the CPU workers beside them
    entry = _fit(measured, rest[0] if rest else None, family == "model", slots, checked.truth is not None
                 and not checked.truth.is_image)
    entry["start"] = round(before + cluster_start + max(0.0, sum(warm[1].values()) - sum(measured[1].values())), 2)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    if gpu:
        import torch

        machine += f", {torch.cuda.get_device_name(0)}"
    crop = "x".join(str(v) for v in measured[0][::-1])
    entry["measured"] = (f"{time.strftime('%Y-%m-%d', time.gmtime())}, {machine}, {workers} worker(s) x {threads} "
                         f"thread(s); segpipe plan --calibrate on a {crop} crop of {Path(str(info.path)).name}")
    _write_rates(path, job.method.name, device, entry)
    return Calibration(job.method.name, device, entry, path, measured[0], slots)


Run = tuple[tuple[int, ...], dict[str, float], int]  # (shape, stage seconds, pixels segmented: patch pixels of a model)


def _timed_runs(job: JobSpec, checked: Checked, folder: Path, inputs: list[str], workers: int, threads: int,
                gpu: bool) -> tuple[float, list[Run]]:
    """The seconds a LocalCluster took to start, then the job run on each input in turn on it: each run's shape,
    stage seconds and segmented pixels."""
    from segpipe.config import ClusterSpec, job_from_dict
    from segpipe.pipeline import check, run_job
    from segpipe.runtime.cluster import connect

    spec = ClusterSpec(kind="local", n_workers=workers, threads_per_worker=threads, processes="yes",
                       gpu="yes" if gpu else "no", dashboard=None, memory_limit=job.cluster.memory_limit)
    keep_truth = checked.truth is not None and not checked.truth.is_image  # vector truth fits any crop
    out: list[Run] = []
    t0 = time.perf_counter()
    with connect(spec, in_process=False) as client:
        started = time.perf_counter() - t0
        for k, source in enumerate(inputs):
            data = job.model_dump(mode="json")
            data.update(input=source, output=str(folder / f"run{k}"), store=None, overwrite=False, keep_work=False,
                        instances=None, busy=None, exports=None, cluster=spec.model_dump(mode="json"))
            if not keep_truth:
                data["truth"] = None
            run = job_from_dict(data, folder)
            edge = max(_shape_of(source, checked))
            if run.tile_size > edge:  # the crop is one tile, as an archive clips a small item's (archive.fit_tile)
                step = run.chunk_size or 1
                run.tile_size = max(64, -(-edge // step) * step)
            c = check(run, stores=False)
            outcome = run_job(c, client)
            px = math.prod(c.info.shape)
            if c.plan.model is not None:
                view = c.info.shape if c.plan.scale is None else _model_grid(c.info.shape, c.plan.scale)
                grid = PatchGrid(view, run.method.patch_size, run.method.overlap)
                px = math.prod(grid.counts) * math.prod(grid.size)
            out.append((tuple(c.info.shape), dict(outcome.stage_seconds), px))
    return started, out


def _shape_of(source: str, checked: Checked) -> tuple[int, ...]:
    if source == checked.info.path:
        return tuple(checked.info.shape)
    import rasterio

    with rasterio.open(source) as ds:
        return (ds.height, ds.width)


def _fastest(runs: list[Run]) -> list[Run]:
    """The warm-up run, then each size's runs folded into one with the least seconds of each stage (the usual
    reading of repeated timings on a machine that other work shares)."""
    warm, *timed = runs
    sizes: dict[tuple[int, ...], Run] = {}
    for shape, seconds, px in timed:
        if shape in sizes:
            seconds = {k: min(v, sizes[shape][1].get(k, v)) for k, v in seconds.items()}
        sizes[shape] = (shape, seconds, px)
    return [warm, *sizes.values()]


def _fit(full: Run, half: Run | None, model: bool, slots: int, metrics: bool) -> dict[str, Any]:
    """Each stage's rate (Mpx/s per slot; the export's in the client) and fixed seconds, from two runs of different
    size: seconds = fixed + pixels / rate. From one run, or where the fit says the fixed part is negative or more
    than half the stage (timing noise on too small a crop): the plain rate of the larger run, no fixed part."""
    entry: dict[str, Any] = {}
    fixed: dict[str, float] = {}
    for stage in STAGES:
        if stage not in full[1] or (stage == "metrics" and not metrics):
            continue
        px = full[2] if stage == "segment" and model else math.prod(full[0])
        s = full[1][stage]
        rate, fixed[stage] = px / max(s, 1e-6), 0.0
        if half is not None and stage in half[1]:
            hpx = half[2] if stage == "segment" and model else math.prod(half[0])
            slope = (s - half[1][stage]) / max(1, px - hpx)
            if slope > 0 and 0 <= s - slope * px <= s / 2:  # else the crops were too small to tell: no fixed part
                rate, fixed[stage] = 1 / slope, round(s - slope * px, 3)
        entry[stage] = float(f"{rate / 1e6 / (1 if stage == 'export' else slots):.3g}")
    entry["fixed"] = fixed
    return entry


def _crop(info: Any, dest: Path, edge: int) -> str:
    """An ``edge``² scene from the middle of a raster as a tiled GeoTIFF (256² blocks: read in place, like most
    COGs); a raster smaller than that is mirrored out to it (derived pixels of the same kind)."""
    import rasterio
    from rasterio.windows import Window

    h, w = min(edge, info.height), min(edge, info.width)
    window = Window((info.width - w) // 2, (info.height - h) // 2, w, h)
    with rasterio.open(info.path) as src:
        data = src.read(window=window)
        if (h, w) != (edge, edge):
            data = np.pad(data, ((0, 0), (0, edge - h), (0, edge - w)), mode="symmetric")
        profile = {"driver": "GTiff", "height": edge, "width": edge, "count": src.count, "dtype": src.dtypes[0],
                   "crs": src.crs, "transform": src.window_transform(window), "nodata": src.nodata,
                   "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
        with rasterio.open(dest, "w", **profile) as dst:
            dst.write(data)
            for b in range(1, src.count + 1):
                if src.descriptions[b - 1]:
                    dst.set_band_description(b, src.descriptions[b - 1])
    return str(dest)


def _write_rates(path: Path, method: str, device: str, entry: dict[str, Any]) -> None:
    """Put ``entry`` under ``rates.<method>.<device>`` of the YAML at ``path`` (made if missing), atomically."""
    from segpipe.io.store import write_atomic

    doc = _read_rates(path) if path.is_file() else {}
    doc.setdefault("version", 1)
    doc.setdefault("rates", {}).setdefault(method, {})[device] = {
        k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}
    try:
        write_atomic(path, "# segpipe stage rates (see segpipe/sample/rates.yaml for what each figure is)\n"
                     + yaml.safe_dump(doc, sort_keys=False))
    except OSError as exc:
        raise InputError(f"rates file {path} cannot be written ({exc.strerror or exc})") from None
