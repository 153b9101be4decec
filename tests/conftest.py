"""Shared fixtures: a real multi-process Dask cluster on loopback, real GeoTIFFs, small models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from distributed import Client, LocalCluster

from segpipe.models.checkpoint import ModelSpec, save_checkpoint

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SAMPLE = Path(__file__).resolve().parents[1] / "segpipe" / "sample"
SCENE = SAMPLE / "spacenet_pan.tif"
BUILDINGS = SAMPLE / "spacenet_buildings.geojson"
DEMO_MODEL = SAMPLE / "unet_spacenet.pt"


@pytest.fixture(scope="session")
def client() -> Client:
    """Two worker processes, one thread each, on loopback: the real thing, small."""
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                           host="127.0.0.1", memory_limit="3GiB")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def write_tif(path: Path, data: np.ndarray, like: Path | None = SCENE, **overrides) -> Path:
    """Write ``data`` (bands, h, w) as a tiled GeoTIFF with the sample scene's georeferencing."""
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": str(data.dtype), "tiled": True, "blockxsize": 256, "blockysize": 256,
               "compress": "deflate"}
    if like is not None:
        with rasterio.open(like) as src:
            profile.update(crs=src.crs, transform=src.transform)
    profile.update(overrides)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="session")
def sample_pixels() -> np.ndarray:
    with rasterio.open(SCENE) as ds:
        return ds.read()


@pytest.fixture(scope="session")
def holed_scene(tmp_path_factory, sample_pixels) -> Path:
    """Derived: the SpaceNet sample with a nodata (0) strip across tile borders of 256, 384 and 512 (rows 370-449,
    columns 100-639): how methods handle validity must be tile-exact too."""
    data = sample_pixels.copy()
    data[:, 370:450, 100:640] = 0
    return write_tif(tmp_path_factory.mktemp("holed") / "holed.tif", data, nodata=0)


@pytest.fixture(scope="session")
def big_scene(tmp_path_factory, sample_pixels) -> Path:
    """Derived: the SpaceNet sample mosaicked (with flips) to 2100 x 2300 px, with nodata holes."""
    a = sample_pixels[0]
    row = np.concatenate([a, a[:, ::-1], a], axis=1)
    mosaic = np.concatenate([row, row[::-1], row], axis=0)[:2100, :2300].copy()
    mosaic[900:1200, 400:700] = 0  # a nodata hole across tile borders
    mosaic[:, 2250:] = 0  # and a nodata strip at the scene edge
    return write_tif(tmp_path_factory.mktemp("big") / "mosaic.tif", mosaic[None].copy(), nodata=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small randomly initialised U-Net (fixed seed): enough to test plumbing, fast on CPU."""
    torch.manual_seed(1)
    spec = ModelSpec(in_channels=1, n_classes=3, base=4, depth=3, mean=[400.0], std=[300.0],
                     class_names=["a", "b", "c"])
    model = spec.build().eval()
    with torch.no_grad():  # no bias in the head, so the class depends on the image, not on a constant
        model.head.bias.zero_()
        model.head.weight.mul_(10)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, model, spec)
    return path


@pytest.fixture
def dask_cli_cluster(tmp_path):
    """A real scheduler and two worker processes (each under a nanny) started with the dask CLI, on loopback."""
    dask = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sched_file)], stderr=subprocess.DEVNULL)]
    deadline = time.time() + 60
    while not sched_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(sched_file), "--nworkers", "2",
                                   "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
                                  stderr=subprocess.DEVNULL))
    address = json.loads(sched_file.read_text())["address"]
    with Client(address) as c:
        c.wait_for_workers(2, timeout=60)
    yield address
    for p in reversed(procs):
        p.terminate()
        p.wait(timeout=30)
