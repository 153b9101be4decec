"""Recipe of ``unet3d_ct_bone.pt``: a tiny 3-D U-Net trained on the InVesalius head CT against its bone mask.

Why a shipped checkpoint: a seeded training inside a test lands on different weights on CPUs whose float
kernels differ (the earlier in-test 120-step training scored Dice 0.26 on one x86 machine and > 0.5 here),
so a test asserting the model's quality must not train. This file is derived data: trained here, once,
from the Debian package ``invesalius-examples`` (see ../shared/DATA.md), to convergence (the bone class is
an intensity threshold plus context, which a 2-level 3-D U-Net learns well), on random 32^3 patches
that do not touch the test's crop (z 10..90, y 60..190, x 40..210): the test scores unseen voxels.

Run from the repository root to remake it: ``.venv/bin/python tests/data/train_unet3d_ct_bone.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from medical import load_ct  # noqa: E402

from segpipe.models.checkpoint import ModelSpec, save_checkpoint  # noqa: E402

OUT = HERE / "unet3d_ct_bone.pt"
PATCH = 32
STEPS = 1500


def main() -> None:
    ct = load_ct()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = ModelSpec(in_channels=1, n_classes=2, base=4, depth=2, mean=[0.0], std=[500.0], dims=3,
                     class_names=["other", "bone"],
                     info={"trained_on": "InVesalius Cranium.inv3 CT, bone mask 226..3071 HU",
                           "held_out": "z 10..90, y 60..190, x 40..210 (the test crop)", "steps": STEPS})
    model = spec.build()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    rng = np.random.default_rng(0)
    x, y = ct.hu.astype(np.float32) / 500.0, ct.bone.astype(np.int64)
    crop = (slice(10, 90), slice(60, 190), slice(40, 210))
    held = np.zeros(x.shape, bool)
    held[crop] = True
    for step in range(STEPS):
        crops = []
        while len(crops) < 8:
            st = [int(rng.integers(0, n - PATCH + 1)) for n in x.shape]
            c = tuple(slice(s, s + PATCH) for s in st)
            if not held[c].any():
                crops.append(c)
        xb = torch.from_numpy(np.stack([x[c] for c in crops])[:, None])
        yb = torch.from_numpy(np.stack([y[c] for c in crops]))
        loss = torch.nn.functional.cross_entropy(model(xb), yb, weight=torch.tensor([1.0, 4.0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(step, loss.item(), flush=True)
    model.eval()
    with torch.inference_mode():
        pred = model(torch.from_numpy(x[crop])[None, None]).argmax(1)[0].numpy() == 1
    truth = ct.bone[crop]
    print("dice on the held-out test crop:", 2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    save_checkpoint(OUT, model, spec)


if __name__ == "__main__":
    main()
