"""Turn a run's config (``update``, ``loss``, ``generator``, ``memory``) into objects.

The one place where method names meet their classes; the protocol and the service both build runs
through here, so a config means the same thing offline and online.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from reloop.errors import format_errors
from reloop.memory.compensate import Compensator
from reloop.memory.config import MemoryConfig
from reloop.memory.config import build_memory as _build_memory
from reloop.update.generators.base import Identity, ModelGenerator
from reloop.update.generators.config import build_generator as _build_generator
from reloop.update.losses import CrossEntropy, Distill, Loss, SelfCorrection
from reloop.update.replay import Replay
from reloop.update.strategies import BatchWindow, FullRetrain, Incremental, NoUpdate, UpdateStrategy


def one_key(value: str | dict[str, Any], where: str) -> tuple[str, Any]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and len(value) >= 1:
        first = next(iter(value))
        return first, value
    raise ValueError(f"{where}: expected a name or a one-key mapping, got {value!r}")


def _number(
    value: Any, where: str, what: str = "a number in [0, 1]", ok: Callable[[float], bool] = lambda x: 0.0 <= x <= 1.0
) -> float:
    """A config number (booleans are not numbers here), or an error naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{where}: expected {what}, got {value!r}")
    return float(value)


def _options(arg: Any, where: str, known: tuple[str, ...]) -> dict[str, Any]:
    """The option mapping of a one-key choice (null: no options); unknown keys name themselves."""
    if arg is None:
        return {}
    if not isinstance(arg, dict):
        raise ValueError(f"{where}: expected a mapping of options ({', '.join(known)}), got {arg!r}")
    unknown = sorted(set(arg) - set(known))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {sorted(known)})")
    return dict(arg)


#: Every ``update:`` name build_update knows (the contract suite must cover each).
UPDATE_NAMES: tuple[str, ...] = ("none", "incremental", "full", "batch", "replay")


def build_update(value: str | dict[str, Any], where: str = "update", seed: int = 0) -> UpdateStrategy:
    """``none | incremental | full | {batch: w} | {full: {start: scratch}} | {replay: {...}}``."""
    name, mapping = one_key(value, where)
    arg = mapping[name] if mapping else None
    if mapping and len(mapping) > 1:
        raise ValueError(f"{where}: one strategy per run, got {sorted(mapping)}")
    if name in ("none", "incremental"):
        if arg not in (None, {}):
            raise ValueError(f"{where}.{name}: takes no options, got {arg!r}")
        return NoUpdate() if name == "none" else Incremental()
    if name == "batch":
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
            raise ValueError(f"{where}.batch: expected the window size (an integer ≥ 1), got {arg!r}")
        return BatchWindow(arg)
    if name == "full":
        opts = _options(arg, f"{where}.full", ("start",))
        if opts.get("start", "previous") not in ("previous", "scratch"):
            raise ValueError(f"{where}.full.start: expected 'previous' or 'scratch', got {opts['start']!r}")
        return FullRetrain(**opts)
    if name == "replay":
        opts = _options(arg, f"{where}.replay", ("reservoir", "ratio"))
        if "reservoir" in opts:
            opts["reservoir"] = _number(
                opts["reservoir"], f"{where}.replay.reservoir", "a number in (0, 1]", lambda x: 0.0 < x <= 1.0
            )
        if "ratio" in opts:
            opts["ratio"] = _number(opts["ratio"], f"{where}.replay.ratio", "a number ≥ 0", lambda x: x >= 0.0)
        return Replay(**opts, seed=seed)
    raise ValueError(f"{where}: unknown update {name!r}; choose {', '.join(UPDATE_NAMES)}")


@dataclass
class LossSpec:
    loss: Loss
    y_last: str = "served"


#: The weight a loss named without a value takes (``loss: self_correction`` is ``{self_correction: 0.5}``):
#: the settings of the configs, the README and the paper benchmark.
DEFAULT_LOSS_WEIGHTS = {"self_correction": 0.5, "distill": 0.3}
#: Every ``loss:`` name build_loss knows (the contract suite must cover each).
LOSS_NAMES: tuple[str, ...] = ("ce", *DEFAULT_LOSS_WEIGHTS)


