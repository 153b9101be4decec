"""MONAI networks as models: saved as weights-only segpipe checkpoints, stitched like the U-Net."""

import numpy as np
import pytest
import torch
from conftest import SCENE
from helpers import class_map, run
from monai.inferers import sliding_window_inference

from segpipe.errors import InputError
from segpipe.models.checkpoint import ModelSpec, load_model, save_checkpoint


@pytest.fixture(scope="module")
def monai_unet(tmp_path_factory):
    torch.manual_seed(3)
    spec = ModelSpec(in_channels=1, n_classes=2, mean=[400.0], std=[300.0], arch="monai.UNet",
                     arch_kwargs={"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1})
    model = spec.build().eval()
    path = tmp_path_factory.mktemp("monai") / "monai_unet.pt"
    save_checkpoint(path, model, spec)
    return path


def test_monai_unet_runs_tile_invariant_and_matches_monai_sliding_window(tmp_path, client, monai_unet):
    method = {"name": "unet", "model": str(monai_unet), "patch_size": 128, "overlap": 0.25}
    maps = [class_map(run(client, tmp_path / str(t), input=str(SCENE), tile_size=t, chunk_size=256,
                          method=method)) for t in (256, 512)]
    np.testing.assert_array_equal(maps[0], maps[1])
    import rasterio
    with rasterio.open(SCENE) as ds:
        img = ds.read(1).astype(np.float32)
    model, spec = load_model(monai_unet)
    with torch.inference_mode():
        ref = sliding_window_inference(torch.from_numpy((img - 400.0) / 300.0)[None, None], (128, 128), 4, model,
                                       overlap=0.25, mode="gaussian", sigma_scale=0.125).argmax(1)[0].numpy()
    assert len(np.unique(ref)) == 2
    # Same patch grid and sigma; MONAI builds its Gaussian by filtering a delta and segpipe stores logits
    # as float16, so near-ties of this random network may flip, and only those.
    assert (maps[0] == ref).mean() > 0.99


def test_patch_size_the_network_cannot_take_is_an_input_error(tmp_path, client, monai_unet):
    with pytest.raises(InputError, match="patch_size 98"):
        run(client, tmp_path / "o", input=str(SCENE), tile_size=256,
            method={"name": "unet", "model": str(monai_unet), "patch_size": 98})
