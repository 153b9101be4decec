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


@pytest.mark.slow
def test_3d_monai_network_on_a_real_mri_volume_matches_monai_sliding_window(tmp_path, client):
    """A 3-D MONAI BasicUNet on the Colin27 T1 volume (NIfTI): block-size invariant, agrees with MONAI.

    Derived: a 96 x 128 x 96 crop of the volume (through the brain's centre, affine kept), so that the two
    pipeline runs and MONAI's reference stay seconds long; blocks of 64 still cut it in several places."""
    import nibabel as nib
    from medical import CH2

    full = nib.load(str(CH2))
    crop = full.slicer[40:136, 45:173, 40:136]  # (x, y, z) voxels
    src = tmp_path / "ch2_crop.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), crop.affine, crop.header), str(src))

    torch.manual_seed(5)
    spec = ModelSpec(in_channels=1, n_classes=2, mean=[60.0], std=[40.0], arch="monai.BasicUNet", dims=3,
                     arch_kwargs={"features": (4, 4, 8, 8, 16, 4)})
    path = tmp_path / "basicunet3d.pt"
    save_checkpoint(path, spec.build().eval(), spec)
    method = {"name": "unet", "model": str(path), "patch_size": 48, "overlap": 0.25, "batch_size": 2}
    maps = [class_map(run(client, tmp_path / str(t), input=str(src), tile_size=t, method=method)) for t in (64, 128)]
    np.testing.assert_array_equal(maps[0], maps[1])
    img = np.asarray(nib.load(str(src)).dataobj, np.float32).transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
    model, _ = load_model(path)
    with torch.inference_mode():
        ref = sliding_window_inference(torch.from_numpy((img - 60.0) / 40.0)[None, None], (48,) * 3, 2, model,
                                       overlap=0.25, mode="gaussian", sigma_scale=0.125).argmax(1)[0].numpy()
    assert len(np.unique(ref)) == 2
    assert (maps[0] == ref).mean() > 0.99
