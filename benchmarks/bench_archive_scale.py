"""Archive at scale (issue 27, part 3): N items of 1 Mpx (otsu) as an archive against one job over the same pixels.

Data (derived, never committed): the SpaceNet sample (900² uint16, nodata 0) tiled with flips (as
``common.mosaic_scene`` does) into a mosaic ``cols`` items wide, cut into items of ``size``² (1024² = 1 Mpx):
each item a tiled deflate GeoTIFF georeferenced where it lies in the mosaic. The single job's scene is the
mosaic of the same items, written as one tiled GeoTIFF (BigTIFF): the same pixels, the same total work.

One cluster for everything: a ``dask scheduler`` and two ``dask worker --nthreads 1`` processes on loopback,
started here first and stopped by pid at the end, so cluster start is in no contender's figure; every
contender gets ``--scheduler`` (or ``scheduler=``) and the same tile size (``size``: an item is one tile).
Contenders, each a whole child process, alternated and repeated:

- ``single``: ``segpipe run JOB --scheduler ADDR`` on the mosaic;
- ``archive``: ``segpipe archive ITEMS JOB --output DIR --scheduler ADDR`` (default in-flight bound);
- ``flow``: ``segpipe_flows.archive.archive(ITEMS, JOB, DIR, scheduler=ADDR)`` in a process pointed at a
  Prefect server started here on a free loopback port (``PREFECT_API_URL``; stopped by pid at the end).

Reported: wall seconds, archive ÷ single and flow ÷ single per round (issue 27 goal ≤ 1.3), and the peak RSS
of the archive process (its process tree: the workers and scheduler are not its children) at ``memory_small``
and ``big`` items (goal: big ÷ small ≤ 1.2). 1000-item rounds take minutes each, so by default the ratios come
from ``reps`` rounds at ``n`` items plus one round at ``big``; ``--smoke`` runs the same code on 4 tiny items.
Also: each contender's own CPU seconds and the cluster's CPU seconds meanwhile (per item vs per Mpx), and the
median stage seconds of the items (their ``metrics/summary.json``). Scratch goes to ``SEGPIPE_BENCH_TMP`` (~3 GB at
1,000 items) and is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import rasterio
import yaml
from common import ROOT, SAMPLE, alternate, fmt, load_average, prefect_server, tree_rss
from rasterio.windows import Window

BIN = Path(sys.executable).parent
FLOW = ("import sys; from segpipe_flows.archive import archive; "
        "rows = archive(sys.argv[1], sys.argv[2], sys.argv[3], scheduler=sys.argv[4]); "
        "bad = [r for r in rows if r['status'] != 'done']; print(len(rows), 'items', len(bad), 'not done'); "
        "sys.exit(1 if bad else 0)")


def _mirror(n: int, period: int, start: int = 0) -> np.ndarray:
    """Indices into a ``period``-long axis for positions start..start+n of its mirror tiling (flip every other)."""
    i = np.arange(start, start + n)
    k, r = np.divmod(i, period)
    return np.where(k % 2 == 0, r, period - 1 - r)


def make_data(folder: Path, n_items: int, cols: int, size: int, scenes: dict[int, int]) -> tuple[list[Path], dict]:
    """``n_items`` item files (row-major in a mosaic ``cols`` items wide) and, for each ``{name: n}`` of
    ``scenes``, one GeoTIFF holding the first ``n`` items' mosaic (``n`` a multiple of ``cols``)."""
    with rasterio.open(SAMPLE / "spacenet_pan.tif") as src:
        a = src.read(1)
        base = src.profile
    t = base["transform"]
    item_profile = {**base, "height": size, "width": size, "tiled": True, "blockxsize": min(256, size),
                    "blockysize": min(256, size), "compress": "deflate", "predictor": 2}
    (folder / "items").mkdir(parents=True)
    rows = -(-n_items // cols)
    outs = {}
    for n in scenes:
        assert n % cols == 0, (n, cols)
        prof = {**item_profile, "height": n // cols * size, "width": cols * size, "BIGTIFF": "YES",
                "num_threads": "all_cpus"}
        outs[n] = rasterio.open(folder / f"scene_{n}.tif", "w", **prof)
    items = []
    x_idx = _mirror(cols * size, a.shape[1])
    try:
        for r in range(rows):
            block = a[np.ix_(_mirror(size, a.shape[0], r * size), x_idx)]
            for n, dst in outs.items():
                if r < n // cols:
                    dst.write(block[None], window=Window(0, r * size, cols * size, size))
            for c in range(cols):
                k = r * cols + c
                if k >= n_items:
                    break
                path = folder / "items" / f"item_{k:05d}.tif"
                prof = {**item_profile, "transform": t * t.translation(c * size, r * size)}
                with rasterio.open(path, "w", **prof) as dst:
                    dst.write(block[None, :, c * size:(c + 1) * size])
                items.append(path)
    finally:
        for dst in outs.values():
            dst.close()
    return items, {n: folder / f"scene_{n}.tif" for n in scenes}


def subset(folder: Path, items: list[Path], n: int) -> Path:
    """A folder of links to the first ``n`` items (the archive's input for an ``n``-item run)."""
    sub = folder / f"items_{n}"
    if not sub.exists():
        sub.mkdir()
        for p in items[:n]:
            (sub / p.name).symlink_to(p)
    return sub


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextmanager
def dask_cluster(folder: Path, workers: int = 2):
    """A scheduler and ``workers`` single-thread worker processes (dask CLI, loopback); yields the address."""
    from distributed import Client

    sched_file = folder / "scheduler.json"
    log = open(folder / "cluster.log", "w")  # noqa: SIM115 - closed below
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)], stdout=log, stderr=log)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists():
            if time.time() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start: see {folder / 'cluster.log'}")
            time.sleep(0.2)
        for _ in range(workers):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file),
                                           "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                                           "--local-directory", str(folder)], stdout=log, stderr=log))
        address = json.loads(sched_file.read_text())["address"]
        with Client(address) as c:
            c.wait_for_workers(workers, timeout=120)
        yield address, [p.pid for p in procs]
    finally:
        _stop(procs)
        log.close()


