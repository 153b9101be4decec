"""The deep families of the segmentation literature through segpipe's one model path.

Small, seeded networks of each family, handed over the way a model trained elsewhere arrives: a
DeepLab-style network (atrous convolutions, ASPP with an image-pooling branch) as ONNX, a SegNet-style
encoder-decoder (pooling indices reused by max-unpooling) as TorchScript, an FCN-style network (skip
scores added after upsampling) as TorchScript, and a ViT-based network (MONAI's UNETR) as a MONAI bundle.
Each runs end to end on the real SpaceNet scene and gives the same class map for two tile sizes; the
weights are untrained, since what is checked is the path, not the accuracy.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import SCENE
from helpers import class_map, run

from segpipe.models.card import card_path

NORM = {"kind": "meanstd", "mean": [470.0], "std": [280.0]}


class DeepLabLite(torch.nn.Module):
    """Stride-4 backbone, ASPP (1x1, atrous 3x3 at rates 2/4/6, image pooling), bilinear upsampling."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, 2, 1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(width, width, 3, 2, 1), torch.nn.ReLU())
        self.branches = torch.nn.ModuleList([torch.nn.Conv2d(width, width, 1)] + [
            torch.nn.Conv2d(width, width, 3, padding=r, dilation=r) for r in (2, 4, 6)])
        self.pool = torch.nn.Conv2d(width, width, 1)
        self.head = torch.nn.Conv2d(width * 5, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        pooled = F.interpolate(self.pool(F.adaptive_avg_pool2d(f, 1)), size=f.shape[-2:], mode="nearest")
        y = self.head(torch.cat([b(f) for b in self.branches] + [pooled], dim=1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class SegNetLite(torch.nn.Module):
    """Two encoder stages whose max-pooling indices drive the decoder's max-unpooling."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2 = torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.Conv2d(width, width, 3, padding=1)
        self.dec2, self.dec1 = torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.Conv2d(width, classes, 3,
                                                                                             padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, i1 = F.max_pool2d(torch.relu(self.enc1(x)), 2, return_indices=True)
        b, i2 = F.max_pool2d(torch.relu(self.enc2(a)), 2, return_indices=True)
        b = torch.relu(self.dec2(F.max_unpool2d(b, i2, 2)))  # patches are multiples of 4: unpooling doubles exactly
        return self.dec1(F.max_unpool2d(b, i1, 2))


class FCNLite(torch.nn.Module):
    """FCN-8s in miniature: class scores at strides 2 and 4, upsampled and added, then to full size."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.s2 = torch.nn.Conv2d(1, width, 3, 2, 1)
        self.s4 = torch.nn.Conv2d(width, width, 3, 2, 1)
        self.score2, self.score4 = torch.nn.Conv2d(width, classes, 1), torch.nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f2 = torch.relu(self.s2(x))
        f4 = torch.relu(self.s4(f2))
        y = self.score2(f2) + F.interpolate(self.score4(f4), size=f2.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _card(path, fmt):
    card_path(path).write_text(yaml.safe_dump({"format": fmt, "in_channels": 1, "n_classes": 2,
                                               "class_names": ["background", "building"], "normalisation": NORM}))
    return path


def _torchscript(tmp_path, net, name):
    path = tmp_path / f"{name}.ts"
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return _card(path, "torchscript")


def _onnx(tmp_path, net, name):
    path = tmp_path / f"{name}.onnx"
    axes = {0: "n", 2: "h", 3: "w"}
    with torch.no_grad():
        torch.onnx.export(net.eval(), (torch.zeros(1, 1, 128, 128),), str(path), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, opset_version=17,
                          dynamo=False)
    return _card(path, "onnx")


def _unetr_bundle(tmp_path):
    from monai.networks.nets import UNETR

    args = {"in_channels": 1, "out_channels": 2, "img_size": [128, 128], "spatial_dims": 2, "feature_size": 8,
            "hidden_size": 64, "mlp_dim": 128, "num_heads": 4}
    root = tmp_path / "unetr_bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "UNETR", **args},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": 470.0, "divisor": 280.0}]}}))
    (root / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": [128, 128]}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "building"}}}}}))
    torch.manual_seed(0)
    torch.save(UNETR(**args).state_dict(), root / "models" / "model.pt")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deeplab-onnx", "segnet-torchscript", "fcn-torchscript", "vit-unetr-bundle"])
def test_each_family_runs_through_the_same_path_and_keeps_tiling_invariance(tmp_path, client, family):
    torch.manual_seed(0)
    model = {"deeplab-onnx": lambda: _onnx(tmp_path, DeepLabLite(), "deeplab"),
             "segnet-torchscript": lambda: _torchscript(tmp_path, SegNetLite(), "segnet"),
             "fcn-torchscript": lambda: _torchscript(tmp_path, FCNLite(), "fcn"),
             "vit-unetr-bundle": lambda: _unetr_bundle(tmp_path)}[family]()
    method = {"name": "model", "model": str(model), "patch_size": 128, "overlap": 0.25}
    maps = [class_map(run(client, tmp_path / f"t{t}", input=str(SCENE), tile_size=t, method=method))
            for t in (256, 512)]
    np.testing.assert_array_equal(maps[0], maps[1])
    assert maps[0].shape == (900, 900) and set(np.unique(maps[0])) <= {0, 1, 255}
