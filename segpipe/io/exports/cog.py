"""Export ``cog``: the class map as a Cloud-Optimized GeoTIFF, and the probabilities as a second one when the job
keeps them (the writers are :mod:`segpipe.io.cog` and :mod:`segpipe.io.probabilities`)."""

from __future__ import annotations

from pathlib import Path

from segpipe.io.exports import ExportRun


def write(run: ExportRun) -> list[Path]:
    from segpipe.io.cog import export_cog

    out = [export_cog(run.result, run.path("segmentation.tif"))]
    if run.probabilities:
        from segpipe.io.probabilities import export_probabilities

        out.append(export_probabilities(run.result, run.path("probabilities.tif")))
    return out