def _tree_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their children so far."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for q in [proc, *proc.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_child(command: list[str], env: dict | None = None, cluster: list[int] = ()) -> dict:
    """Run ``command`` (a whole child process, output read as it comes): wall seconds, its own CPU seconds (its
    rusage, its children's included), the peak RSS of its process tree and of the process alone (sampled every
    50 ms), the CPU seconds the ``cluster`` processes spent meanwhile, and its output lines."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cluster_cpu = _tree_cpu(list(cluster))
    t0 = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **(env or {})})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in child.stdout))
    reader.start()
    proc = psutil.Process(child.pid)
    peak_tree = peak_own = 0
    while child.poll() is None:
        peak_tree = max(peak_tree, tree_rss(proc))
        try:
            peak_own = max(peak_own, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    reader.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode:
        raise RuntimeError(f"{command} failed ({child.returncode}):\n" + "\n".join(lines[-30:]))
    return {"seconds": seconds, "peak_rss_mib": peak_tree / 2**20, "peak_own_rss_mib": peak_own / 2**20,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "cluster_cpu_s": _tree_cpu(list(cluster)) - cluster_cpu, "lines": lines}


def stage_medians(output: Path) -> dict[str, float]:
    """Median wall seconds of each stage over an archive's items (their ``metrics/summary.json``)."""
    per: dict[str, list[float]] = {}
    for summary in output.glob("*/metrics/summary.json"):
        for name, sec in json.loads(summary.read_text()).get("stage_seconds", {}).items():
            per.setdefault(name, []).append(sec)
    return {name: round(float(np.median(v)), 4) for name, v in per.items()}


