"""Prefect flow: train the built-in U-Net on an image and its labels (one task)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from segpipe.methods.train import TrainSpec, train_from_files


@task(name="train-unet")
def train_task(image: str, labels: str, out: str, spec: dict[str, Any], bands: list[int] | None,
               class_names: list[str]) -> dict[str, Any]:
    result = train_from_files(image, labels, out, TrainSpec(**spec), bands=bands, class_names=class_names)
    return {"parameters": result["parameters"], "final_loss": result["final_loss"], "model": out}


@flow(name="train-unet")
def train(image: str, labels: str, out: str, class_names: list[str] | None = None,
          bands: list[int] | None = None, **spec: Any) -> dict[str, Any]:
    """Train and write a weights-only checkpoint to ``out``."""
    return train_task(image, labels, out, spec, bands, class_names or ["background", "foreground"])
