"""segpipe: segment very large imagery tile by tile on Dask, stitched so that tiling never changes the answer.

From Python: ``segpipe.segment(source, method, ...)`` returns an ``xarray.Dataset`` and
``segpipe.open_result(path)`` reopens one (see :mod:`segpipe.api`). The library is Prefect-free: every
stage is a plain function over store paths, usable from a plain Dask client; ``segpipe_flows`` wires
the same calls into Prefect flows.

Where each stage lives (layers, low to high; ARCHITECTURE.md has the import contract): ``errors``,
``geometry`` (the grid value), ``io.paths``, ``progress``; ``config`` (the job); ``runtime`` (clusters,
placement, units of work); ``io`` (sources, the run layout, stores, the scene handle, ground truth, exports)
and ``models`` (model formats); ``tiling`` (grids, ingest, statistics, resampling, stitching, seams);
``methods`` (classical, model inference, training); ``objects`` (instances); ``report`` (metrics, tables,
HTML, change); ``pipeline``, ``periods``, ``archive``, ``api``, ``cli`` (the stages in order and the entry
points).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["InputError", "check_job", "job_spec", "open_result", "segment", "segment_archive"]

if TYPE_CHECKING:
    from segpipe.api import check_job, job_spec, open_result, segment, segment_archive
    from segpipe.errors import InputError


def __getattr__(name: str) -> Any:
    """The API on first use: ``import segpipe`` (and the CLI's start-up) stays free of xarray and Dask."""
    if name == "InputError":
        from segpipe.errors import InputError

        return InputError
    if name in __all__:
        from segpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")
