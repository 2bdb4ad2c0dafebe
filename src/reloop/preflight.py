"""The pre-run check: can every component of every run act under this config and these period sizes?

Run before any training (``reloop run``, ``reloop data inspect``): a component that can never act is an
error naming the setting to change (e.g. a memory reset at every update and read before any of its
batch's labels arrive — ReLoop2 would silently equal IU); one that cannot act in some periods is a
warning. Pure: reads no data, trains nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from reloop.config import Config, ProtocolConfig, RunSpec
from reloop.data.periods import phase_of
from reloop.errors import ConfigError


@dataclass(frozen=True)
class Finding:
    """A component that cannot act (``error``) or cannot act in some served periods (``warning``)."""

    level: Literal["error", "warning"]
    key: str  # the dotted config key the message is about
    message: str  # what happens and the setting to change

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass(frozen=True)
class _Served:
    """The served periods of the protocol: (period, phase, rows), in order, Θ0's period first."""

    periods: list[tuple[int, str, int]]

    @classmethod
    def of(cls, cfg: Config, period_rows: Sequence[int]) -> _Served:
        p = cfg.protocol
        first = p.pretrain + 1
        out: list[tuple[int, str, int]] = []
        for period in range(first, first + p.served_periods + 1):
            rows = period_rows[period - 1] if period - 1 < len(period_rows) else 0
            out.append((period, phase_of(period, p.pretrain, p.warmup, p.valid), int(rows)))
        return cls(out)


def _batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


def _memory_findings(name: str, spec: RunSpec, cfg: Config, served: _Served) -> list[Finding]:
    where = f"runs.{name}.memory"
    mem = spec.memory  # parsed and validated with the config
    assert mem is not None
    found = []
    if mem.lam == 0.0:
        found.append(
            Finding(
                "warning",
                f"{where}.lambda",
                "0 serves the base model's prediction unchanged: the memory never changes what "
                "is served; use a value > 0 (ReLoop2: 0.3-0.9)",
            )
        )
    if mem.write == "errors" and mem.error_threshold >= 1.0:
        found.append(
            Finding(
                "error",
                f"{where}.error_threshold",
                f"{mem.error_threshold} with write: errors stores only rows with |y - ŷ| above it, "
                "and |y - ŷ| < 1 always: the memory is never written; use a value below 1",
            )
        )
    trains = spec.update.cls.trains
    if not (mem.reset_on_update and trains):
        return found  # the memory keeps what it was written across periods: it can be read from the second
    delay = cfg.protocol.feedback_delay
    batch = cfg.protocol.serve_batch_size
    # a batch is read before its labels exist; labels arrive `delay` batches later; the memory is
    # emptied before each period: a period whose batches number at most delay + 1 reads an empty memory
    blind = [(period, phase, rows) for period, phase, rows in served.periods if _batches(rows, batch) < delay + 2]
    if not blind:
        return found
    test = [x for x in served.periods if x[1] == "test"]
    blind_test = [x for x in blind if x[1] == "test"]
    smallest = min(rows for _, _, rows in blind)
    fits = (smallest - 1) // (delay + 1)
    fix = (
        f"set protocol.serve_batch_size <= {fits}" if fits >= 1 else "use fewer, larger periods"
    ) + f" or {where}.reset_on_update: false (keep the memory across updates)"
    if delay:
        fix += f", or a smaller protocol.feedback_delay (now {delay})"
    scope = (
        "any served period"
        if len(blind) == len(served.periods)
        else f"{len(blind_test)} of the {len(test)} test periods"
        if blind_test
        else f"{len(blind)} of the {len(served.periods)} served periods (no test period)"
    )
    found.append(
        Finding(
            "warning",
            where,
            f"can never act in {scope}: the memory is emptied at every update (reset_on_update: true) and "
            f"a period of {smallest} rows is served in {_batches(smallest, batch)} batch(es) of "
            f"protocol.serve_batch_size={batch}, each predicted before its labels are written"
            + (f" ({delay} batch(es) later, protocol.feedback_delay)" if delay else "")
            + f", so every read finds it empty and the run equals the same run without a memory; {fix}",
        )
    )
    return found