def run(n: int = 200, reps: int = 3, big: int | None = 1000, memory_small: int = 100, size: int = 1024,
        cols: int = 40, flow: bool = True, tmp_root: str | None = None) -> dict:
    """``reps`` alternated rounds at ``n`` items, then one round at ``big`` items (None: none), and one archive run
    at ``memory_small`` items for the memory ratio (the ``big`` round's archive run is the other end)."""
    started = dt.datetime.now(dt.UTC)
    load_start = load_average()
    biggest = max(n, big or 0, memory_small)
    scenes = {n: n, **({big: big} if big else {})}
    root = tmp_root or os.environ.get("SEGPIPE_BENCH_TMP")
    with tempfile.TemporaryDirectory(dir=root, prefix="archive-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        items, scene_files = make_data(tmp, biggest, cols, size, scenes)
        made = time.perf_counter() - t0
        template = {"input": "unused.tif", "output": "unused", "tile_size": size, "method": {"name": "otsu"},
                    "cluster": {"n_workers": 2, "threads_per_worker": 1}}
        job_path = tmp / "job.yaml"
        job_path.write_text(yaml.safe_dump(template))
        counter = {"k": 0}

        def out(kind: str) -> Path:
            counter["k"] += 1
            return tmp / f"out_{kind}_{counter['k']}"

        with dask_cluster(tmp) as (address, cluster_pids), \
                (prefect_server(tmp) if flow else _nothing()) as prefect_env:

            def single(k: int) -> dict:
                o = out(f"single{k}")
                job = tmp / f"single_{k}.yaml"
                job.write_text(yaml.safe_dump({**template, "input": str(scene_files[k]), "output": str(o)}))
                r = run_child([sys.executable, "-m", "segpipe.cli", "run", str(job), "--scheduler", address],
                              cluster=cluster_pids)
                r["stages"] = json.loads((o / "metrics" / "summary.json").read_text())["stage_seconds"]
                shutil.rmtree(o)
                return r

            def archive(k: int) -> dict:
                o = out(f"archive{k}")
                r = run_child([sys.executable, "-m", "segpipe.cli", "archive", str(subset(tmp, items, k)),
                               str(job_path), "--output", str(o), "--scheduler", address], cluster=cluster_pids)
                done = sum(1 for text in r["lines"] if text.startswith("item_") and text.endswith("  done"))
                if done != k:
                    raise RuntimeError(f"archive of {k} items: {done} done\n" + "\n".join(r["lines"][-20:]))
                r["stages"] = stage_medians(o)
                shutil.rmtree(o)
                return r

            def flow_run(k: int) -> dict:
                o = out(f"flow{k}")
                r = run_child([sys.executable, "-c", FLOW, str(subset(tmp, items, k)), str(job_path), str(o),
                               address], env=prefect_env, cluster=cluster_pids)
                if f"{k} items 0 not done" not in r["lines"]:
                    raise RuntimeError(f"flow over {k} items:\n" + "\n".join(r["lines"][-20:]))
                shutil.rmtree(o)
                return r

            def round_of(k: int) -> dict:
                c = {"single": lambda: single(k), "archive": lambda: archive(k)}
                if flow:
                    c["flow"] = lambda: flow_run(k)
                return c

            archive(min(2, n))  # warm-up, not timed: the workers import segpipe's task modules once
            res = alternate(round_of(n), reps)
            small = archive(memory_small)
            at_big = {name: v[0] for name, v in alternate(round_of(big), 1).items()} if big else None
        left = [pid for pid in cluster_pids if psutil.pid_exists(pid)]
        if left:
            raise RuntimeError(f"cluster processes still running after the benchmark stopped them: {left}")
    for r in [*(x for v in res.values() for x in v), small, *(at_big or {}).values()]:
        r.pop("lines")
    names = list(res)
    r_ = {"n": n, "reps": reps, "big": big, "memory_small": memory_small, "size": size, "cols": cols,
          "data_seconds": made, "started": f"{started:%Y-%m-%d %H:%M} UTC", "load_start": load_start,
          "load": load_average(), "runs": res, "small": small, "at_big": at_big,
          "seconds": {k: [x["seconds"] for x in res[k]] for k in names}}
    for k in names[1:]:
        r_[f"{k}_over_single"] = [a["seconds"] / s["seconds"] for a, s in zip(res[k], res["single"], strict=True)]
    if at_big:
        r_["big_over_single"] = {k: at_big[k]["seconds"] / at_big["single"]["seconds"] for k in names[1:]}
        r_["memory_ratio"] = at_big["archive"]["peak_rss_mib"] / small["peak_rss_mib"]
    return r_


@contextmanager
def _nothing():
    yield None


def smoke(tmp_root: str | None = None) -> dict:
    """The same code path on 4 items of 256² (2 wide), memory at 2 and 4 items: seconds, no figures asserted."""
    return run(n=4, reps=1, big=4, memory_small=2, size=256, cols=2, tmp_root=tmp_root)


def report(r: dict) -> list[str]:
    """The RESULTS.md section of a run (markdown lines)."""
    n, big, size = r["n"], r["big"], r["size"]
    names = list(r["runs"])
    what = {"single": f"`segpipe run` of one scene of {n} Mpx (the items' mosaic, {size}² tiles)",
            "archive": f"`segpipe archive` of the {n} items (default in-flight bound: 4)",
            "flow": f"Prefect flow `segpipe_flows.archive.archive` over the {n} items (running server)"}
    lines = [f"### Archive at scale: {n} items of {size}² (otsu, tile {size}) vs one job over the same pixels, one "
             f"external cluster (scheduler + 2 workers × 1 thread); {r['reps']} alternated round(s) at {n}, then 1 "
             f"round at {big} (load {r['load_start']} at the start, {r['load']} at the end)\n",
             "| contender | seconds | ÷ single | client CPU s | cluster CPU s | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for k in names:
        runs = r["runs"][k]
        ratio = "1" if k == "single" else f"**{fmt(r[f'{k}_over_single'])}**"
        lines.append(f"| {what[k]} | {fmt(r['seconds'][k])} | {ratio} | {fmt([x['cpu_s'] for x in runs], 1)} | "
                     f"{fmt([x['cluster_cpu_s'] for x in runs], 1)} | {fmt([x['peak_rss_mib'] for x in runs], 0)} |")
    lines.append("")
    b = r["at_big"]
    if b:
        mpx = big * size * size / 2**20
        lines.append(f"- at {big} items (1 round): " + "; ".join(
            f"{k} {b[k]['seconds']:.1f} s" + ("" if k == "single" else f" (**{r['big_over_single'][k]:.2f}** × single)")
            for k in names) + "; client CPU " + ", ".join(f"{k} {b[k]['cpu_s']:.0f} s" for k in names)
            + "; cluster (scheduler + workers) CPU " + ", ".join(f"{k} {b[k]['cluster_cpu_s']:.0f} s" for k in names))
        mem = (f"- archive process peak RSS (its process tree; the cluster is not in it): "
               f"{r['small']['peak_rss_mib']:.0f} MiB at {r['memory_small']} items, "
               f"{b['archive']['peak_rss_mib']:.0f} MiB at {big}: ratio **{r['memory_ratio']:.2f}** (goal ≤ 1.2); "
               f"the process alone {r['small']['peak_own_rss_mib']:.0f} and {b['archive']['peak_own_rss_mib']:.0f} MiB")
        if "flow" in b:
            mem += f"; the flow's process {b['flow']['peak_rss_mib']:.0f} MiB at {big}"
        lines.append(mem)
        arc, one = b["archive"], b["single"]

        def per(x: dict, count: float) -> str:
            return (f"{1000 * x['seconds'] / count:.0f} ms wall, {1000 * x['cpu_s'] / count:.0f} ms client CPU, "
                    f"{1000 * x['cluster_cpu_s'] / count:.0f} ms cluster CPU")

        lines.append(f"- per item at {big} (archive): {per(arc, big)}; per Mpx of the single job: {per(one, mpx)}")
        lines.append("- stage medians per archive item (s, each item's summary.json): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in arc["stages"].items())
                     + f"; the single job's stages at {big} Mpx (s): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in one["stages"].items()))
        lines.append("")
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="4 items of 256², one round: the code path, in seconds")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big", type=int, default=1000, help="items of the one extra round (0: none)")
    ap.add_argument("--memory-small", type=int, default=100)
    ap.add_argument("--no-flow", action="store_true")
    ap.add_argument("--json", help="also write every figure to this file")
    a = ap.parse_args()
    res = smoke() if a.smoke else run(a.n, a.reps, a.big or None, a.memory_small, flow=not a.no_flow)
    print("\n".join(report(res)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
