"""Model cards: what a model file needs besides its weights, in a YAML file beside it.

A TorchScript or ONNX file carries the network but not how to feed it. The card says it:
input channels, classes and their names, how pixels are normalised, the patch size it was made for, the
pixel size it was trained at, and what its output means. ``model.ts`` has its card in
``model.ts.card.yaml`` (``model.onnx`` in ``model.onnx.card.yaml``).
segpipe checks the card against the scene before anything is written.

Normalisations, each a per-band ``(x - offset) / scale``, optionally clipped first:
- ``meanstd``: ``mean`` and ``std`` per band (segpipe's checkpoints, TorchGeo/smp conventions), after
  clipping to ``[low, high]`` when those are given (nnU-Net's CT normalisation);
- ``window``: clip to ``[low, high]`` then scale to 0..1 (a fixed CT window, e.g. -1000..1000 HU);
- ``minmax``: scale ``[low, high]`` to 0..1 without clipping (e.g. 0..255 or 0..10000 reflectance);
- ``zscore``: the scene's own mean and standard deviation over its valid pixels, per band (or pooled over
  the bands with ``channel_wise: false``), computed once for the whole scene so every tile is normalised
  alike (nnU-Net's ZScoreNormalization, MONAI's NormalizeIntensity without fixed values);
- ``scene_minmax``: the scene's own minimum and maximum over its valid pixels scaled to 0..1, per band (or
  pooled), once for the whole scene (nnU-Net's RescaleTo01Normalization, a scene being nnU-Net's image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segpipe.errors import InputError
from segpipe.models.checkpoint import ModelSpec

CARD_SUFFIX = ".card.yaml"


class Normalisation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["meanstd", "window", "minmax", "zscore", "scene_minmax"] = "meanstd"
    mean: list[float] | None = None
    std: list[float] | None = Field(None, description="per band; every value > 0")
    low: list[float] | None = None
    high: list[float] | None = None
    channel_wise: bool = Field(True, description="zscore, scene_minmax: each band by its own statistics (else all "
                                                  "bands pooled)")

    @property
    def from_scene(self) -> bool:
        """Whether the values come from the scene's own statistics rather than the card."""
        return self.kind in ("zscore", "scene_minmax")

    @model_validator(mode="after")
    def _complete(self) -> Normalisation:
        if self.from_scene:
            return self
        pair = ("mean", "std") if self.kind == "meanstd" else ("low", "high")
        a, b = (getattr(self, k) for k in pair)
        if a is None or b is None or len(a) != len(b):
            raise ValueError(f"normalisation {self.kind} needs {pair[0]} and {pair[1]}, one value per band each")
        if self.kind == "meanstd" and min(b) <= 0:
            raise ValueError("normalisation std values must be > 0")
        if (self.low is None) != (self.high is None):
            raise ValueError(f"normalisation {self.kind}: low and high go together")
        if self.low is not None and (len(self.low) != len(a) or any(
                h <= lo for lo, h in zip(self.low, self.high, strict=True))):
            raise ValueError(f"normalisation {self.kind}: one low and high per band, every high above its low")
        return self

    def affine(self) -> tuple[list[float], list[float], list[list[float]] | None]:
        """Per band (offset, scale) and the clip range or None: pixels become ``(clip(x) - offset) / scale``.

        Empty for ``zscore`` and ``scene_minmax``: their values come from the scene
        (:func:`segpipe.methods.segment.normalisation`)."""
        if self.from_scene:
            return [], [], None
        if self.kind == "meanstd":  # low/high, when given, clip first (nnU-Net's CT normalisation)
            clip = [[lo, h] for lo, h in zip(self.low, self.high, strict=True)] if self.low is not None else None
            return list(self.mean), list(self.std), clip
        scale = [h - lo for lo, h in zip(self.low, self.high, strict=True)]
        clip = [[lo, h] for lo, h in zip(self.low, self.high, strict=True)] if self.kind == "window" else None
        return list(self.low), scale, clip


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["torchscript", "onnx", "monai-bundle", "nnunet"]
    in_channels: int = Field(ge=1)
    n_classes: int = Field(ge=1, description="output channels: one per class with softmax; with sigmoid 1 (a binary "
                                              "model) or one per label (multi-label, with a multilabel rule)")
    dims: Literal[2, 3] = 2
    class_names: list[str] | None = None
    normalisation: Normalisation
    patch_size: int | None = Field(None, ge=16, description="the patch edge the model was made for")
    output: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="the activation that makes the network's output probabilities: softmax (one "
                               "channel per class, the class is their arg-max) or sigmoid (a single channel, class 1 "
                               "where its probability is above threshold); applied by segpipe when the graph "
                               "returns logits, already inside the graph when it returns probabilities")
    returns: Literal["logits", "probabilities"] = Field(
        "logits", description="what the graph returns: logits (segpipe applies output's activation), or "
                              "probabilities (the graph ends in that sigmoid or softmax: never re-activated; "
                              "overlapping patches are averaged as probabilities)")
    threshold: float | list[float] = Field(
        0.5, description="sigmoid models: a channel is on where its blended probability is above this (the authors' "
                         "decision threshold); one value, or one per channel")
    multilabel: Literal["priority", "highest"] | None = Field(
        None, description="several sigmoid channels: which class a pixel with several channels on takes: priority "
                          "(the first on in `priority` order) or highest (the on channel of highest probability); a "
                          "pixel with none on is class 0; channel i is class i + 1")
    priority: list[int] | None = Field(None, description="multilabel: priority: channel indices, first wins "
                                                         "(default: channel order)")
    resolution: list[float] | None = Field(None, description="pixel size it was trained at: m/px (geo), "
                                                             "µm/px (slides), mm (volumes), one per axis")

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        bands = len(self.normalisation.affine()[0])
        if not self.normalisation.from_scene and bands != self.in_channels:
            raise ValueError(f"normalisation gives {bands} band(s) for in_channels {self.in_channels}")
        cuts = self.thresholds
        if any(not 0 < t < 1 for t in cuts):
            raise ValueError("threshold values lie strictly between 0 and 1")
        if self.output == "softmax" and cuts != [0.5]:
            raise ValueError("threshold applies to output: sigmoid; a softmax model's class is the arg-max")
        if self.output == "softmax" and (self.multilabel or self.priority):
            raise ValueError("multilabel applies to output: sigmoid with several channels")
        if self.output == "sigmoid":
            self._check_labels(cuts)

        if self.class_names is not None and len(self.class_names) != self.classes:
            raise ValueError(f"class_names lists {len(self.class_names)} names for {self.classes} classes")
        return self

    def _check_labels(self, cuts: list[float]) -> None:
        k = self.n_classes
        if k > 1 and self.multilabel is None:
            raise ValueError(f"output sigmoid with {k} channels is multi-label: say how a pixel with several channels "
                             "on is classed, multilabel: priority (first in `priority` order) or highest")
        if k == 1 and (self.multilabel or self.priority):
            raise ValueError("multilabel takes several sigmoid channels (n_classes > 1)")
        if len(cuts) not in (1, k):
            raise ValueError(f"threshold gives {len(cuts)} values for {k} sigmoid channel(s)")
        if self.priority is not None and (self.multilabel != "priority" or sorted(self.priority) != list(range(k))):
            raise ValueError(f"priority lists each channel 0..{k - 1} once, with multilabel: priority")

    @property
    def thresholds(self) -> list[float]:
        """The decision threshold of each sigmoid channel (one value repeated when the card gives one)."""
        t = self.threshold if isinstance(self.threshold, list) else [self.threshold]
        return t * self.n_classes if len(t) == 1 and self.output == "sigmoid" else t

    def describe(self) -> str:
        """How the output is read, for ``segpipe validate``: what the graph returns and how classes come of it."""
        if self.output == "sigmoid":
            made = "probabilities (a sigmoid inside the graph)" if self.returns == "probabilities" else \
                "logits (segpipe applies a sigmoid)"
            cuts = ", ".join(f"{t:g}" for t in self.thresholds)
            if self.n_classes == 1:
                return f"returns {made}; class 1 where the blended probability > {cuts}"
            rule = (f"the first on in order {self.priority or list(range(self.n_classes))}"
                    if self.multilabel == "priority" else "the on channel of highest probability")
            return (f"returns {made}, {self.n_classes} labels; channel i is on where its blended probability > "
                    f"its threshold ({cuts}); class i + 1 for {rule}, 0 where none is on")
        made = "probabilities (a softmax inside the graph)" if self.returns == "probabilities" else \
            "logits (segpipe applies a softmax)"
        return f"returns {made}; the class is the arg-max of the blended " + \
            ("probabilities" if self.returns == "probabilities" else "logits")

    @property
    def classes(self) -> int:
        """Classes of the class map: a sigmoid model's K channels give K + 1 (none on, then each channel)."""
        return self.n_classes + 1 if self.output == "sigmoid" else self.n_classes

    def spec(self, arch: str) -> ModelSpec:
        """What inference needs from this card, as the spec every loader returns (the card itself in ``info``)."""
        norm = self.normalisation
        offset, scale, clip = norm.affine()
        scene_norm = None
        if norm.from_scene:
            scene_norm = ("zscore" if norm.kind == "zscore" else "minmax") + ("" if norm.channel_wise else "-pooled")
        return ModelSpec(in_channels=self.in_channels, n_classes=self.classes, mean=offset, std=scale, clip=clip,
                         scene_norm=scene_norm, class_names=list(self.class_names or []), dims=self.dims, arch=arch,
                         info={"card": self.model_dump(mode="json", exclude_none=True)})


def card_path(model: str | Path) -> Path:
    """``model.ts`` -> ``model.ts.card.yaml``: the whole name, so a .ts and an .onnx export side by side each
    keep their own card."""
    p = Path(model)
    return p.with_name(p.name + CARD_SUFFIX)


def read_card(model: str | Path) -> ModelCard:
    """The card beside ``model``; a missing or invalid card is a bad input, named in one line."""
    path = card_path(model)
    if not path.is_file():
        raise InputError(f"model {Path(model).name} needs a model card: {path} (see segpipe/models/card.py)")
    try:
        return ModelCard.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        what = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first else str(exc).splitlines()[0]
        raise InputError(f"model card {path} is invalid: {what}") from None


def write_card(model: str | Path, card: ModelCard) -> Path:
    path = card_path(model)
    path.write_text(yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path
