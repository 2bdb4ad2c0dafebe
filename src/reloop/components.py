"""Turn a run's choices (``update``, ``loss``, ``generator``, ``memory``) into objects.

Every kind has one registry (:class:`reloop.registry.Registry`) beside its base class: ``UPDATES``
(``reloop.update.strategies``), ``LOSSES`` (``reloop.update.losses``), ``GENERATORS``
(``reloop.update.generators.base``), ``MEMORIES`` (``reloop.memory.base``) and ``MODELS``
(``reloop.models.base``). Importing this module registers every built-in component. The protocol and
the service both build a run through these functions, from the typed choices of ``RunSpec`` (parsed and
validated once, with the config) or from YAML values (parsed here), so a config means the same thing
offline and online.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reloop.memory.base import MEMORIES
from reloop.memory.config import MemoryConfig, build_memory, memory_key, memory_resets_on_update
from reloop.registry import Choice, Registry
from reloop.update.generators.base import GENERATORS
from reloop.update.generators.config import build_generator
from reloop.update.losses import LOSSES, Loss, YLast
from reloop.update.replay import Replay
from reloop.update.strategies import UPDATES, UpdateStrategy

__all__ = [
    "GENERATORS",
    "LOSSES",
    "MEMORIES",
    "UPDATES",
    "LossSpec",
    "MemoryConfig",
    "Replay",
    "build_generator",
    "build_loss",
    "build_memory",
    "build_update",
    "memory_key",
    "memory_resets_on_update",
    "registries",
]


def registries() -> dict[str, Registry[Any]]:
    """Every run-component registry by its config slot (``update``, ``loss``, ``generator``, ``memory``)."""
    return {"update": UPDATES, "loss": LOSSES, "generator": GENERATORS, "memory": MEMORIES}


def build_update(value: Choice[UpdateStrategy] | Any, where: str = "update", seed: int = 0) -> UpdateStrategy:
    """``none | incremental | {batch: w} | full | {full: {start: scratch}} | {replay: {...}}`` (``UPDATES``);
    ``seed``: the run's, for strategies that draw (replay)."""
    return UPDATES.build(value, where, seed=seed)


@dataclass
class LossSpec:
    """A run's loss and where its ``y_last`` column comes from (``SelfCorrection.Options.y_last``)."""

    loss: Loss
    y_last: YLast = "served"


def build_loss(value: Choice[Loss] | Any, where: str = "loss") -> LossSpec:
    """``ce | self_correction | distill | {self_correction: α, scale: plain|normalized,
    y_last: served|previous_model|compensated} | {distill: β, temperature: T}`` (``LOSSES``); a bare name
    (or a null weight) takes the weight's default (0.5 and 0.3)."""
    choice = LOSSES.parse(value, where)
    return LossSpec(choice.build(), getattr(choice.options, "y_last", "served"))