def _first_why(p: ProtocolConfig) -> str:
    return "k + warmup" + (", + 1 for the guard's out-of-sample check" if p.guard_periods > 0 else "")


def _generator_findings(name: str, spec: RunSpec, cfg: Config) -> list[Finding]:
    gen_name, options = spec.generator.name, spec.generator.options
    if gen_name == "identity":
        return []
    where = f"runs.{name}.generator.{gen_name}"
    # A learned generator serves Θ*_t once it has seen `min_models` updated models and learned
    # `warmup` times (it learns once per period from its min_models-th model on): from the
    # (min_models + warmup)-th update on. With `init: identity` its untrained output is Θ_t itself,
    # so it changes what is served only after learning once. With the guard's out-of-sample check
    # (protocol.guard_periods > 0) a generated model must first be scored on a period it had not seen:
    # one update later at the earliest.
    p = cfg.protocol
    min_models = getattr(options, "k", 1)
    warmup = int(getattr(options, "warmup", 0))
    first = min_models + max(warmup, 1 if getattr(options, "init", None) == "identity" else 0)
    first += 1 if p.guard_periods > 0 else 0
    knobs = "k and warmup" if hasattr(options, "k") else "warmup"
    if first > p.served_periods:
        return [
            Finding(
                "error",
                where,
                f"serves a generated model from update {first} on at the earliest ({_first_why(p)}), "
                f"but the protocol makes {p.served_periods} updates (protocol.warmup + valid + test): "
                f"it never acts; lower {where}.{knobs.replace(' and ', ' / ')} or raise protocol.warmup",
            )
        ]
    if first > p.warmup + p.valid + 1:
        missed = first - (p.warmup + p.valid + 1)
        return [
            Finding(
                "warning",
                where,
                f"serves the updated model (no generated one) in the first {missed} of the {p.test} test "
                f"periods ({first} updates needed: {_first_why(p)}); raise protocol.warmup to "
                f"{first - 1 - p.valid} or lower {where}.{knobs.replace(' and ', ' / ')}",
            )
        ]
    return []


def _loss_update_findings(name: str, spec: RunSpec) -> list[Finding]:
    found = []
    loss_name, loss = spec.loss.name, spec.loss.options
    if not spec.update.cls.trains and loss_name != "ce":
        found.append(
            Finding(
                "error",
                f"runs.{name}.loss",
                f"{loss_name} is a training loss, but update: none never trains: it never acts; "
                f"drop runs.{name}.loss or choose an update that trains",
            )
        )
    if getattr(loss, "weight", None) == 0.0:
        found.append(
            Finding(
                "warning",
                f"runs.{name}.loss.{loss_name}",
                "0 makes the loss plain cross-entropy (the run equals the same run with loss: ce)",
            )
        )
    if getattr(loss, "y_last", "served") == "compensated" and spec.memory is None:
        found.append(
            Finding(
                "warning",
                f"runs.{name}.loss.y_last",
                "compensated without a memory is the served base prediction (the same as served); "
                f"add runs.{name}.memory or drop y_last",
            )
        )
    if getattr(spec.update.options, "ratio", None) == 0.0:
        found.append(
            Finding(
                "warning",
                f"runs.{name}.update.replay.ratio",
                "0 replays no rows: the run equals update: incremental; use a ratio > 0",
            )
        )
    return found


def preflight(cfg: Config, period_rows: Sequence[int]) -> list[Finding]:
    """Every component of every run that cannot act under ``cfg`` with periods of ``period_rows`` rows
    (periods 1..count in order), each naming the setting to change. Pure: reads no data, trains nothing."""
    served = _Served.of(cfg, period_rows)
    found: list[Finding] = []
    for name, spec in cfg.runs.items():
        found += _loss_update_findings(name, spec)
        found += _generator_findings(name, spec, cfg)
        if spec.memory is not None:
            found += _memory_findings(name, spec, cfg, served)
    return found


def check_before_run(cfg: Config, period_rows: Sequence[int]) -> list[Finding]:
    """:func:`preflight`; raises ``ConfigError`` for its errors, returns its warnings (the caller shows them)."""
    found = preflight(cfg, period_rows)
    errors = [str(f) for f in found if f.level == "error"]
    if errors:
        raise ConfigError("; ".join(errors))
    return found
