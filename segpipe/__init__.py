"""segpipe: segment very large imagery tile by tile on Dask, stitched so that tiling never changes the answer.

The library is Prefect-free: every stage is a plain function over store paths, usable from a
plain Dask client. ``flows/`` wires the same stages into Prefect flows.
"""

__version__ = "0.1.0"
