"""3-D tiling: the patch-model stitcher gives the same class volume for any block size."""

import numpy as np
import pytest
import torch
import zarr

from segpipe.io.scene import Scene
from segpipe.io.store import ensure_array
from segpipe.methods.segment import LogitsTarget, SlidingWindow, infer_and_stitch
from segpipe.models.checkpoint import ModelSpec, save_checkpoint
from segpipe.tiling.grid import PatchGrid, TileGrid
from segpipe.tiling.stitch import create_logits_store

SHAPE = (40, 150, 140)  # z, y, x
PATCH = (16, 64, 64)


@pytest.fixture(scope="module")
def volume_store(tmp_path_factory, sample_pixels):
    """Derived volume: 40 shifted crops of the SpaceNet sample stacked along z, with a nodata block."""
    a = sample_pixels[0]
    vol = np.stack([a[3 * k:3 * k + SHAPE[1], 5 * k:5 * k + SHAPE[2]] for k in range(SHAPE[0])])
    valid = np.ones(SHAPE, np.uint8)
    valid[:8, :40, :30] = 0
    path = tmp_path_factory.mktemp("vol") / "scene.zarr"
    g = zarr.open_group(str(path), mode="w-")
    ensure_array(g, "image", (1, *SHAPE), (1, 16, 64, 64), "uint16", 0, ("c", "z", "y", "x"))[:] = vol[None]
    ensure_array(g, "valid", SHAPE, (16, 64, 64), "uint8", 0, ("z", "y", "x"))[:] = valid
    return str(path)


@pytest.fixture(scope="module")
def model3d(tmp_path_factory):
    torch.manual_seed(1)
    spec = ModelSpec(in_channels=1, n_classes=3, base=4, depth=3, mean=[400.0], std=[300.0], dims=3)
    model = spec.build().eval()
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.weight.mul_(10)
    path = tmp_path_factory.mktemp("m3") / "unet3d.pt"
    save_checkpoint(path, model, spec)
    return path


def segment_volume(client, scene: str, out, model, tile: int) -> np.ndarray:
    pg = PatchGrid(SHAPE, PATCH, 0.25)
    work = zarr.open_group(str(out / "work.zarr"), mode="w-")
    create_logits_store(work, pg, 3)
    result = zarr.open_group(str(out / "result.zarr"), mode="w-")
    # Chunks no larger than the smallest tile: every tile writes whole chunks, so no two tasks share one.
    ensure_array(result, "class", SHAPE, (16, 32, 32), "uint8", 255, ("z", "y", "x"))
    tiles = [t.index for t in TileGrid(SHAPE, tile)]
    window = SlidingWindow(str(model), PATCH, 0.25, 4, norm={"mean": [400.0], "std": [300.0], "clip": None})
    infer_and_stitch(client, window, LogitsTarget(Scene(scene), str(out / "work.zarr"), str(out / "result.zarr"), tile),
                     tiles)
    # Each patch is deleted once every block it overlaps is final: nothing is left once all blocks are.
    assert zarr.open_array(str(out / "work.zarr"), path="logits", mode="r").nchunks_initialized == 0
    return zarr.open_array(str(out / "result.zarr"), path="class", mode="r")[:]


def test_3d_stitched_classes_are_identical_for_any_block_size(tmp_path, client, volume_store, model3d):
    maps = [segment_volume(client, volume_store, tmp_path / str(t), model3d, t) for t in (32, 64)]
    np.testing.assert_array_equal(maps[0], maps[1])
    valid = zarr.open_array(volume_store, path="valid", mode="r")[:] > 0
    assert (maps[0][~valid] == 255).all() and len(np.unique(maps[0][valid])) >= 2
