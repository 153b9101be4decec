"""MONAI bundles: a folder with ``configs/inference.json|yaml``, ``configs/metadata.json`` and
``models/model.pt`` (weights) or ``models/model.ts`` (TorchScript).

A bundle config is a program: its ``_target_`` entries name Python callables and its ``$...`` strings are
evaluated. segpipe does not run it. It reads the parts a segmentation model needs, as plain data:

- ``network_def``: a class of ``monai.networks.nets`` and its keyword arguments (plain values only);
- the intensity transform of ``preprocessing``: ``ScaleIntensityRange(d)`` (a window, scaled to 0..1),
  ``NormalizeIntensity(d)`` with fixed ``subtrahend``/``divisor``, or without them (the scene's own
  z-score); none means pixels go in as they are;
- ``Spacing(d)`` ``pixdim``: the resolution it was trained at;
- ``metadata.json``: input channels, output channels and their names (``channel_def``), patch size.

Weights are read with ``weights_only=True`` (a state dict, or a dict holding one under ``model``).
Anything else (an expression, another network library, statistics over nonzero voxels) is refused in
one line rather than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from segpipe.errors import InputError
from segpipe.models.card import ModelCard, Normalisation
from segpipe.models.checkpoint import ModelSpec

_SKIP = {"_target_", "_requires_", "_disabled_", "_desc_", "_mode_"}


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "configs").is_dir() and (p / "models").is_dir()


def _read_config(folder: Path, stem: str) -> dict[str, Any]:
    for suffix, parse in ((".json", json.loads), (".yaml", yaml.safe_load), (".yml", yaml.safe_load)):
        path = folder / "configs" / f"{stem}{suffix}"
        if path.is_file():
            try:
                data = parse(path.read_text())
            except (ValueError, yaml.YAMLError) as exc:
                raise InputError(f"MONAI bundle config {path} is not readable: {str(exc).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise InputError(f"MONAI bundle config {path} is not a mapping")
            return data
    raise InputError(f"MONAI bundle {folder} has no configs/{stem}.json or .yaml")


def _plain(value: Any, where: str) -> Any:
    """``value`` if it holds no bundle expression or reference ('$...', '@...', '%...')."""
    if isinstance(value, str) and value[:1] in "$@%":
        raise InputError(f"MONAI bundle: {where} = {value!r} is an expression; segpipe reads plain values only")
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _transforms(config: dict[str, Any]) -> list[dict[str, Any]]:
    pre = config.get("preprocessing") or {}
    items = pre.get("transforms", []) if isinstance(pre, dict) else pre
    return [t for t in items if isinstance(t, dict) and isinstance(t.get("_target_"), str)]


def _name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _normalisation(transforms: list[dict[str, Any]], channels: int) -> Normalisation:
    """The bundle's intensity transform as a card normalisation (one per channel, the same for each)."""
    for t in transforms:
        name = _name(t["_target_"]).removesuffix("d")
        if name == "ScaleIntensityRange":
            a_min, a_max = float(_plain(t["a_min"], "a_min")), float(_plain(t["a_max"], "a_max"))
            b_min, b_max = float(t.get("b_min", 0.0) or 0.0), float(t.get("b_max", 1.0) or 1.0)
            if (b_min, b_max) != (0.0, 1.0):
                raise InputError(f"MONAI bundle: ScaleIntensityRange to {b_min}..{b_max} (only 0..1 is read)")
            kind = "window" if t.get("clip", False) else "minmax"
            return Normalisation(kind=kind, low=[a_min] * channels, high=[a_max] * channels)
        if name == "NormalizeIntensity":
            sub, div = t.get("subtrahend"), t.get("divisor")
            if sub is None and div is None:
                if t.get("nonzero", False):
                    raise InputError("MONAI bundle: NormalizeIntensity(nonzero=True) takes statistics over nonzero "
                                     "voxels only; segpipe takes them over valid voxels (set the job's nodata: 0 and "
                                     "nonzero: false in a copy of the bundle)")
                return Normalisation(kind="zscore", channel_wise=bool(t.get("channel_wise", False)))
            if sub is None or div is None:
                raise InputError("MONAI bundle: NormalizeIntensity with only one of subtrahend and divisor")
            sub, div = _plain(sub, "subtrahend"), _plain(div, "divisor")
            mean = list(sub) if isinstance(sub, list) else [float(sub)] * channels
            std = list(div) if isinstance(div, list) else [float(div)] * channels
            return Normalisation(kind="meanstd", mean=mean, std=std)
    return Normalisation(kind="meanstd", mean=[0.0] * channels, std=[1.0] * channels)


