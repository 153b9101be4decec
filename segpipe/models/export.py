"""``segpipe export-model``: a segpipe checkpoint as a portable TorchScript or ONNX file plus its model card.

The network is traced on one patch (``patch_size``; ONNX keeps the batch and spatial axes free); the card
carries what the checkpoint carried besides the weights (bands, classes, normalisation), so the exported
file runs through ``method: {name: model}`` as the checkpoint does, and in any TorchScript or ONNX runtime.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from segpipe.errors import InputError
from segpipe.models.card import ModelCard, Normalisation, card_path, write_card
from segpipe.models.checkpoint import load_model
from segpipe.models.load import OnnxNet, check_patch


def export_model(checkpoint: str | Path, output: str | Path, fmt: str = "torchscript",
                 patch_size: int = 256) -> tuple[Path, Path]:
    """Write ``output`` as ``fmt`` (torchscript | onnx) and its card; the file appears complete or not at all.

    The exported network is run once on the dry-run patch and must give the checkpoint's logits.
    """
    model, spec = load_model(checkpoint)
    out = Path(output)
    if out.exists() and out.is_dir():
        raise InputError(f"output is a folder, not a file: {out}")
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    x, expected = check_patch(model, Path(checkpoint).name, patch_size, spec)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "onnx":
            _write_onnx(model, x, tmp, spec.dims)
            got = OnnxNet(tmp, "cpu")(x)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(model, x, check_trace=False)
            torch.jit.save(traced, str(tmp))
            got = traced(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # the export computes what the model does
        card = ModelCard(format=fmt, in_channels=spec.in_channels, n_classes=spec.n_classes, dims=spec.dims,
                         class_names=list(spec.class_names) or None, patch_size=patch_size,
                         resolution=spec.resolution,
                         normalisation=Normalisation(kind="meanstd", mean=list(spec.mean), std=list(spec.std)))
        write_card(out, card)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, card_path(out)


def _write_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, dims: int) -> None:
    """ONNX (opset 17, TorchScript-based exporter) with the batch and spatial axes left free."""
    axes = {0: "batch", **{2 + k: f"size{k}" for k in range(dims)}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's business
        torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, opset_version=17, dynamo=False)
