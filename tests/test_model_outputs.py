"""Networks that end in their own activation, and decision thresholds (issue 25, part 2).

Small networks built here end in a sigmoid (cut at 0.3, as many published binary networks are) or a softmax
inside the graph, exported to ONNX and TorchScript, then run tiled through their cards on the real SpaceNet scene.
The reference is one whole-image forward pass of the same file, cut the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from conftest import SCENE
from helpers import class_map, run

from segpipe.models.card import card_path

NORM = {"kind": "meanstd", "mean": [470.0], "std": [280.0]}


class _EndsInSigmoid(torch.nn.Module):
    """A local smoother and a sigmoid: probabilities that cross 0.3 and 0.5 on different pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.fill_(2.0 / 25)
            self.conv.bias.fill_(-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


class _EndsInSoftmax(torch.nn.Module):
    """Three classes from two local features, softmax inside the graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(1, 3, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(4 * self.conv(x), dim=1)


class _ThreeLabels(torch.nn.Module):
    """Three independent sigmoid channels (multi-label) from local features that overlap: brightness, its
    opposite and local contrast, so pixels have none, one or several labels on. ``logits``: no sigmoid at the
    end."""

    def __init__(self, logits: bool = False) -> None:
        super().__init__()
        self.logits = logits
        self.conv = torch.nn.Conv2d(1, 3, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0].fill_(3.0 / 25)
            self.conv.weight[1].fill_(-2.0 / 25)
            self.conv.weight[2, 0, 2, 2] = 3.0
            self.conv.weight[2, 0, 1:4, 1:4] -= 3.0 / 9
            self.conv.bias.copy_(torch.tensor([-1.0, -1.2, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return z if self.logits else torch.sigmoid(z)


def _export(net: torch.nn.Module, path: Path, card: dict) -> Path:
    x = torch.zeros(1, 1, 128, 128)
    if path.suffix == ".onnx":
        axes = {0: "n", 2: "h", 3: "w"}
        with torch.no_grad():
            torch.onnx.export(net.eval(), (x,), str(path), input_names=["image"], output_names=["out"],
                              dynamic_axes={"image": axes, "out": axes}, opset_version=17, dynamo=False)
        card = {"format": "onnx", **card}
    else:
        torch.jit.save(torch.jit.trace(net.eval(), x), str(path))
        card = {"format": "torchscript", **card}
    card_path(path).write_text(yaml.safe_dump({"in_channels": 1, "normalisation": NORM, **card}))
    return path


def _whole_image(path: Path) -> np.ndarray:
    """The network's own output over the whole scene in one forward pass (the file itself, not segpipe)."""
    with rasterio.open(SCENE) as src:
        x = ((src.read(1).astype(np.float32) - 470.0) / 280.0)[None, None]
    if path.suffix == ".onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0][0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(x))[0].numpy()


def _tiled_agrees(client, tmp_path: Path, model: Path, expected: np.ndarray) -> dict[int, np.ndarray]:
    """Runs the model tiled at 128 and 256 with probabilities; each class map agrees with ``expected`` on
    ≥ 99.9 % of valid pixels. Returns each tile size's valid-pixel mask (outputs under ``tmp_path/t<tile>``)."""
    method = {"name": "model", "model": str(model), "patch_size": 128, "overlap": 0.25}
    valid = {}
    for tile in (128, 256):
        got = class_map(run(client, tmp_path / f"t{tile}", input=str(SCENE), tile_size=tile, method=method,
                            probabilities=True))
        valid[tile] = got != 255
        assert (got[valid[tile]] == expected[valid[tile]]).mean() >= 0.999
    return valid


@pytest.mark.parametrize("suffix", [".onnx", ".ts"])
def test_a_network_ending_in_a_sigmoid_is_cut_at_its_own_threshold(tmp_path, client, suffix):
    model = _export(_EndsInSigmoid(), tmp_path / f"sig{suffix}",
                    {"n_classes": 1, "output": "sigmoid", "returns": "probabilities", "threshold": 0.3})
    p = _whole_image(model)[0]
    expected = (p > 0.3).astype(np.uint8)
    assert 0.2 < expected.mean() < 0.8 and ((p > 0.5) != expected).mean() > 0.05  # 0.3 and 0.5 disagree a lot
    for tile, valid in _tiled_agrees(client, tmp_path, model, expected).items():
        prob = rasterio.open(tmp_path / f"t{tile}" / "probabilities.tif").read(2).astype(np.float32) / 254
        # the blended probabilities themselves, never re-activated (float16 in the store)
        assert np.abs(prob[valid] - p[valid]).mean() < 4e-3


@pytest.mark.parametrize("suffix", [".onnx", ".ts"])
def test_a_network_ending_in_a_softmax_blends_probabilities(tmp_path, client, suffix):
    model = _export(_EndsInSoftmax(), tmp_path / f"soft{suffix}",
                    {"n_classes": 3, "output": "softmax", "returns": "probabilities"})
    p = _whole_image(model)
    expected = np.argmax(p, axis=0)
    assert len(np.unique(expected)) == 3
    valid = _tiled_agrees(client, tmp_path, model, expected)[256]
    prob = rasterio.open(tmp_path / "t256" / "probabilities.tif").read(indexes=[1, 2, 3]).astype(np.float32) / 254
    assert np.abs(prob[:, valid] - p[:, valid]).mean() < 4e-3


def _multilabel_classes(p: np.ndarray, cuts: list[float], rule: str, order: list[int]) -> np.ndarray:
    """The card's rule written out independently: 0 where no channel is on, else 1 + the chosen channel."""
    on = p > np.asarray(cuts)[:, None, None]
    if rule == "highest":
        best = np.argmax(np.where(on, p, -1.0), axis=0) + 1
        return np.where(on.any(axis=0), best, 0)
    out = np.zeros(p.shape[1:], np.int64)
    for c in order[::-1]:
        out[on[c]] = c + 1
    return out


@pytest.mark.parametrize(("suffix", "returns", "rule"), [(".onnx", "probabilities", "priority"),
                                                          (".ts", "logits", "highest")])
def test_several_sigmoid_channels_become_classes_by_the_cards_rule(tmp_path, client, suffix, returns, rule):
    cuts, order = [0.4, 0.3, 0.6], [2, 0, 1]
    card = {"n_classes": 3, "output": "sigmoid", "returns": returns, "threshold": cuts, "multilabel": rule,
            "class_names": ["none", "bright", "dark", "edge"]}
    if rule == "priority":
        card["priority"] = order
    model = _export(_ThreeLabels(logits=returns == "logits"), tmp_path / f"ml{suffix}", card)
    out = _whole_image(model)
    p = out if returns == "probabilities" else 1 / (1 + np.exp(-out))
    expected = _multilabel_classes(p, cuts, rule, order)
    on = p > np.asarray(cuts)[:, None, None]
    # every case occurs: none on, one on, several on (where the rule decides), and every class
    assert (on.sum(0) == 0).mean() > 0.01 and (on.sum(0) >= 2).mean() > 0.02 and len(np.unique(expected)) == 4
    other = _multilabel_classes(p, cuts, "highest" if rule == "priority" else "priority", order)
    assert (other != expected).mean() > 0.01  # the rule matters on this scene
    valid = _tiled_agrees(client, tmp_path, model, expected)[256]
    with rasterio.open(tmp_path / "t256" / "probabilities.tif") as src:
        assert src.descriptions == ("none", "bright", "dark", "edge", "confidence")
        prob = src.read(indexes=[1, 2, 3, 4]).astype(np.float32) / 254  # none on, then each channel's own
    assert np.abs(prob[1:, valid] - p[:, valid]).mean() < 4e-3
    assert np.abs(prob[0][valid] - np.prod(1 - p, axis=0)[valid]).mean() < 4e-3


def test_validate_shows_how_the_output_is_read_and_bad_cards_are_refused(tmp_path):
    model = _export(_EndsInSigmoid(), tmp_path / "sig.onnx",
                    {"n_classes": 1, "output": "sigmoid", "returns": "probabilities", "threshold": 0.3})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(SCENE), "output": str(tmp_path / "o"),
                                   "method": {"name": "model", "model": str(model)}}))
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("output:   returns probabilities (a sigmoid inside the graph); class 1 where the blended probability "
            "> 0.3") in proc.stdout
    card = yaml.safe_load(card_path(model).read_text())
    card_path(model).write_text(yaml.safe_dump({**card, "output": "softmax", "n_classes": 1}))
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "threshold applies to output: sigmoid" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    assert json.loads(json.dumps(card))["threshold"] == 0.3
    multi = {"n_classes": 3, "output": "sigmoid", "returns": "probabilities", "threshold": [0.4, 0.3, 0.6]}
    for extra, message in [({}, "is multi-label: say how a pixel with several channels on is classed"),
                           ({"multilabel": "priority", "priority": [0, 0, 1]}, "priority lists each channel"),
                           ({"multilabel": "highest", "threshold": [0.4, 0.3]}, "threshold gives 2 values for 3")]:
        _export(_ThreeLabels(), model, {**multi, **extra})
        proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(job)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    _export(_ThreeLabels(), model, {**multi, "multilabel": "priority", "priority": [2, 0, 1]})
    proc = subprocess.run([sys.executable, "-m", "segpipe.cli", "validate", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 labels; channel i is on where its blended probability > its threshold (0.4, 0.3, 0.6); class i + 1 " \
           "for the first on in order [2, 0, 1], 0 where none is on" in proc.stdout


def test_a_published_network_ending_in_a_sigmoid_agrees_with_its_own_whole_image_output(tmp_path, client):
    """A real third-party network shipped inside a wheel: RapidOCR's text detector (PaddleOCR's PP-OCRv4 DBNet,
    ``rapidocr-onnxruntime==1.4.4``, Apache-2.0), whose ONNX graph ends in a sigmoid and whose authors cut the map
    at ``thresh: 0.3`` (its config.yaml). Fed as the authors' code feeds it: BGR, x / 255 - 0.5 over 0.5, the
    image resized so its short side is ``limit_side_len: 736`` (``limit_type: min``) with sides multiples of 32;
    the card's patch is that 736. The scene is scikit-image's scanned page (``skimage.data.page()``, real text,
    191 x 384), derived: resized (bilinear) to 736 x 1472 as RapidOCR itself would, grey repeated into three
    bands, placed on an arbitrary UTM grid since rasters need a CRS."""
    import importlib.util
    import shutil

    import onnxruntime as ort
    from rasterio.transform import from_origin
    from skimage import data, transform

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    shipped = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_det_infer.onnx"
    model = tmp_path / "ppocr_det.onnx"
    shutil.copy(shipped, model)  # the card goes beside it; the installed package stays as it is
    card_path(model).write_text(yaml.safe_dump({
        "format": "onnx", "in_channels": 3, "n_classes": 1, "output": "sigmoid", "returns": "probabilities",
        "threshold": 0.3, "class_names": ["background", "text"], "patch_size": 736,
        "normalisation": {"kind": "meanstd", "mean": [127.5] * 3, "std": [127.5] * 3}}))
    h, w = 736, 1472
    page = np.clip(transform.resize(data.page().astype(np.float32), (h, w), order=1, preserve_range=True).round(),
                   0, 255).astype(np.uint8)
    scene = tmp_path / "page.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=h, width=w, count=3, dtype="uint8", crs="EPSG:32616",
                       transform=from_origin(500000, 4000000, 1, 1)) as dst:
        dst.write(np.stack([page] * 3))
    x = np.repeat(((page.astype(np.float32) - 127.5) / 127.5)[None, None], 3, axis=1)
    p = ort.InferenceSession(str(shipped), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0][0, 0]
    expected = (p > 0.3).astype(np.uint8)
    assert 0.05 < expected.mean() < 0.5  # text found, not everywhere
    method = {"name": "model", "model": str(model), "patch_size": 736, "overlap": 0.5}
    for tile in (256, 512):
        got = class_map(run(client, tmp_path / f"t{tile}", input=str(scene), tile_size=tile, method=method,
                            bands=[3, 2, 1]))
        agreement = (got == expected).mean()
        # Measured 0.9967 for both tile sizes. With 352-pixel patches, below the authors' 736, it was 0.989: the
        # network looks far around each pixel, so a patch smaller than it was made for loses context.
        assert agreement >= 0.99, agreement
