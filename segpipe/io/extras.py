"""Optional readers: the libraries behind some formats are extras, and their absence is one clear line.

Why extras: OpenSlide (with its native library) and pydicom are needed only for whole-slide images and
DICOM series; a land-cover deployment should not carry them. Imported where a format is read, a missing
library becomes :class:`~segpipe.errors.InputError` naming the extra to install, never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from segpipe.errors import InputError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or say, in one line, which segpipe extra brings it (``pip install 'segpipe[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"{what} needs {module}, which is not installed: pip install 'segpipe[{extra}]'") from None
