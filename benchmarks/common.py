"""Shared helpers for the benchmarks: derived scenes, the model, machine description."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import rasterio
import yaml
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "segpipe" / "sample"
MODEL = SAMPLE / "unet_spacenet.pt"


def mosaic_scene(path: Path, size: int, **profile: object) -> Path:
    """Derived scene: the SpaceNet sample tiled with flips to ``size`` x ``size`` px, same CRS/origin.

    Written one row of sample tiles at a time, so a 1.6 Gpx scene never sits in memory; ``profile``
    adds creation options (e.g. ``BIGTIFF="YES"``).
    """
    with rasterio.open(SAMPLE / "spacenet_pan.tif") as src:
        a = src.read(1)
        base = src.profile
    base.update(height=size, width=size, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                predictor=2, **profile)
    reps = -(-size // a.shape[1])
    with rasterio.open(path, "w", **base) as dst:
        for k, top in enumerate(range(0, size, a.shape[0])):
            tile = a if k % 2 == 0 else a[::-1]
            row = np.concatenate([tile if j % 2 == 0 else tile[:, ::-1] for j in range(reps)], axis=1)[:, :size]
            rows = min(a.shape[0], size - top)
            dst.write(row[None, :rows], window=Window(0, top, size, rows))
    return path


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}, torch {torch.__version__}")


def load_average() -> str:
    """The 1/5/15-minute load average: this machine is shared, so every figure says how busy it was."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def alternate(contenders: dict, reps: int = 3) -> dict[str, list]:
    """Run each contender once per round, rounds repeated ``reps`` times, so drift hits all alike.

    A contender returns a number (seconds) or a dict whose "seconds" entry is the timing.
    """
    out: dict[str, list] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            out[name].append(fn())
    return out


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum."""
    v = sorted(values)
    return float(np.median(v)), float(v[0]), float(v[-1])


def fmt(values: list[float], digits: int = 2) -> str:
    med, lo, hi = median_spread(values)
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def run_sampled(command: list[str], watch: Path | None = None, env: dict | None = None,
                lines: bool = False) -> dict:
    """Run ``command`` in a child; wall seconds, peak RSS of its whole process tree, peak size of ``watch``.

    With ``lines``, also when each line of its output appeared (stdout and stderr together: segpipe's stage
    lines are on stderr): ``lines`` is [(seconds since start, text)].
    """
    t0 = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE if lines else subprocess.DEVNULL,
                             stderr=subprocess.STDOUT if lines else subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
    seen: list[tuple[float, str]] = []
    reader = None
    if lines:
        def read() -> None:
            for line in child.stdout:
                seen.append((time.perf_counter() - t0, line.rstrip()))

        reader = threading.Thread(target=read)
        reader.start()
    proc = psutil.Process(child.pid)
    peak_rss = peak_dir = 0
    tick = 0
    while child.poll() is None:
        peak_rss = max(peak_rss, tree_rss(proc))
        if watch is not None and tick % 5 == 0:  # walking the store costs more than reading RSS
            peak_dir = max(peak_dir, folder_bytes(watch))
        tick += 1
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if reader is not None:
        reader.join()
    errors = "\n".join(text for _, text in seen) if lines else child.stderr.read()
    if child.returncode:
        raise RuntimeError(f"{command} failed ({child.returncode}): {errors[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": peak_rss / 2**20, "peak_watch_bytes": peak_dir,
            "stderr": errors, "lines": seen}


def segpipe_cli(job: dict, path: Path) -> list[str]:
    """The command that runs ``job`` (written to ``path``) as a user would: ``segpipe run``."""
    path.write_text(yaml.safe_dump(job))
    return [sys.executable, "-m", "segpipe.cli", "run", str(path)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(folder: Path):
    """A Prefect server on a free loopback port (its own PREFECT_HOME); yields the environment pointing at it."""
    port = free_port()
    env = {"PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the Prefect server did not start") from None
                time.sleep(0.5)
        yield env
    finally:
        # `prefect server start` runs uvicorn in a child: stop the tree we started, children first
        try:
            kids = psutil.Process(server.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for k in kids:
            try:
                k.terminate()
                k.wait(timeout=30)
            except psutil.Error:
                pass