def build_loss(value: str | dict[str, Any], where: str = "loss") -> LossSpec:
    """``ce | self_correction | distill | {self_correction: α, scale: plain|normalized,
    y_last: served|previous_model|compensated} | {distill: β, temperature: T}``; a bare name (or a null
    weight) takes ``DEFAULT_LOSS_WEIGHTS``."""
    name, mapping = one_key(value, where)
    opts = dict(mapping or {})
    if name == "ce":
        if len(opts) > 1 or (opts and opts.get("ce") not in (None, {})):
            raise ValueError(f"{where}.ce: takes no options")
        return LossSpec(CrossEntropy())
    if name not in DEFAULT_LOSS_WEIGHTS:
        raise ValueError(f"{where}: unknown loss {name!r}; choose {', '.join(LOSS_NAMES)}")
    weight = opts.pop(name, None)
    weight = DEFAULT_LOSS_WEIGHTS[name] if weight is None else _number(weight, f"{where}.{name}")
    if name == "self_correction":
        scale = opts.pop("scale", "plain")
        y_last = opts.pop("y_last", "served")
        if opts:
            raise ValueError(f"{where}.{sorted(opts)[0]}: unknown key (known: self_correction, scale, y_last)")
        if scale not in ("plain", "normalized"):
            raise ValueError(f"{where}.scale: expected 'plain' or 'normalized', got {scale!r}")
        if y_last not in ("served", "previous_model", "compensated"):
            raise ValueError(f"{where}.y_last: expected 'served', 'previous_model' or 'compensated', got {y_last!r}")
        return LossSpec(SelfCorrection(weight, scale), y_last)
    temperature = _number(opts.pop("temperature", 1.0), f"{where}.temperature", "a number > 0", lambda x: x > 0.0)
    if opts:
        raise ValueError(f"{where}.{sorted(opts)[0]}: unknown key (known: distill, temperature)")
    return LossSpec(Distill(weight, temperature))


def build_generator(value: str | dict[str, Any] | None, where: str = "generator", seed: int = 0) -> ModelGenerator:
    """``identity | sml | {sml: {...}} | {asmg_linear: {...}} | {asmg_gru: {...}}`` seeded by the run's seed."""
    if value in ("identity", None, {"identity": None}, {"identity": {}}):
        return Identity()
    try:
        return _build_generator(value, run_seed=seed)
    except ValueError as e:  # the generator module names keys `generator.<...>`: re-root them at `where`
        msg = re.sub(r"(^|; )generator(?=[.:])", lambda m: m.group(1) + where, str(e))
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def build_memory(
    value: dict[str, Any] | None, dim: int, seed: int, where: str = "memory", device: str | torch.device = "cpu"
) -> Compensator | None:
    """The serving adapter (ReLoop2): ``None`` or a ``Compensator`` around an error memory on ``device``."""
    if value is None:
        return None
    try:
        cfg = MemoryConfig(**value)
    except ValidationError as e:
        raise ValueError(format_errors(e, prefix=f"{where}.")) from None
    return _build_memory(cfg, dim=dim, seed=seed, device=device)


def memory_key(value: dict[str, Any] | None) -> str:
    """The representation a run's memory is keyed on (``CTRModel.forward_key``); ``hidden`` without one."""
    return _memory_config(value).key if value else "hidden"


def memory_resets_on_update(value: dict[str, Any] | None) -> bool:
    return bool(value) and _memory_config(value).reset_on_update


def _memory_config(value: dict[str, Any]) -> MemoryConfig:
    """The parsed ``memory:`` block: its defaults live in ``MemoryConfig`` only."""
    return MemoryConfig.parse(value)


_PARTS = ("update", "loss", "generator", "memory")


def qualify(message: str, where: str) -> str:
    """``message`` as one dotted path under ``where``: ``loss.scale: ...`` -> ``runs.IU.loss.scale: ...``
    (also for each ``; ``-joined problem); anything else becomes ``runs.IU: ...``."""
    if message.startswith(where):
        return message
    parts = "|".join(_PARTS)
    if not re.match(rf"({parts})[.:]", message):
        return f"{where}: {message}"
    return re.sub(rf"(^|; )(?=({parts})[.:])", lambda m: f"{m.group(1)}{where}.", message)
