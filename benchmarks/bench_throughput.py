"""U-Net end to end vs the model's forward-only throughput (same worker layout) and vs MONAI's sliding window.

Contenders, alternated, each repeated, on the same derived scene and model, each in its best thread layout:
- segpipe: ``segpipe run`` as a user runs it (GeoTIFF -> Zarr -> logits -> stitch -> COG), job defaults
  (tile 512, batch 8), two Dask workers x 1 thread; its wall time includes cluster start and shutdown.
  The peak size of its work store during the run gives the scratch in bytes per scene pixel.
- forward-only: the bare model on full batches in the same two 1-thread worker processes at once.
- MONAI ``sliding_window_inference`` (Gaussian, overlap 0.25) on the image in memory, one process, 2 threads.
The goal compares segpipe with forward-only divided by the job's real overlap factor (patches x patch
pixels / scene pixels, with the grid's flush last patches).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import torch
from common import MODEL, alternate, load_average, median_spread, mosaic_scene, run_sampled, segpipe_cli

from segpipe.config import ClusterSpec
from segpipe.runtime.cluster import connect
from segpipe.tiling.grid import PatchGrid

PATCH, OVERLAP, BATCH, TILE = 256, 0.25, 8, 512


def _worker_forward(model_path: str, seconds: float) -> tuple[int, float]:
    """Run on a worker: full batches through this worker's cached model for ``seconds``."""
    from segpipe.methods.device_loop import BatchForward
    from segpipe.methods.infer import worker_model

    model, spec, device = worker_model(model_path)
    x = np.random.default_rng(0).standard_normal((BATCH, spec.in_channels, PATCH, PATCH)).astype(np.float32)
    run = BatchForward(model, device, BATCH)
    staged = run.stage(x)
    run(staged)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(staged)
        n += 1
    return n * BATCH * PATCH * PATCH, time.perf_counter() - t0


def forward_only(seconds: float = 10.0) -> float:
    """Mpx/s of forward passes on full batches in two 1-thread worker processes running at once."""
    with connect(ClusterSpec(n_workers=2, threads_per_worker=1)) as client:
        client.run(_worker_forward, str(MODEL), 1.0)  # load and warm up
        parts = client.run(_worker_forward, str(MODEL), seconds)
    return sum(px / dt for px, dt in parts.values()) / 1e6


def monai_sliding_window(image: np.ndarray, device: str = "cpu", batch: int = BATCH) -> tuple[float, np.ndarray]:
    """Mpx/s and class map of MONAI's sliding window on ``image`` in memory; on a GPU the image goes to the
    device and the class map comes back inside the timing, as a user's script would do it."""
    from monai.inferers import sliding_window_inference

    from segpipe.models.checkpoint import load_model

    if device == "cpu":
        torch.set_num_threads(2)
    model, spec = load_model(MODEL, device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        x = torch.from_numpy(((image.astype(np.float32) - spec.mean[0]) / spec.std[0])[None, None]).to(device)
        y = sliding_window_inference(x, (PATCH, PATCH), batch, model, overlap=OVERLAP, mode="gaussian",
                                     sigma_scale=0.125)
        cls = y.argmax(1)[0].cpu().numpy()
        dt = time.perf_counter() - t0
    return image.size / dt / 1e6, cls


def derived_scene(folder: Path, size: int) -> tuple[Path, np.ndarray, float]:
    """The derived mosaic scene, its pixels, and the job's real overlap factor (patches x patch pixels / scene
    pixels, with the grid's flush last patches)."""
    scene = mosaic_scene(folder / "scene.tif", size)
    with rasterio.open(scene) as ds:
        image = ds.read(1)
    grid = PatchGrid(image.shape, PATCH, OVERLAP)
    return scene, image, int(np.prod(grid.counts)) * PATCH * PATCH / image.size


def side_by_side(size: int, reps: int, job: dict, monai: Callable[[np.ndarray], tuple[float, np.ndarray]],
                 forward: Callable[[], float]) -> tuple[dict[str, list], float]:
    """MONAI, forward-only and ``segpipe run`` alternated ``reps`` times on the derived ``size``² scene; ``job``
    adds to the job's defaults (method settings, cluster). Returns the contenders' results and the overlap factor.
    Each segpipe result has its wall ``seconds``, ``mpx_s``, peak RSS, peak work-store bytes, ``stage_seconds``
    and its class map's agreement with MONAI's."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene, image, overlap_factor = derived_scene(tmp, size)
        monai_cls: list[np.ndarray] = []
        runs = {"n": 0}

        def segpipe_run() -> dict:
            runs["n"] += 1
            out = tmp / f"out{runs['n']}"
            method = {"name": "unet", "model": str(MODEL), "patch_size": PATCH, "overlap": OVERLAP,
                      "batch_size": BATCH, **job.get("method", {})}
            spec = {"input": str(scene), "output": str(out), **job, "method": method}
            r = run_sampled(segpipe_cli(spec, tmp / "job.yaml"), watch=out / "work.zarr")
            with rasterio.open(out / "segmentation.tif") as ds:
                r["agreement"] = float((ds.read(1) == monai_cls[0]).mean()) if monai_cls else None
            r["stage_seconds"] = json.loads((out / "metrics" / "summary.json").read_text()).get("stage_seconds")
            r["mpx_s"] = image.size / r["seconds"] / 1e6
            return r

        def monai_run() -> float:
            rate, cls = monai(image)
            monai_cls[:] = [cls]
            return rate

        return alternate({"monai": monai_run, "forward": forward, "segpipe": segpipe_run}, reps), overlap_factor


def run(size: int = 6144, reps: int = 3) -> dict:
    res, overlap_factor = side_by_side(size, reps, {"cluster": {"n_workers": 2, "threads_per_worker": 1}},
                                       monai_sliding_window, forward_only)
    seg = [r["mpx_s"] for r in res["segpipe"]]
    cap = [f / overlap_factor for f in res["forward"]]
    return {"size": size, "tile": TILE, "batch": BATCH, "overlap_factor": overlap_factor, "reps": reps,
            "forward_mpx_s": res["forward"], "monai_mpx_s": res["monai"], "segpipe_mpx_s": seg,
            "e2e_over_cap": [s / c for s, c in zip(seg, cap, strict=True)],
            "e2e_over_monai": [s / m for s, m in zip(seg, res["monai"], strict=True)],
            "scratch_b_per_px": [r["peak_watch_bytes"] / size**2 for r in res["segpipe"]],
            "peak_rss_mib": [r["peak_rss_mib"] for r in res["segpipe"]],
            "agreement_with_monai": res["segpipe"][-1]["agreement"], "load": load_average(),
            "medians": {k: median_spread(v)[0] for k, v in (("segpipe", seg), ("forward", res["forward"]),
                                                            ("monai", res["monai"]))}}


if __name__ == "__main__":
    print(run())
