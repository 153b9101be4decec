"""Shared helpers for the benchmarks: derived scenes, the model, machine description."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import psutil
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "segpipe" / "sample"
MODEL = SAMPLE / "unet_spacenet.pt"


def mosaic_scene(path: Path, size: int) -> Path:
    """Derived scene: the SpaceNet sample tiled with flips to ``size`` x ``size`` px, same CRS/origin."""
    with rasterio.open(SAMPLE / "spacenet_pan.tif") as src:
        a = src.read(1)
        profile = src.profile
    reps = -(-size // a.shape[0])
    row = np.concatenate([a if k % 2 == 0 else a[:, ::-1] for k in range(reps)], axis=1)
    full = np.concatenate([row if k % 2 == 0 else row[::-1] for k in range(reps)], axis=0)[:size, :size]
    profile.update(height=size, width=size, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                   predictor=2)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(full[None])
    return path


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}, torch {torch.__version__}")