def _resolution(transforms: list[dict[str, Any]], dims: int) -> list[float] | None:
    for t in transforms:
        if _name(t["_target_"]).removesuffix("d") == "Spacing" and "pixdim" in t:
            pix = _plain(t["pixdim"], "pixdim")
            pix = [float(v) for v in (pix if isinstance(pix, list) else [pix] * dims)]
            return pix[::-1]  # MONAI's pixdim is (x, y[, z]); segpipe's axes are ([z,] y, x)
    return None


def load_bundle(folder: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """The bundle's network with its weights, in eval mode on ``device``, and its spec (card in ``info``)."""
    folder = Path(folder)
    config, meta = _read_config(folder, "inference"), _read_config(folder, "metadata")
    net_def = config.get("network_def")
    if not isinstance(net_def, dict) or not isinstance(net_def.get("_target_"), str):
        raise InputError(f"MONAI bundle {folder}: inference config has no network_def with a _target_")
    target = net_def["_target_"].removeprefix("monai.networks.nets.")
    from monai.networks import nets

    cls = getattr(nets, target, None) if "." not in target else None
    if cls is None:
        raise InputError(f"MONAI bundle {folder}: network {net_def['_target_']!r} is not a monai.networks.nets class")
    kwargs = {k: _plain(v, f"network_def.{k}") for k, v in net_def.items() if k not in _SKIP}
    try:
        fmt = meta["network_data_format"]
        image = next(iter(fmt["inputs"].values()))
        pred = next(iter(fmt["outputs"].values()))
        channels, classes = int(image["num_channels"]), int(pred["num_channels"])
    except (KeyError, StopIteration, TypeError, ValueError):
        raise InputError(f"MONAI bundle {folder}: metadata.json lacks network_data_format inputs/outputs "
                         "with num_channels") from None
    dims = int(kwargs.get("spatial_dims", kwargs.get("dimensions", len(image.get("spatial_shape", [0, 0])))))
    names = pred.get("channel_def")
    names = [str(names.get(str(i), names.get(i, f"class{i}"))) for i in range(classes)] if isinstance(names, dict) \
        else None
    patch = image.get("spatial_shape")
    transforms = _transforms(config)
    card = ModelCard(format="monai-bundle", in_channels=channels, n_classes=classes, dims=dims, class_names=names,
                     normalisation=_normalisation(transforms, channels),
                     patch_size=int(patch[0]) if isinstance(patch, list) and patch and
                     isinstance(patch[0], int) else None,
                     resolution=_resolution(transforms, dims))
    net = _weights(folder, cls, kwargs, device)
    return net, card.spec(f"monai-bundle.{target}")


def _weights(folder: Path, cls: type, kwargs: dict[str, Any], device: str) -> torch.nn.Module:
    ts, pt = folder / "models" / "model.ts", folder / "models" / "model.pt"
    if pt.is_file():
        try:
            net = cls(**kwargs)
        except (TypeError, ValueError, ImportError) as exc:  # ImportError: an optional package MONAI needs here
            raise InputError(f"MONAI bundle {folder}: network_def does not build: "
                             f"{str(exc).strip().splitlines()[0][:200]}") from None
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
            raise InputError(f"MONAI bundle weights {pt} are not a weights-only file ({type(exc).__name__})") \
                from None
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"MONAI bundle weights {pt} do not fit network_def: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        return net.to(device).eval()
    if ts.is_file():
        return torch.jit.load(str(ts), map_location=device).eval()
    raise InputError(f"MONAI bundle {folder} has neither models/model.pt nor models/model.ts")
