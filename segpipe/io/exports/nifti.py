"""Export ``nifti``: a volume's class map with the source affine (the writer is :mod:`segpipe.io.nifti`)."""

from __future__ import annotations

from pathlib import Path

from segpipe.io.exports import ExportRun


def write(run: ExportRun) -> list[Path]:
    from segpipe.io.nifti import export_nifti

    return [export_nifti(run.result, run.path("segmentation.nii.gz"))]
