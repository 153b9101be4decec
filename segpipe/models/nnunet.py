"""nnU-Net v2 trained-model folders: ``plans.json``, ``dataset.json``, ``fold_N/checkpoint_final.pth``.

The folder is the one nnU-Net writes per trainer, plans and configuration
(``nnUNetTrainer__nnUNetPlans__2d``; the configuration is the part after the last ``__``, or the only one
the plans hold). What nnU-Net's predictor would do, segpipe does from the same files, as data:

- the network: ``architecture.network_class_name`` (a ``dynamic_network_architectures`` class, the package
  nnU-Net itself builds with) and its ``arch_kwargs``, whose ``_kw_requires_import`` entries must name
  ``torch.nn`` classes; built without deep supervision;
- the weights of every ``fold_*/checkpoint_final.pth`` present, read weights-only (numpy scalars and a
  ``torch.device`` allowed, as nnU-Net's checkpoints hold them in their logs and arguments); several folds
  are an ensemble whose logits are averaged, as nnU-Net averages them;
- the normalisation per channel: ``CTNormalization`` (clip to the dataset's 0.5 / 99.5 percentiles, then
  its foreground mean and std), ``ZScoreNormalization`` (the scene's own z-score; not with
  ``use_mask_for_norm``), ``RGBTo01Normalization``, ``NoNormalization``; one scheme for every channel;
- classes from ``dataset.json`` ``labels`` (region-based labels are refused), channels from
  ``channel_names``, the patch size and spacing of the configuration (spacing: the resolution check).

Axis order: nnU-Net's arrays are ([z,] y, x) as its image reader returns them; segpipe's volumes are
RAS+ (z, y, x), so a model trained on differently oriented arrays sees the volume flipped. Mirroring is
the job's ``tta: mirror`` (all axes, not only the checkpoint's allowed ones).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segpipe.errors import InputError
from segpipe.models.card import ModelCard, Normalisation
from segpipe.models.checkpoint import ModelSpec

# What nnU-Net's checkpoints hold besides tensors and plain containers, all inert data.
_SAFE = [(np._core if hasattr(np, "_core") else np.core).multiarray.scalar, np.dtype, *(getattr(np.dtypes, n) for n in
                                                  ("Float64DType", "Float32DType", "Int64DType", "Int32DType"))]


def is_nnunet(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "plans.json").is_file() and (p / "dataset.json").is_file()


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"nnU-Net file {path} is not JSON: {exc}") from None


def _import(dotted: str, allowed: str, what: str) -> Any:
    if not isinstance(dotted, str) or not dotted.startswith(allowed):
        raise InputError(f"nnU-Net plans: {what} {dotted!r} is not a {allowed}* name")
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        if allowed.startswith("dynamic_network_architectures"):
            raise InputError("nnU-Net models are built with dynamic-network-architectures: pip install "
                             "dynamic-network-architectures --no-deps (it needs only torch and numpy for U-Nets)") \
                from None
        raise InputError(f"nnU-Net plans: {what} {dotted!r} cannot be imported") from None


def _configuration(folder: Path, plans: dict[str, Any]) -> str:
    configs = plans.get("configurations") or {}
    name = folder.name.rsplit("__", 1)[-1] if "__" in folder.name else None
    if name not in configs:
        if len(configs) != 1:
            raise InputError(f"nnU-Net folder {folder.name}: cannot tell which of {sorted(configs)} it was trained "
                             "with (name the folder TRAINER__PLANS__CONFIGURATION as nnU-Net does)")
        name = next(iter(configs))
    return name


def _normalisation(config: dict[str, Any], plans: dict[str, Any], channels: int) -> Normalisation:
    schemes = list(config.get("normalization_schemes") or [])
    if len(schemes) != channels or len(set(schemes)) != 1:
        raise InputError(f"nnU-Net plans: normalization_schemes {schemes} (one scheme for all {channels} "
                         "channel(s) is read)")
    scheme = schemes[0]
    if scheme == "CTNormalization":
        props = plans.get("foreground_intensity_properties_per_channel") or {}
        try:
            per = [props[str(c)] for c in range(channels)]
            return Normalisation(kind="meanstd", mean=[float(p["mean"]) for p in per],
                                 std=[max(float(p["std"]), 1e-8) for p in per],
                                 low=[float(p["percentile_00_5"]) for p in per],
                                 high=[float(p["percentile_99_5"]) for p in per])
        except (KeyError, TypeError, ValueError):
            raise InputError("nnU-Net plans: CTNormalization without foreground_intensity_properties_per_channel "
                             "(mean, std, percentile_00_5, percentile_99_5)") from None
    if scheme == "ZScoreNormalization":
        if any(config.get("use_mask_for_norm") or []):
            raise InputError("nnU-Net plans: ZScoreNormalization with use_mask_for_norm takes statistics inside "
                             "a foreground mask only; segpipe takes them over the valid pixels")
        return Normalisation(kind="zscore", channel_wise=True)
    if scheme == "RGBTo01Normalization":
        return Normalisation(kind="minmax", low=[0.0] * channels, high=[255.0] * channels)
    if scheme == "RescaleTo01Normalization":  # per image: the scene's own minimum and maximum, per channel
        return Normalisation(kind="scene_minmax", channel_wise=True)
    if scheme == "NoNormalization":
        return Normalisation(kind="meanstd", mean=[0.0] * channels, std=[1.0] * channels)
    raise InputError(f"nnU-Net plans: normalisation {scheme!r} is not read (per-image rescaling)")


def _classes(dataset: dict[str, Any]) -> list[str]:
    labels = dataset.get("labels") or {}
    if any(not isinstance(v, int) for v in labels.values()):
        raise InputError("nnU-Net dataset.json: region-based labels (lists of label values) are not read")
    by_value = {v: k for k, v in labels.items() if k != "ignore"}
    if sorted(by_value) != list(range(len(by_value))):
        raise InputError(f"nnU-Net dataset.json: labels {labels} are not 0..N-1")
    return [by_value[v] for v in range(len(by_value))]


def _fold_weights(folder: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted(folder.glob("fold_*/checkpoint_final.pth"))
    if not files:
        raise InputError(f"nnU-Net folder {folder}: no fold_*/checkpoint_final.pth")
    out = []
    for f in files:
        try:
            with torch.serialization.safe_globals(_SAFE):
                payload = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
            raise InputError(f"nnU-Net checkpoint {f} is not a weights-only file ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("network_weights"), dict):
            raise InputError(f"nnU-Net checkpoint {f} holds no network_weights")
        out.append(payload["network_weights"])
    return out


class FoldEnsemble(torch.nn.Module):
    """The folds' logits averaged (one fold: that fold)."""

    def __init__(self, nets: list[torch.nn.Module]) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nets[0](x)
        for net in self.nets[1:]:
            y = y + net(x)
        return y / len(self.nets) if len(self.nets) > 1 else y


