"""dbf_ext: dynamic training for (rotated) object detectors.

Submodules are imported on first use, so ``import dbf_ext`` stays cheap and the pure-Python
parts (freezing schedules, data I/O) work even where the compiled module could not load.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "ops", "boxes", "freeze", "cache", "assign", "data", "evaluation", "inference", "integrations", "regularizers",
    "train",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
