"""One model, three file formats, end to end (issue 10: TorchScript and ONNX within 10 % of eager on CPU).

The demo U-Net as its segpipe checkpoint (eager PyTorch), exported by ``segpipe export-model`` to
TorchScript and to ONNX (onnxruntime, CPU provider), each run by ``segpipe run`` on the same derived
SpaceNet mosaic with the same job (2 workers x 1 thread, patch 256, overlap 0.25, batch 8), alternated
and repeated. Class maps are compared with the checkpoint's.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from common import MODEL, alternate, load_average, mosaic_scene, run_sampled, segpipe_cli


def run(size: int = 3072, reps: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = mosaic_scene(tmp / "scene.tif", size)
        models = {"eager": MODEL, "torchscript": tmp / "unet.ts", "onnx": tmp / "unet.onnx"}
        for fmt in ("torchscript", "onnx"):
            subprocess.run([sys.executable, "-m", "segpipe.cli", "export-model", str(MODEL), "--format", fmt,
                            "--output", str(models[fmt])], check=True, capture_output=True)
        n = {"k": 0}
        maps: dict[str, np.ndarray] = {}

        def contender(fmt: str):
            def go() -> dict:
                n["k"] += 1
                out = tmp / f"{fmt}{n['k']}"
                job = {"input": str(scene), "output": str(out),
                       "method": {"name": "model", "model": str(models[fmt]), "patch_size": 256, "overlap": 0.25,
                                  "batch_size": 8}, "cluster": {"n_workers": 2, "threads_per_worker": 1}}
                r = run_sampled(segpipe_cli(job, tmp / "job.yaml"))
                with rasterio.open(out / "segmentation.tif") as ds:
                    maps[fmt] = ds.read(1)
                r["mpx_s"] = size * size / r["seconds"] / 1e6
                return r
            return go

        res = alternate({fmt: contender(fmt) for fmt in models}, reps)
    rate = {fmt: [r["mpx_s"] for r in rs] for fmt, rs in res.items()}
    return {"size": size, "reps": reps, "mpx_s": rate, "load": load_average(),
            "over_eager": {fmt: [a / b for a, b in zip(rate[fmt], rate["eager"], strict=True)]
                           for fmt in ("torchscript", "onnx")},
            "agreement": {fmt: float((maps[fmt] == maps["eager"]).mean()) for fmt in ("torchscript", "onnx")}}


if __name__ == "__main__":
    print(run())
