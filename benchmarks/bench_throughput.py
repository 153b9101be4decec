"""End-to-end throughput vs the model's forward-only throughput and vs MONAI's sliding window.

All three run in one process, one after another, on the same derived image and the same model,
so the ratios compare like with like on whatever machine runs this.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from common import MODEL, mosaic_scene
from monai.inferers import sliding_window_inference

from segpipe.cluster import connect
from segpipe.config import ClusterSpec, job_from_dict
from segpipe.models.checkpoint import load_model
from segpipe.pipeline import check, run_job

PATCH, OVERLAP, BATCH = 256, 0.25, 4


def forward_only(model: torch.nn.Module, device: str, seconds: float = 10.0) -> float:
    """Mpx/s of the bare model on full batches of patches (no I/O, no overlap)."""
    x = torch.randn(BATCH, model.down[0][0].in_channels, PATCH, PATCH, device=device)
    with torch.inference_mode():
        model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return n * BATCH * PATCH * PATCH / dt / 1e6


def monai_sliding_window(model: torch.nn.Module, image: np.ndarray, mean: float, std: float,
                         device: str) -> tuple[float, np.ndarray]:
    x = torch.from_numpy(((image.astype(np.float32) - mean) / std)[None, None]).to(device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        y = sliding_window_inference(x, (PATCH, PATCH), BATCH, model, overlap=OVERLAP, mode="gaussian",
                                     sigma_scale=0.125)
        cls = y.argmax(1)[0].cpu().numpy()
        dt = time.perf_counter() - t0
    return image.size / dt / 1e6, cls


def segpipe_end_to_end(scene: Path, out: Path, workers: int) -> tuple[float, np.ndarray]:
    job = job_from_dict({"input": str(scene), "output": str(out), "tile_size": 1024,
                         "method": {"name": "unet", "model": str(MODEL), "patch_size": PATCH, "overlap": OVERLAP,
                                    "batch_size": BATCH},
                         "cluster": {"n_workers": workers, "threads_per_worker": 1}}, Path.cwd())
    checked = check(job)
    with connect(ClusterSpec(n_workers=workers, threads_per_worker=1)) as client:
        client.run(lambda: None)  # workers up before the clock starts
        t0 = time.perf_counter()
        outcome = run_job(checked, client)
        dt = time.perf_counter() - t0
    with rasterio.open(outcome.cog) as ds:
        cls = ds.read(1)
    return checked.info.height * checked.info.width / dt / 1e6, cls


def run(size: int = 2048, workers: int = 2) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        scene = mosaic_scene(Path(tmp) / "scene.tif", size)
        with rasterio.open(scene) as ds:
            image = ds.read(1)
        model, spec = load_model(MODEL, device)
        fwd = forward_only(model, device)
        monai_rate, monai_cls = monai_sliding_window(model, image, spec.mean[0], spec.std[0], device)
        e2e_rate, ours = segpipe_end_to_end(scene, Path(tmp) / "out", workers)
    agree = float((monai_cls == ours).mean())
    return {"size": size, "workers": workers, "device": device, "forward_mpx_s": fwd,
            "monai_mpx_s": monai_rate, "segpipe_mpx_s": e2e_rate, "e2e_over_forward": e2e_rate / fwd,
            "e2e_over_monai": e2e_rate / monai_rate, "class_agreement_with_monai": agree}


if __name__ == "__main__":
    print(run())
