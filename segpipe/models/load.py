"""Any model file segpipe runs, loaded the same way on the client (checks) and on the workers.

- a segpipe checkpoint (``torch.save`` of plain values and tensors, read with ``weights_only=True``);
- a TorchScript file (``torch.jit.save``) with its model card beside it (:mod:`segpipe.models.card`).

Both are detected by content, not by file name. Neither runs pickled Python: weights-only unpickling
accepts tensors and plain containers only, and TorchScript's loader builds TorchScript code and types,
never arbitrary Python objects.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import torch

from segpipe.errors import InputError
from segpipe.models.card import card_path, read_card
from segpipe.models.checkpoint import ModelSpec, load_model


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` archives have none."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class SigmoidAsClasses(torch.nn.Module):
    """A binary model's single logit z as the two-class logits (0, z): arg-max is class 1 exactly where z > 0."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def load_any(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """An eval-mode model on ``device`` and its spec, from a checkpoint or a TorchScript file and card."""
    if not is_torchscript(path):
        return load_model(path, device)
    card = read_card(path)
    net: torch.nn.Module = torch.jit.load(str(path), map_location=device).eval()
    if card.output == "sigmoid":
        net = SigmoidAsClasses(net).eval()
    offset, scale, clip = card.normalisation.affine()
    spec = ModelSpec(in_channels=card.in_channels, n_classes=card.classes, mean=offset, std=scale, clip=clip,
                     class_names=list(card.class_names or []), dims=card.dims, arch="torchscript",
                     info={"card": card.model_dump(mode="json", exclude_none=True)})
    return net, spec


def model_digest(path: str | Path) -> str:
    """SHA-256 of the model file and, for TorchScript, its card: either changes every pixel's logits."""
    h = hashlib.sha256(Path(path).read_bytes())
    if is_torchscript(path):
        h.update(card_path(path).read_bytes())
    return h.hexdigest()


def check_patch(model: torch.nn.Module, name: str, patch: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """One dry forward pass on the client: the model must map a patch to logits of the same size.

    Cheaper than learning it from a failed task on a worker, and it works for any architecture
    (each has its own divisibility rules). Returns the zero patch and its logits.
    """
    x = torch.zeros((1, spec.in_channels, *(patch,) * spec.dims))
    try:
        with torch.inference_mode():
            y = model(x)
    except RuntimeError as exc:
        raise InputError(f"model {name} cannot run on patch_size {patch}: "
                         f"{str(exc).splitlines()[0]}") from None
    if tuple(y.shape) != (1, spec.n_classes, *(patch,) * spec.dims):
        raise InputError(f"model {name} maps a {patch}-pixel patch to shape {tuple(y.shape)[2:]}, "
                         f"not to the patch size; choose another patch_size")
    return x, y
