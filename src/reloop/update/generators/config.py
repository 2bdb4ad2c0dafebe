"""``generator:`` config value -> a :class:`ModelGenerator`, through the ``GENERATORS`` registry.

Accepted forms::

    generator: identity
    generator: sml                       # defaults
    generator: {sml: {lr: 0.001}}
    generator: {asmg_gru: {k: 3, hidden: 4, variant: multi, lr: 0.01, epochs: 1,
                           gate_bias: true, init: identity, warmup: 1}}
    generator: {asmg_linear: {k: 3, lr: 0.01}}

Each generator declares its ``Options`` beside its class; importing this module registers them all.
Unknown keys and bad values are errors naming the dotted key (``generator.asmg_gru.<key>``).
"""

from __future__ import annotations

from typing import Any

from reloop.registry import Choice, Strict
from reloop.update.generators.asmg import ASMGGRU, ASMGLinear
from reloop.update.generators.base import GENERATORS, ModelGenerator
from reloop.update.generators.sml import SML

__all__ = ["ASMGGRU", "ASMGLinear", "GENERATORS", "SML", "build_generator", "parse_generator"]


def parse_generator(value: Any, where: str = "generator") -> tuple[str, Strict]:
    """``generator:`` value (or a parsed choice) -> (name, validated options). ``None`` means identity."""
    choice: Choice[ModelGenerator] = GENERATORS.parse(value, where)
    return choice.name, choice.options


def build_generator(value: Any, run_seed: int = 0, where: str = "generator") -> ModelGenerator:
    """The generator a ``generator:`` value (or a parsed choice) describes, seeded by the run's seed
    (added to the option ``seed``: ``ModelGenerator.from_options``)."""
    return GENERATORS.build(value, where, seed=run_seed)
