"""ReLoop2's error memory (Zhu et al., KDD 2023): a fast, training-free serving adapter.

A memory of recent labelled samples estimates the base model's current error for a query and the
prediction is compensated, ``ŷ' = clip(ŷ_q + λ·ê)``. See ``base`` for the estimator, ``sketch`` and
``exact`` for the two memories, ``compensate`` for the wrapper the protocol and the service share,
``config`` for the ``memory:`` config block.
"""

from reloop.memory.base import MEMORIES, ErrorMemory, Neighbours
from reloop.memory.compensate import Compensator, compensate
from reloop.memory.config import (
    ExactConfig,
    MemoryConfig,
    SketchConfig,
    build_memory,
    make_memory,
    memory_key,
    memory_resets_on_update,
)
from reloop.memory.exact import ExactMemory
from reloop.memory.sketch import SketchMemory

__all__ = [
    "MEMORIES",
    "Compensator",
    "ErrorMemory",
    "ExactConfig",
    "ExactMemory",
    "MemoryConfig",
    "Neighbours",
    "SketchConfig",
    "SketchMemory",
    "build_memory",
    "compensate",
    "make_memory",
    "memory_key",
    "memory_resets_on_update",
]
