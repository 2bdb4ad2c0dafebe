"""Turn a run's config (``update``, ``loss``, ``generator``, ``memory``) into objects.

The one place where method names meet their classes; the protocol and the service both build runs
through here, so a config means the same thing offline and online.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from reloop.update.losses import CrossEntropy, Distill, Loss, SelfCorrection
from reloop.update.strategies import BatchWindow, FullRetrain, Incremental, NoUpdate, UpdateStrategy

if TYPE_CHECKING:
    from reloop.config import Config, RunSpec


def _one_key(value: str | dict[str, Any], where: str) -> tuple[str, Any]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and len(value) >= 1:
        first = next(iter(value))
        return first, value
    raise ValueError(f"{where}: expected a name or a one-key mapping, got {value!r}")


def build_update(value: str | dict[str, Any], where: str = "update", seed: int = 0) -> UpdateStrategy:
    """``none | incremental | full | {batch: w} | {full: {start: scratch}} | {replay: {...}}``."""
    name, mapping = _one_key(value, where)
    arg = mapping[name] if mapping else None
    if mapping and len(mapping) > 1:
        raise ValueError(f"{where}: one strategy per run, got {sorted(mapping)}")
    if name == "none":
        return NoUpdate()
    if name == "incremental":
        return Incremental()
    if name == "batch":
        if not isinstance(arg, int):
            raise ValueError(f"{where}.batch: expected the window size (an integer), got {arg!r}")
        return BatchWindow(arg)
    if name == "full":
        opts = arg or {}
        unknown = set(opts) - {"start"}
        if unknown:
            raise ValueError(f"{where}.full.{sorted(unknown)[0]}: unknown key (known: start)")
        return FullRetrain(**opts)
    if name == "replay":
        from reloop.update.replay import Replay

        opts = arg or {}
        known = {"reservoir", "ratio"}
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"{where}.replay.{sorted(unknown)[0]}: unknown key (known: {sorted(known)})")
        return Replay(**opts, seed=seed)
    raise ValueError(f"{where}: unknown update {name!r}; choose none, incremental, full, batch, replay")


@dataclass
class LossSpec:
    loss: Loss
    y_last: str = "served"


def build_loss(value: str | dict[str, Any], where: str = "loss") -> LossSpec:
    """``ce | {self_correction: α, scale: plain|normalized, y_last: served|previous_model|compensated} |
    {distill: β, temperature: T}``."""
    name, mapping = _one_key(value, where)
    opts = dict(mapping or {})
    if name == "ce":
        if len(opts) > 1 or (opts and opts.get("ce") not in (None, {})):
            raise ValueError(f"{where}.ce: takes no options")
        return LossSpec(CrossEntropy())
    if name == "self_correction":
        alpha = opts.pop("self_correction")
        scale = opts.pop("scale", "plain")
        y_last = opts.pop("y_last", "served")
        if opts:
            raise ValueError(f"{where}.{sorted(opts)[0]}: unknown key (known: self_correction, scale, y_last)")
        if y_last not in ("served", "previous_model", "compensated"):
            raise ValueError(f"{where}.y_last: expected 'served', 'previous_model' or 'compensated', "
                             f"got {y_last!r}")
        if not isinstance(alpha, (int, float)):
            raise ValueError(f"{where}.self_correction: expected α in [0, 1], got {alpha!r}")
        return LossSpec(SelfCorrection(float(alpha), scale), y_last)
    if name == "distill":
        beta = opts.pop("distill")
        temperature = opts.pop("temperature", 1.0)
        if opts:
            raise ValueError(f"{where}.{sorted(opts)[0]}: unknown key (known: distill, temperature)")
        if not isinstance(beta, (int, float)):
            raise ValueError(f"{where}.distill: expected β in [0, 1], got {beta!r}")
        return LossSpec(Distill(float(beta), float(temperature)))
    raise ValueError(f"{where}: unknown loss {name!r}; choose ce, self_correction, distill")


def build_generator(value: str | dict[str, Any], where: str = "generator", seed: int = 0):
    from reloop.update.generators.base import Identity

    if value in ("identity", None, {"identity": None}, {"identity": {}}):
        return Identity()
    from reloop.update.generators.config import build_generator as _build

    try:
        return _build(value, run_seed=seed)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def build_memory(value: dict[str, Any] | None, dim: int, seed: int, where: str = "memory",
                 device: str | torch.device = "cpu"):
    """The serving adapter (ReLoop2): ``None`` or a ``Compensator`` around an error memory on ``device``."""
    if value is None:
        return None
    from pydantic import ValidationError

    from reloop.memory.config import MemoryConfig
    from reloop.memory.config import build_memory as _build

    try:
        cfg = MemoryConfig(**value)
    except ValidationError as e:
        from reloop.config import _format_errors

        raise ValueError(_format_errors(e, prefix=f"{where}.")) from None
    return _build(cfg, dim=dim, seed=seed, device=device)


def memory_key(value: dict[str, Any] | None) -> str:
    """The representation a run's memory is keyed on (``CTRModel.forward_key``); ``hidden`` without one."""
    if not value:
        return "hidden"
    from reloop.memory.config import MemoryConfig

    return value.get("key", MemoryConfig.model_fields["key"].default)


def memory_resets_on_update(value: dict[str, Any] | None) -> bool:
    return bool(value) and bool(value.get("reset_on_update", True))


def validate_run(name: str, run: RunSpec, cfg: Config) -> None:
    """Build every choice of a run once so that config errors surface before any training."""
    from reloop.config import ConfigError

    where = f"runs.{name}"
    try:
        build_update(run.update, f"{where}.update")
        build_loss(run.loss, f"{where}.loss")
        build_generator(run.generator, f"{where}.generator")
        build_memory(run.memory, dim=4, seed=0, where=f"{where}.memory")
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
