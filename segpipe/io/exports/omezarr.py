"""Export ``ome-zarr``: the image as an OME-Zarr 0.5 multiscale with the class map as its label image (the writer
is :mod:`segpipe.io.omezarr`; it builds the pyramid on the cluster, hence the client)."""

from __future__ import annotations

from pathlib import Path

from segpipe.io.exports import ExportRun


def write(run: ExportRun) -> list[Path]:
    from segpipe.io.omezarr import export_ome_zarr

    return [export_ome_zarr(run.scene, run.result, run.path("image.ome.zarr"), run.client, run.class_names)]
