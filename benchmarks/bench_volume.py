"""3-D throughput: segpipe end to end on a real CT volume vs MONAI's sliding window vs forward-only.

The head CT of ../shared/DATA.md (108 x 256 x 256 voxels) as NIfTI, a small 3-D U-Net (random weights:
speed does not depend on them), 64^3 patches at overlap 0.25. All three measured one after another in
one process, so the ratios compare like with like on whatever machine runs this.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import ROOT
from monai.inferers import sliding_window_inference

from segpipe.config import ClusterSpec, job_from_dict
from segpipe.models.checkpoint import ModelSpec, save_checkpoint
from segpipe.pipeline import check, run_job
from segpipe.runtime.cluster import connect

sys.path.insert(0, str(ROOT / "tests"))
from medical import ct_affine, load_ct, write_nifti  # noqa: E402

PATCH, OVERLAP, BATCH = 64, 0.25, 2


def run(workers: int = 2) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ct = load_ct()
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=1, n_classes=2, base=8, depth=3, mean=[0.0], std=[500.0], dims=3)
    model = spec.build().eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_nifti(Path(tmp) / "ct.nii.gz", ct.hu, ct_affine(ct))
        path = Path(tmp) / "unet3d.pt"
        save_checkpoint(path, model.cpu(), spec)
        model.to(device)
        x = torch.randn(BATCH, 1, PATCH, PATCH, PATCH, device=device)
        with torch.inference_mode():
            model(x)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 10:
                model(x)
                n += 1
            fwd = n * BATCH * PATCH**3 / (time.perf_counter() - t0) / 1e6
            vol = torch.from_numpy((ct.hu.astype(np.float32) / 500.0)[None, None]).to(device)
            t0 = time.perf_counter()
            ref = sliding_window_inference(vol, (PATCH,) * 3, BATCH, model, overlap=OVERLAP, mode="gaussian",
                                           sigma_scale=0.125).argmax(1)[0].cpu().numpy()
            monai = ct.hu.size / (time.perf_counter() - t0) / 1e6
        job = job_from_dict({"input": str(src), "output": str(Path(tmp) / "out"), "tile_size": 128,
                             "method": {"name": "unet", "model": str(path), "patch_size": PATCH,
                                        "overlap": OVERLAP, "batch_size": BATCH}}, Path.cwd())
        checked = check(job)
        with connect(ClusterSpec(n_workers=workers, threads_per_worker=1)) as client:
            client.run(lambda: None)
            t0 = time.perf_counter()
            outcome = run_job(checked, client)
            e2e = ct.hu.size / (time.perf_counter() - t0) / 1e6
        ours = np.asarray(nib.load(str(outcome.nifti)).dataobj).transpose(2, 1, 0)
    return {"shape": ct.hu.shape, "workers": workers, "device": device, "forward_mvox_s": fwd, "monai_mvox_s": monai,
            "segpipe_mvox_s": e2e, "e2e_over_forward": e2e / fwd, "e2e_over_monai": e2e / monai,
            "agreement": float((ours == ref).mean()), "class1_share": float((ref == 1).mean())}


if __name__ == "__main__":
    print(run())
