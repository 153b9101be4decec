"""Saving and loading model checkpoints safely.

A checkpoint is a dict of plain Python values and tensors, loaded with
``torch.load(weights_only=True)`` so that a malicious file cannot execute code. It carries
everything inference needs besides the weights: architecture, band normalisation and class names,
so a model can never be applied with the wrong band count or scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segpipe.errors import InputError
from segpipe.models.unet import UNet

FORMAT = "segpipe-unet2d/1"  # name kept: checkpoints of 3-D nets carry dims=3 in the same format


@dataclass
class ModelSpec:
    """Architecture and preprocessing of a U-Net checkpoint."""

    in_channels: int
    n_classes: int
    base: int = 16
    depth: int = 4
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    dims: int = 2
    arch: str = "segpipe.UNet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    clip: list[list[float]] | None = None  # per band [low, high] applied before (x - mean) / std (a CT window)
    # The scene's own statistics normalise it (model card zscore / scene_minmax): "zscore" or "minmax", per band,
    # or "zscore-pooled" / "minmax-pooled" over all bands together; None: mean and std above are fixed.
    scene_norm: str | None = None

    @property
    def resolution(self) -> list[float] | None:
        """The pixel size the model was trained at (one value, or one per axis), from its card or checkpoint."""
        return self.info.get("card", {}).get("resolution") or self.info.get("resolution")

    def build(self) -> torch.nn.Module:
        """The network, untrained: segpipe's U-Net, or a MONAI network named ``monai.<Class>``."""
        if self.arch == "segpipe.UNet":
            return UNet(self.in_channels, self.n_classes, self.base, self.depth, self.dims)
        if self.arch.startswith("monai."):
            try:
                from monai.networks import nets
            except ImportError:
                raise InputError(f"model architecture {self.arch} needs MONAI: pip install monai") from None
            cls = getattr(nets, self.arch.removeprefix("monai."), None)
            if cls is None:
                raise InputError(f"MONAI has no network {self.arch.removeprefix('monai.')!r}")
            return cls(spatial_dims=self.dims, in_channels=self.in_channels, out_channels=self.n_classes,
                       **self.arch_kwargs)
        raise InputError(f"unknown model architecture {self.arch!r}")


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: ModelSpec) -> None:
    """Write a checkpoint atomically (a crash never leaves a half-written model behind)."""
    payload = {
        "format": FORMAT,
        "spec": {"in_channels": spec.in_channels, "n_classes": spec.n_classes, "base": spec.base,
                 "depth": spec.depth, "dims": spec.dims, "arch": spec.arch, "arch_kwargs": spec.arch_kwargs,
                 "mean": [float(v) for v in spec.mean],
                 "std": [float(v) for v in spec.std], "class_names": list(spec.class_names),
                 "info": spec.info},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(p)


def read_spec(path: str | Path) -> ModelSpec:
    """Read only the spec (cheap checks on the client before any work is scheduled)."""
    return _load(path)[0]


def load_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """Load a checkpoint into an eval-mode model on ``device``."""
    spec, state = _load(path)
    model = spec.build()
    model.load_state_dict(state)
    return model.to(device).eval(), spec


def _load(path: str | Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
        raise InputError(f"model file is not a loadable weights-only checkpoint ({type(exc).__name__}): {p}") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"model file is not a {FORMAT} checkpoint: {p}")
    s = payload["spec"]
    spec = ModelSpec(in_channels=s["in_channels"], n_classes=s["n_classes"], base=s["base"],
                     depth=s["depth"], dims=int(s.get("dims", 2)), arch=s.get("arch", "segpipe.UNet"),
                     arch_kwargs=dict(s.get("arch_kwargs", {})), mean=list(s["mean"]), std=list(s["std"]),
                     class_names=list(s["class_names"]), info=dict(s.get("info", {})))
    return spec, payload["state_dict"]
