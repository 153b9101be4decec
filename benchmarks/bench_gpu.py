"""U-Net on a CUDA device: segpipe end to end vs the bare forward pass vs MONAI's sliding window, all on the GPU.

Run on a GPU host (``python benchmarks/bench_gpu.py [size] [reps]``); it refuses to run without CUDA, so
``make bench`` (CPU) does not call it. Contenders, alternated, each repeated, on the same derived scene:
- segpipe: ``segpipe run`` as a user runs it (GeoTIFF -> Zarr -> logits -> stitch -> COG), ``gpu: auto``
  (one GPU worker per device plus ``n_workers`` CPU workers for ingest, stitching and export), batch 32;
  its wall time includes cluster start and shutdown.
- forward-only: the model's forward pass through segpipe's own device loop (:class:`BatchForward`, float16
  autocast, channels_last) on full batches of 256² patches, in this process: the device's ceiling.
- MONAI ``sliding_window_inference`` (Gaussian, overlap 0.25) on the image moved to the GPU, batch 32.
The same ratios as the CPU throughput benchmark: end to end ÷ (forward ÷ overlap factor), and ÷ MONAI.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from bench_throughput import PATCH, monai_sliding_window, side_by_side
from common import MODEL, load_average, machine, median_spread

BATCH, TILE, CPU_WORKERS = 32, 1024, 4


def forward_only(seconds: float = 5.0) -> float:
    """Mpx/s of segpipe's device loop on full batches of random patches on cuda:0."""
    from segpipe.methods.device_loop import BatchForward
    from segpipe.models.checkpoint import load_model

    model, spec = load_model(MODEL, "cuda")
    run = BatchForward(model, "cuda", BATCH)
    x = np.random.default_rng(0).standard_normal((BATCH, spec.in_channels, PATCH, PATCH)).astype(np.float32)
    staged = run.stage(x)
    run(staged)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(staged)  # returns host float16 logits, so each call waits for its batch
        n += 1
    return n * BATCH * PATCH * PATCH / (time.perf_counter() - t0) / 1e6


def run(size: int = 8192, reps: int = 3) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: needs a CUDA device")
    job = {"tile_size": TILE, "method": {"batch_size": BATCH},
           "cluster": {"n_workers": CPU_WORKERS, "threads_per_worker": 2, "gpu": "auto"}}
    res, overlap_factor = side_by_side(size, reps, job, lambda image: monai_sliding_window(image, "cuda", BATCH),
                                       forward_only)
    seg = [r["mpx_s"] for r in res["segpipe"]]
    cap = [f / overlap_factor for f in res["forward"]]
    return {"machine": machine(), "size": size, "tile": TILE, "batch": BATCH, "overlap_factor": overlap_factor,
            "reps": reps, "forward_mpx_s": res["forward"], "monai_mpx_s": res["monai"], "segpipe_mpx_s": seg,
            "segpipe_seconds": [r["seconds"] for r in res["segpipe"]],
            "e2e_over_cap": [s / c for s, c in zip(seg, cap, strict=True)],
            "e2e_over_monai": [s / m for s, m in zip(seg, res["monai"], strict=True)],
            "peak_rss_mib": [r["peak_rss_mib"] for r in res["segpipe"]],
            "stage_seconds": [r["stage_seconds"] for r in res["segpipe"]],
            "agreement_with_monai": res["segpipe"][-1]["agreement"], "load": load_average(),
            "medians": {k: median_spread(v)[0] for k, v in (("segpipe", seg), ("forward", res["forward"]),
                                                            ("monai", res["monai"]))}}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print(json.dumps(run(*args), indent=1))