def load_nnunet(folder: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    folder = Path(folder)
    plans, dataset = _json(folder / "plans.json"), _json(folder / "dataset.json")
    name = _configuration(folder, plans)
    config = plans["configurations"][name]
    arch = config.get("architecture")
    if not isinstance(arch, dict):
        raise InputError("nnU-Net plans without an 'architecture' entry (nnU-Net < 2.3) are not read")
    cls = _import(arch.get("network_class_name"), "dynamic_network_architectures.", "network_class_name")
    kwargs = dict(arch.get("arch_kwargs") or {})
    for key in arch.get("_kw_requires_import") or []:
        if kwargs.get(key) is not None:
            kwargs[key] = _import(kwargs[key], "torch.nn.", key)
    channels = len(dataset.get("channel_names") or {})
    classes = _classes(dataset)
    conv = kwargs.get("conv_op")
    dims = 3 if conv is not None and "3d" in conv.__name__.lower() else 2
    nets = []
    for weights in _fold_weights(folder):
        try:
            net = cls(input_channels=channels, num_classes=len(classes), deep_supervision=False, **kwargs)
            net.load_state_dict(weights)
        except (TypeError, RuntimeError) as exc:
            raise InputError(f"nnU-Net folder {folder.name}: the weights do not fit the planned network: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        nets.append(net)
    patch = config.get("patch_size") or [None]
    spacing = config.get("spacing")
    card = ModelCard(format="nnunet", in_channels=channels, n_classes=len(classes), dims=dims, class_names=classes,
                     normalisation=_normalisation(config, plans, channels),
                     patch_size=int(patch[0]) if patch[0] else None,
                     resolution=[float(v) for v in spacing] if spacing else None)
    return FoldEnsemble(nets).to(device).eval(), card.spec(f"nnunet.{name}")
