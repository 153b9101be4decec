"""Training on Zarr tiles + labels writes a safe checkpoint that inference can use."""

import numpy as np
from conftest import BUILDINGS, SCENE
from helpers import class_map, run

from segpipe.methods.train import TrainSpec, train_from_files
from segpipe.models.checkpoint import load_model


def test_training_reduces_loss_and_checkpoint_runs_in_the_pipeline(tmp_path, client):
    spec = TrainSpec(epochs=3, steps_per_epoch=8, patch_size=64, batch_size=8, base=8, depth=3, lr=5e-3)
    out = tmp_path / "m.pt"
    res = train_from_files(SCENE, BUILDINGS, out, spec, class_names=["background", "building"])
    losses = res["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    model, mspec = load_model(out)
    assert mspec.n_classes == 2 and mspec.base == 8 and len(mspec.mean) == 1
    cls = class_map(run(client, tmp_path / "o", input=str(SCENE), tile_size=256,
                        method={"name": "unet", "model": str(out), "patch_size": 128}))
    assert set(np.unique(cls)) <= {0, 1}
