"""``segpipe export-model``: a segpipe checkpoint as a portable TorchScript file plus its model card.

The network is traced on one patch (``patch_size``); the card carries what the checkpoint carried besides
the weights (bands, classes, normalisation), so the exported file runs through ``method: {name: model}``
exactly as the checkpoint does, and in any other TorchScript runtime.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from segpipe.errors import InputError
from segpipe.models.card import ModelCard, Normalisation, card_path, write_card
from segpipe.models.checkpoint import load_model
from segpipe.models.load import check_patch


def export_torchscript(checkpoint: str | Path, output: str | Path, patch_size: int = 256) -> tuple[Path, Path]:
    """Write ``output`` (TorchScript) and its card; both appear complete or not at all."""
    model, spec = load_model(checkpoint)
    out = Path(output)
    if out.exists() and out.is_dir():
        raise InputError(f"output is a folder, not a file: {out}")
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    x, expected = check_patch(model, Path(checkpoint).name, patch_size, spec)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    torch.testing.assert_close(traced(x), expected)  # the trace computes what the model computes
    card = ModelCard(format="torchscript", in_channels=spec.in_channels, n_classes=spec.n_classes, dims=spec.dims,
                     class_names=list(spec.class_names) or None, patch_size=patch_size,
                     normalisation=Normalisation(kind="meanstd", mean=list(spec.mean), std=list(spec.std)))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.jit.save(traced, str(tmp))
        write_card(out, card)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, card_path(out)
