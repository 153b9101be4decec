"""Every method name a job may give, and the family that plans and runs it.

Why its own module: the config checks ``method.name`` against these names when a job file is read, before
any of the methods' libraries (scikit-image, torch) is imported; the families' plan and run live in
:data:`segpipe.methods.segment.FAMILIES`, and a test ties the classical names here to the classical
methods' own registry (:data:`segpipe.methods.classical.CLASSICAL`), so a name cannot exist in one and not
the other.
"""

from __future__ import annotations

MODEL_METHODS = ("model", "unet")  # "unet" is the older name of "model", kept for existing job files
CLASSICAL_NAMES = ("otsu", "adaptive", "kmeans", "fcm", "watershed", "edges", "hsv", "gabor")

# method name -> family (a key of segpipe.methods.segment.FAMILIES)
FAMILY_OF: dict[str, str] = {
    **dict.fromkeys(MODEL_METHODS, "model"),
    **dict.fromkeys(CLASSICAL_NAMES, "classical"),
    "region_growing": "region_growing",
    "split_merge": "split_merge",
}
METHODS = tuple(FAMILY_OF)
