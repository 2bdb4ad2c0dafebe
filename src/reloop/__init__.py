"""reloop: keep CTR models accurate while user behaviour drifts.

The public API is :data:`__all__` (defined in :mod:`reloop.api`, importable from here); every other
module is internal and may change in any release (see the API reference, "Versioning"). Names are
loaded on first use, so ``import reloop`` stays cheap for the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The public names (``from reloop import *``), the same as ``reloop.api.__all__`` plus ``__version__``
#: (kept literal for static tools; tests/test_api.py pins both).
__all__ = [
    "CompensatedModel",
    "Compensator",
    "DistillationLoss",
    "ErrorMemory",
    "ExactMemory",
    "Learner",
    "MetaGenerator",
    "Period",
    "Prediction",
    "SelfCorrectionLoss",
    "SketchMemory",
    "__version__",
    "auc",
    "error_memory",
    "logloss",
    "oracle_auc",
    "plot_periods",
    "prequential",
    "summarize",
    "synthetic_periods",
    "write_periods",
]

if TYPE_CHECKING:
    from reloop.api import (
        CompensatedModel,
        Compensator,
        DistillationLoss,
        ErrorMemory,
        ExactMemory,
        Learner,
        MetaGenerator,
        Period,
        Prediction,
        SelfCorrectionLoss,
        SketchMemory,
        auc,
        error_memory,
        logloss,
        oracle_auc,
        plot_periods,
        prequential,
        summarize,
        synthetic_periods,
        write_periods,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from reloop import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reloop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
