"""Cost per tile at ~10^3, 10^4 and 10^5 tiles, the client's and scheduler's peak memory, store objects and S3
requests (issue 27, part 4).

Why this shape: a cost that grows with the tile count (Python lists of every tile on the client, a scheduler
holding every task, a listing of every completion mark) hides on the small scenes the other benchmarks use and
only shows at 10^5 tiles and beyond. So the tile size is fixed (64 px: the smallest segpipe allows, where per-tile
machinery weighs most against the work) and the scene grows: 2048², 6400² and 20480² give 32², 100² and 320²
tiles. Per-tile cost is each stage's wall seconds (``metrics/summary.json``'s ``stage_seconds``) over the tile
count, so like is compared with like; the ratio at 10^5 over 10^3 should stay near 1 (goal ≤ 1.2).

The scene is derived, never committed: a GDAL VRT repeating the SpaceNet sample (900² uint16, nodata 0) on its
own grid, so even 20480² costs no disk and no time to make; segpipe reads it in place like any tiled GeoTIFF
(its 256² blocks nest with the 64-px chunks). The method is otsu (cheap: the machinery is what is measured).

The cluster is a loopback one made of real processes, started afresh for every run: a ``dask scheduler`` of its
own and two ``dask worker`` processes (one thread each, with the allocator settings segpipe gives its own
workers), and the job (``segpipe run`` with ``cluster.scheduler``) as a third process, the client. So each
figure belongs to one process: the client's peak RSS is the kernel's exact high-water mark of that child
(``os.wait4``'s rusage), the scheduler's and workers' their ``VmHWM`` read after the run while they still live.
(With a LocalCluster of worker processes the scheduler would run inside the client process and their memory
could not be told apart.)

Store objects: every file a run leaves in its output (each store, its completion marks under ``_segpipe_done``,
the exports, metrics), per MB of the class map (1 byte a pixel: the result a user gets). S3 requests: one run
with ``store: s3://…`` against moto's S3 server on loopback, started in this process; every request the server
answers is one ``werkzeug`` log record (its request line), counted here by method and kind.

``--smoke``: tiny scenes (128² and 256²), one repetition, same code path, no figure asserted (tests run it).
Run: ``python benchmarks/bench_tile_curve.py`` (~10-15 min here) or ``run_all.py tile_curve``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import rasterio
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import SAMPLE, fmt, load_average, median_spread  # noqa: E402

TILE = 64
# tile count (nominal) -> scene edge in px: 32², 100², 320² tiles of 64 px
SIZES = {1_000: 2048, 10_000: 6400, 100_000: 20480}
SMOKE_SIZES = {4: 128, 16: 256}
STAGES = ("ingest", "segment", "export")
# The allocator settings segpipe gives the workers of the LocalCluster it makes (segpipe.runtime.cluster); a
# cluster of the user's own has whatever its user set, these are what a segpipe-made one would have.
WORKER_ENV = {"MALLOC_TRIM_THRESHOLD_": str(128 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}


def vrt_scene(path: Path, size: int, source: Path = SAMPLE / "spacenet_pan.tif") -> Path:
    """A ``size``² VRT repeating ``source`` from its own origin (derived, never a file of pixels): the sample's
    CRS, pixel size and nodata, 256² blocks."""
    with rasterio.open(source) as src:
        h, w = src.height, src.width
        t, crs, nodata = src.transform, src.crs, src.nodata
        dtype = {"uint16": "UInt16", "uint8": "Byte"}[src.dtypes[0]]
    parts = []
    for top in range(0, size, h):
        for left in range(0, size, w):
            ph, pw = min(h, size - top), min(w, size - left)
            parts.append(
                f'<SimpleSource><SourceFilename relativeToVRT="0">{source}</SourceFilename><SourceBand>1</SourceBand>'
                f'<SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="{dtype}" BlockXSize="256" '
                f'BlockYSize="256"/><SrcRect xOff="0" yOff="0" xSize="{pw}" ySize="{ph}"/>'
                f'<DstRect xOff="{left}" yOff="{top}" xSize="{pw}" ySize="{ph}"/></SimpleSource>')
    nd = "" if nodata is None else f"<NoDataValue>{nodata:g}</NoDataValue>"
    path.write_text(
        f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{crs.to_wkt()}</SRS>'
        f"<GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>"
        f'<VRTRasterBand dataType="{dtype}" band="1" blockXSize="256" blockYSize="256">{nd}'
        f'{"".join(parts)}</VRTRasterBand></VRTDataset>\n')
    return path


def hwm(pid: int) -> int:
    """A live process's peak RSS so far (the kernel's ``VmHWM``), bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class LoopbackCluster:
    """A ``dask scheduler`` and ``workers`` × ``dask worker`` (1 thread each), each its own process on 127.0.0.1."""

    folder: Path
    workers: int = 2
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    address: str = ""

    def start(self) -> LoopbackCluster:
        dask = str(Path(sys.executable).with_name("dask"))
        env = {**os.environ, **self.env, **WORKER_ENV}
        file = self.folder / "scheduler.json"
        file.unlink(missing_ok=True)
        # Started outside the repository, so that PYTHONPATH alone says which segpipe runs (``--baseline``).
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": self.folder}
        self.procs.append(subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                            "--no-dashboard", "--scheduler-file", str(file)], **quiet))
        for _ in range(self.workers):
            self.procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(file), "--nthreads", "1",
                                                "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "4GiB",
                                                "--local-directory", str(self.folder)], **quiet))
        from distributed import Client

        deadline = time.monotonic() + 60
        while not file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.1)
        self.address = json.loads(file.read_text())["address"]
        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(self.workers, timeout=60)
        return self

    @property
    def scheduler_pid(self) -> int:
        return self.procs[0].pid

    def worker_pids(self) -> list[int]:
        """The worker processes (each ``dask worker`` is a nanny with the worker as its child)."""
        pids = []
        for p in self.procs[1:]:
            try:
                pids += [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            except psutil.Error:
                pass
        return pids

    def stop(self) -> None:
        for p in reversed(self.procs):  # the processes this object started, by their own ids
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


@contextmanager
def loopback_cluster(folder: Path, env: dict[str, str] | None = None) -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster(folder, env=env or {})
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def count_objects(output: Path) -> dict[str, int]:
    """Files a run left in its output, by where they lie: each store, the completion marks (``_segpipe_done``,
    split by store), the exports and metrics."""
    counts: Counter[str] = Counter()
    for root, _, files in os.walk(output):
        rel = Path(root).relative_to(output).parts
        if not files:
            continue
        if not rel:
            where = "exports"
        elif rel[0] == "_segpipe_done":
            where = f"marks {rel[1]}" if len(rel) > 1 else "marks"
        elif rel[0].endswith(".zarr"):
            where = rel[0]
        else:
            where = rel[0]
        counts[where] += len(files)
    return dict(counts)


def count_bucket(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Objects under an S3 prefix, by store (marks apart), listed with the S3 API (not counted as the run's)."""
    counts: Counter[str] = Counter()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            parts = o["Key"][len(prefix):].lstrip("/").split("/")
            counts[f"marks {parts[1]}" if parts[0] == "_segpipe_done" else parts[0]] += 1
    return dict(counts)


def output_bytes(output: Path) -> int:
    return sum(f.stat().st_size for f in output.rglob("*") if f.is_file())


def run_one(scene: Path, size: int, tmp: Path, name: str, store: str | None = None,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """One ``segpipe run`` (otsu, 64-px tiles) on a fresh loopback cluster; its stage seconds, wall seconds, the
    client's, scheduler's and workers' peak RSS, and the files it left.

    The client's peak is given twice: over the whole run (exact, from ``os.wait4``), and until its export starts
    (sampled every 20 ms): the COG export runs in the client and holds strips of the scene's width, a cost of
    the scene's width rather than of its tile count. ``env`` reaches the cluster and the client (``PYTHONPATH``:
    which segpipe runs).
    """
    out = tmp / name
    job = {"input": str(scene), "output": str(out), "tile_size": TILE, "method": {"name": "otsu"}}
    if store:
        job["store"] = store
    with loopback_cluster(tmp, env) as cluster:
        job["cluster"] = {"scheduler": cluster.address}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "segpipe.cli", "run", str(path)], cwd=tmp,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **(env or {}), "PYTHONWARNINGS": "ignore"})
        errors: list[str] = []
        exporting = threading.Event()
        ended = threading.Event()

        def read() -> None:
            for line in child.stderr:
                if line.startswith("segpipe: export"):
                    exporting.set()
                errors.append(line)

        def sample() -> None:
            proc = psutil.Process(child.pid)
            while not exporting.is_set() and not ended.is_set():
                try:
                    before_export[0] = max(before_export[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.02)

        before_export = [0]
        threads = [threading.Thread(target=read), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its exact peak RSS
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        ended.set()
        for t in threads:
            t.join()
        if child.returncode:
            raise RuntimeError(f"segpipe run failed ({child.returncode}): {''.join(errors)[-3000:]}")
        scheduler = hwm(cluster.scheduler_pid)
        workers = [hwm(p) for p in cluster.worker_pids()]
    summary = json.loads((out / "metrics" / "summary.json").read_text())
    tiles = (-(-size // TILE)) ** 2
    return {"size": size, "tiles": tiles, "seconds": seconds, "stage_seconds": summary["stage_seconds"],
            "client_peak_mib": usage.ru_maxrss / 1024, "client_before_export_mib": before_export[0] / 2**20,
            "scheduler_peak_mib": scheduler / 2**20, "worker_peak_mib": max(workers, default=0) / 2**20,
            "output": out}


class RequestCounter(logging.Handler):
    """Counts the requests moto's server answers: werkzeug logs one record per request, its request line first."""

    LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) ')

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        m = self.LINE.search(record.getMessage())
        if m is None:
            return
        method, path = m["method"], m["path"]
        query = path.split("?", 1)[1] if "?" in path else ""
        if method == "GET" and ("list-type" in query or "prefix=" in query or path.rstrip("/").count("/") <= 1):
            method = "LIST"
        self.counts[method] += 1


@contextmanager
def moto_server(bucket: str) -> Iterator[tuple[dict[str, str], RequestCounter, Any]]:
    """moto's S3 server on 127.0.0.1 with ``bucket``; yields the AWS environment that reaches it, the request
    counter and a boto3 client (whose own requests are taken out of the counts by the caller)."""
    import boto3
    from moto.server import ThreadedMotoServer

    counter = RequestCounter()
    log = logging.getLogger("werkzeug")
    log.addHandler(counter)
    log.setLevel(logging.INFO)
    log.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                      aws_secret_access_key="bench-secret", region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    try:
        yield env, counter, s3
    finally:
        server.stop()
        log.removeHandler(counter)


_BUCKETS = itertools.count(1)


def s3_run(scene: Path, size: int, tmp: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One run with its stores on moto's S3: requests by method and objects left, per Gpx and per MB of class map.

    Each run gets a bucket of its own: moto keeps its buckets in the process, across server restarts, and a run
    finding another's stores would resume them instead of writing its own.
    """
    bucket = f"bench-{os.getpid()}-{next(_BUCKETS)}"
    with moto_server(bucket) as (aws, counter, s3):
        counter.counts.clear()
        r = run_one(scene, size, tmp, f"s3_{size}", store=f"s3://{bucket}/run", env={**(env or {}), **aws})
        requests = dict(counter.counts)
        objects = count_bucket(s3, bucket, "run/")
    import shutil

    shutil.rmtree(r.pop("output"))
    mpx = size**2 / 1e6
    total = sum(requests.values())
    return {"tiles": r["tiles"], "requests": requests, "total": total, "per_gpx": total / (mpx / 1e3),
            "objects": objects, "objects_total": sum(objects.values()),
            "objects_per_mb_class_map": sum(objects.values()) / mpx, "stage_seconds": r["stage_seconds"],
            "seconds": r["seconds"]}


def objects_row(r: dict[str, Any], objects: dict[str, int]) -> dict[str, Any]:
    """Objects a run left, in total and per MB of class map (1 B/px) and per MB of what it wrote."""
    total = sum(objects.values())
    mpx = r["size"] ** 2 / 1e6
    written = output_bytes(r["output"]) / 1e6
    return {"tiles": r["tiles"], "objects": objects, "total": total, "per_mb_class_map": total / mpx,
            "output_mb": written, "per_mb_written": total / written if written else float("nan")}


def run(sizes: dict[int, int] | None = None, reps: int = 3, large_reps: int = 1, s3_sizes: tuple[int, ...] = (),
        smoke: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Alternate the sizes round by round (the largest only in the first ``large_reps`` rounds), then the S3
    runs. Returns every run's figures, the per-tile ratios and the object and request counts."""
    import shutil

    sizes = sizes or (SMOKE_SIZES if smoke else SIZES)
    largest = max(sizes)
    load_start = load_average()
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    objects: dict[int, dict[str, Any]] = {}
    s3: dict[int, dict[str, Any]] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEGPIPE_BENCH_TMP")) as tmp_name:
        tmp = Path(tmp_name)
        scenes = {n: vrt_scene(tmp / f"scene_{size}.vrt", size) for n, size in sizes.items()}
        for k in range(reps):
            for n, size in sizes.items():
                if n == largest and k >= large_reps:
                    continue
                r = run_one(scenes[n], size, tmp, f"run_{size}_{k}", env=env)
                if n not in objects:
                    objects[n] = objects_row(r, count_objects(r["output"]))
                shutil.rmtree(r.pop("output"))
                runs[n].append(r)
                log(r)
        for n in s3_sizes:
            s3[n] = s3_run(scenes[n], sizes[n], tmp, env)
            print(f"S3 {s3[n]['tiles']} tiles: {s3[n]['total']} requests {s3[n]['requests']}", file=sys.stderr)
    return summarise(runs, objects, s3, sizes, load_start, time.perf_counter() - t_start)


def log(r: dict[str, Any], label: str = "") -> None:
    print(f"{label}{r['tiles']:>7} tiles: {r['seconds']:.1f} s, stages {r['stage_seconds']}, client "
          f"{r['client_peak_mib']:.0f} MiB ({r['client_before_export_mib']:.0f} before export), scheduler "
          f"{r['scheduler_peak_mib']:.0f} MiB", file=sys.stderr)


def compare(baseline: Path, sizes: dict[int, int], reps: int = 2, s3_size: int | None = None) -> dict[str, Any]:
    """The same runs with another segpipe (``baseline``: a folder holding its ``segpipe`` package, put first on
    PYTHONPATH) and with this one, alternated: stage seconds and objects of each; with ``s3_size``, one S3 run
    of each too. For a change to the store layout, whose effect on speed must be told from this VM's drift."""
    import shutil

    envs = {"baseline": {"PYTHONPATH": str(baseline)}, "this": {}}
    out: dict[str, Any] = {"sizes": sizes, "reps": reps, "load_start": load_average(),
                           "runs": {who: {n: [] for n in sizes} for who in envs}, "objects": {who: {} for who in envs},
                           "s3": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEGPIPE_BENCH_TMP")) as tmp_name:
        tmp = Path(tmp_name)
        scenes = {n: vrt_scene(tmp / f"scene_{size}.vrt", size) for n, size in sizes.items()}
        for k in range(reps):
            for n, size in sizes.items():
                for who, env in (envs.items() if k % 2 == 0 else reversed(envs.items())):
                    r = run_one(scenes[n], size, tmp, f"{who}_{size}_{k}", env=env)
                    if n not in out["objects"][who]:
                        out["objects"][who][n] = objects_row(r, count_objects(r["output"]))
                    shutil.rmtree(r.pop("output"))
                    out["runs"][who][n].append(r)
                    log(r, f"{who}: ")
        if s3_size:
            for who, env in envs.items():
                out["s3"][who] = s3_run(scenes[s3_size], sizes[s3_size], tmp, env)
                print(f"{who} S3: {out['s3'][who]['total']} requests", file=sys.stderr)
    out["load_end"] = load_average()
    return out


def compare_table(c: dict[str, Any]) -> list[str]:
    """Markdown of a :func:`compare`: per size, each segpipe's stage seconds (median, min–max) and objects."""
    lines = ["| tiles | segpipe | ingest s | segment s | export s | objects left | per MB of class map |",
             "|---|---|---|---|---|---|---|"]
    for n, size in c["sizes"].items():
        for who in ("baseline", "this"):
            rs = c["runs"][who][n]
            o = c["objects"][who][n]
            cells = [fmt([r["stage_seconds"].get(st, 0.0) for r in rs]) for st in STAGES]
            lines.append(f"| {rs[0]['tiles']:,} ({size}²) | {who} | {' | '.join(cells)} | {o['total']:,} | "
                         f"{o['per_mb_class_map']:.1f} |")
    for who, s in c["s3"].items():
        lines.append(f"- S3 store, {s['tiles']:,} tiles, {who}: {s['total']:,} requests "
                     f"({', '.join(f'{k} {v:,}' for k, v in sorted(s['requests'].items()))}), "
                     f"{s['per_gpx']:,.0f} per Gpx; {s['objects_total']:,} objects")
    lines.append(f"- load average at the start {c['load_start']}, at the end {c['load_end']}")
    return lines


def per_tile(rs: list[dict[str, Any]], stage: str) -> list[float]:
    """Seconds per tile of ``stage`` (``total``: the stages' sum; ``process``: the client's whole wall time)."""
    if stage == "process":
        return [r["seconds"] / r["tiles"] for r in rs]
    if stage == "total":
        return [sum(r["stage_seconds"].values()) / r["tiles"] for r in rs]
    return [r["stage_seconds"].get(stage, 0.0) / r["tiles"] for r in rs]


def summarise(runs: dict[int, list[dict[str, Any]]], objects: dict[int, dict[str, Any]], s3: dict[int, dict],
              sizes: dict[int, int], load_start: str, seconds: float) -> dict[str, Any]:
    """Per-tile medians and spreads, the ratios of the largest size over the smallest (median over median, and
    the paired rounds' range), client RSS growth per tile."""
    small, large = min(sizes), max(sizes)
    ratios = {}
    for stage in (*STAGES, "total", "process"):
        a, b = per_tile(runs[small], stage), per_tile(runs[large], stage)
        paired = [y / x for x, y in zip(a, b, strict=False) if x > 0]
        ratios[stage] = {"median": median_spread(b)[0] / median_spread(a)[0] if median_spread(a)[0] else
                         float("nan"), "paired": paired}
    # Marginal cost per tile between consecutive sizes: the fixed costs of a stage (its tasks' start, the fit,
    # opening stores) weigh on the per-tile cost of a small run and cancel out here.
    ordered = sorted(sizes)
    marginal: dict[str, list[float]] = {}
    for stage in (*STAGES, "total", "process"):
        med = [median_spread([t * r["tiles"] for t, r in zip(per_tile(runs[n], stage), runs[n], strict=True)])[0]
               for n in ordered]
        tiles = [runs[n][0]["tiles"] for n in ordered]
        marginal[stage] = [(med[i + 1] - med[i]) / (tiles[i + 1] - tiles[i]) for i in range(len(ordered) - 1)]
    growth = {}
    for what in ("client_peak_mib", "client_before_export_mib", "scheduler_peak_mib", "worker_peak_mib"):
        a = median_spread([r[what] for r in runs[small]])[0]
        b = median_spread([r[what] for r in runs[large]])[0]
        growth[what] = (b - a) * 2**20 / (runs[large][0]["tiles"] - runs[small][0]["tiles"])
    return {"sizes": sizes, "runs": runs, "ratios": ratios, "marginal": marginal, "growth_bytes_per_tile": growth,
            "objects": objects,
            "s3": s3, "load_start": load_start, "load_end": load_average(), "seconds": seconds}


def table(res: dict[str, Any]) -> list[str]:
    """The markdown tables of a :func:`run`: per-tile cost and memory by size, ratios, objects and requests."""
    def ms(values: list[float]) -> str:
        med, lo, hi = median_spread([v * 1e3 for v in values])
        return f"{med:.3f} ({lo:.3f}–{hi:.3f})"

    def mib(values: list[float]) -> str:
        med, lo, hi = median_spread(values)
        return f"{med:.0f} ({lo:.0f}–{hi:.0f})"

    lines = ["| tiles (scene) | reps | ingest ms/tile | segment ms/tile | export ms/tile | stages ms/tile | "
             "process ms/tile | client peak MiB (before export) | scheduler peak MiB | worker peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, rs in res["runs"].items():
        size = res["sizes"][n]
        lines.append(f"| {rs[0]['tiles']:,} ({size}²) | {len(rs)} | {ms(per_tile(rs, 'ingest'))} | "
                     f"{ms(per_tile(rs, 'segment'))} | {ms(per_tile(rs, 'export'))} | {ms(per_tile(rs, 'total'))} | "
                     f"{ms(per_tile(rs, 'process'))} | {mib([r['client_peak_mib'] for r in rs])} "
                     f"({mib([r['client_before_export_mib'] for r in rs])}) | "
                     f"{mib([r['scheduler_peak_mib'] for r in rs])} | {mib([r['worker_peak_mib'] for r in rs])} |")
    small, large = min(res["sizes"]), max(res["sizes"])
    lines.append("")
    parts = []
    for stage, r in res["ratios"].items():
        paired = r["paired"]
        spread = f" (paired rounds {min(paired):.2f}–{max(paired):.2f})" if paired else ""
        parts.append(f"{stage} **{r['median']:.2f}**{spread}")
    lines.append(f"- per-tile cost at {res['runs'][large][0]['tiles']:,} ÷ at {res['runs'][small][0]['tiles']:,} "
                 f"tiles (median ÷ median): " + "; ".join(parts) + " (goal ≤ 1.2)")
    ordered = sorted(res["sizes"])
    steps = [f"{res['runs'][a][0]['tiles']:,}→{res['runs'][b][0]['tiles']:,}"
             for a, b in zip(ordered, ordered[1:], strict=False)]
    parts = []
    for stage, slopes in res["marginal"].items():
        ratio = f", last ÷ first **{slopes[-1] / slopes[0]:.2f}**" if len(slopes) > 1 and slopes[0] > 0 else ""
        parts.append(f"{stage} {' / '.join(f'{v * 1e3:.3f}' for v in slopes)}{ratio}")
    lines.append(f"- marginal cost, ms per added tile ({' / '.join(steps)}, medians): " + "; ".join(parts))
    g = res["growth_bytes_per_tile"]
    lines.append(f"- peak RSS growth per tile (median at the largest − at the smallest, ÷ the tiles between): client "
                 f"**{g['client_before_export_mib']:.0f} B** until its export, {g['client_peak_mib']:.0f} B with it; "
                 f"scheduler {g['scheduler_peak_mib']:.0f} B, worker {g['worker_peak_mib']:.0f} B (goal: client ≤ a "
                 "few hundred bytes)")
    lines += ["", "| tiles | objects left (by place) | total | per MB of class map | MB written | per MB written |",
              "|---|---|---|---|---|---|"]
    for o in res["objects"].values():
        where = ", ".join(f"{k} {v:,}" for k, v in sorted(o["objects"].items()))
        lines.append(f"| {o['tiles']:,} | {where} | {o['total']:,} | **{o['per_mb_class_map']:.1f}** | "
                     f"{o['output_mb']:.1f} | {o['per_mb_written']:.1f} |")
    if res["s3"]:
        lines += ["", "| tiles (S3 store) | requests by method | total | per Gpx | objects in the bucket | "
                  "objects per MB of class map | stage s |", "|---|---|---|---|---|---|---|"]
        for s in res["s3"].values():
            by = ", ".join(f"{k} {v:,}" for k, v in sorted(s["requests"].items()))
            objs = ", ".join(f"{k} {v:,}" for k, v in sorted(s["objects"].items()))
            stages = ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items() if v >= 0.05)
            lines.append(f"| {s['tiles']:,} | {by} | {s['total']:,} | **{s['per_gpx']:,.0f}** | {objs} | "
                         f"{s['objects_per_mb_class_map']:.1f} | {stages} |")
    lines.append("")
    lines.append(f"- load average at the start {res['load_start']}, at the end {res['load_end']}; whole benchmark "
                 f"{res['seconds'] / 60:.1f} min")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny scenes, one repetition: the code path, no figures")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--large-reps", type=int, default=3)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--baseline", type=Path, help="a folder holding another segpipe package: compare it with this "
                   "one at 10^4 and 10^5 tiles (alternated, --reps each) instead")
    a = p.parse_args(argv)
    if a.baseline:
        sizes = SMOKE_SIZES if a.smoke else {n: SIZES[n] for n in (10_000, 100_000)}
        c = compare(a.baseline.resolve(), sizes, a.reps, None if a.no_s3 else min(sizes))
        print("\n".join(compare_table(c)))
        return
    if a.smoke:
        res = run(smoke=True, reps=1, large_reps=1, s3_sizes=() if a.no_s3 else (min(SMOKE_SIZES),))
    else:
        res = run(reps=a.reps, large_reps=a.large_reps, s3_sizes=() if a.no_s3 else (1_000, 10_000))
    print("\n".join(table(res)))


if __name__ == "__main__":
    main()
