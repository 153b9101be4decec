"""Files and stores in and out: the source formats' registry (:mod:`~segpipe.io.readers`: rasters, slides,
volumes, mosaics, with optional libraries as extras), the Zarr stores, their fingerprints and completion marks
(:mod:`~segpipe.io.store`, :mod:`~segpipe.io.fingerprint`, :mod:`~segpipe.io.result`), in-memory arrays as
sources (:mod:`~segpipe.io.arrays`), ground-truth vectors, and the exports (COG, probabilities, NIfTI, OME-Zarr)."""
