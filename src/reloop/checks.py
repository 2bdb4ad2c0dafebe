"""Checks on run components: the contract each must pass, and the pre-run check that each can act.

**Pre-run check** (:func:`preflight`, called by ``reloop run`` once the periods are known, before any
training): a configuration under which a component can never change what is served would silently
report the run without it (e.g. ReLoop2 equal to IU to six decimals). Each such case is a
:class:`Finding` naming the setting to change; ``error`` findings stop the run (``ConfigError``),
``warning`` findings are printed before it starts.

**Contract** (River's ``check_estimator`` idea, for our pieces).

A *component* is one choice of a run: a base update, a loss, a model generator or an error memory.
Each is checked inside a short run of the real protocol on a small stream:

* ``check_no_mutation`` — Θ0 and the encoded data are untouched by a run;
* ``check_deterministic`` — the same seed gives the same per-period metrics;
* ``check_resume`` — killed after a period and resumed from its checkpoint, a run gives the same
  metrics as an uninterrupted one (so every piece of state round-trips);
* ``check_shapes`` — updated and served models keep the base model's parameter shapes.

New components join by adding an example of their config to ``CONTRACT_CASES``.
"""
from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from reloop.components import build_generator, build_loss, build_update
from reloop.config import Config, ConfigError, RunSpec
from reloop.data.periods import phase_of
from reloop.data.tensors import History, Stream
from reloop.protocol.runner import pretrain, run_one
from reloop.update.strategies import UpdateContext

CONTRACT_CASES: dict[str, dict[str, Any]] = {
    "update=none": {"update": "none"},
    "update=incremental": {"update": "incremental"},
    "update=batch": {"update": {"batch": 2}},
    "update=full": {"update": "full"},
    "update=full-scratch": {"update": {"full": {"start": "scratch"}}},
    "loss=self_correction": {"loss": {"self_correction": 0.5}},
    "loss=self_correction-normalized": {"loss": {"self_correction": 0.5, "scale": "normalized"}},
    "loss=distill": {"loss": {"distill": 0.3}},
    "update=replay": {"update": {"replay": {"reservoir": 0.3, "ratio": 0.5}}},
    "generator=asmg_gru": {"generator": {"asmg_gru": {"k": 2, "hidden": 4, "variant": "multi"}}},
    "generator=asmg_gru-full": {"generator": {"asmg_gru": {"k": 2, "variant": "full"}}},
    "generator=asmg_linear": {"generator": {"asmg_linear": {"k": 2}}},
    "generator=sml": {"generator": "sml"},
    "memory=sketch": {"memory": {"sketch": {"arrays": 8, "bits": 4}, "lambda": 0.5}},
    "memory=sketch-centroid-keep": {"memory": {"sketch": {"arrays": 8, "bits": 4, "similarity": "centroid"},
                                               "reset_on_update": False, "decay": 0.9}},
    "memory=exact": {"memory": {"exact": {"size": 256, "top_k": 16}, "write": "errors", "error_threshold": 0.2}},
    "combo=asmg+sc+sketch": {"loss": {"self_correction": 0.5}, "generator": {"asmg_gru": {"k": 2}},
                             "memory": {"sketch": {"arrays": 8, "bits": 4}}},
}


def register_case(name: str, spec: dict[str, Any]) -> None:
    CONTRACT_CASES[name] = spec


def _rows_equal(a: list[dict], b: list[dict], tol: float = 0.0) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        for k in ("period", "auc", "logloss"):
            u, v = x[k], y[k]
            if isinstance(u, float) and (math.isnan(u) and math.isnan(v)):
                continue
            if abs(u - v) > tol:
                return False
    return True


def check_no_mutation(cfg: Config, stream: Stream, spec: RunSpec, seed: int = 0) -> None:
    theta0, opt0 = pretrain(cfg, stream, seed)
    before = copy.deepcopy(theta0.state_dict())
    data_before = {k: v.clone() for k, v in stream.rows.data.items()}
    run_one(cfg, stream, "case", spec, seed, theta0, opt0)
    for k, v in theta0.state_dict().items():
        assert torch.equal(v, before[k]), f"the run changed Θ0's {k}"
    for k, v in stream.rows.data.items():
        assert torch.equal(v, data_before[k]), f"the run changed the data column {k}"


def check_deterministic(cfg: Config, stream: Stream, spec: RunSpec, seed: int = 0) -> None:
    theta0, opt0 = pretrain(cfg, stream, seed)
    a = run_one(cfg, stream, "case", spec, seed, theta0, opt0)
    b = run_one(cfg, stream, "case", spec, seed, theta0, opt0)
    assert _rows_equal(a, b), f"same seed, different metrics:\n{a}\n{b}"


def check_resume(cfg: Config, stream: Stream, spec: RunSpec, seed: int = 0) -> None:
    theta0, opt0 = pretrain(cfg, stream, seed)
    straight = run_one(cfg, stream, "case", spec, seed, theta0, opt0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stop = cfg.protocol.pretrain + 2
        run_one(cfg, stream, "case", spec, seed, theta0, opt0, out=out, stop_after=stop)
        resumed = run_one(cfg, stream, "case", spec, seed, theta0, opt0, out=out, resume=True)
    assert _rows_equal(straight, resumed, tol=1e-6), f"resumed run differs:\n{straight}\n{resumed}"


def check_shapes(cfg: Config, stream: Stream, spec: RunSpec, seed: int = 0) -> None:
    theta0, opt0 = pretrain(cfg, stream, seed)
    shapes = {k: v.shape for k, v in theta0.state_dict().items()}
    t = cfg.protocol.pretrain + 1
    loss = build_loss(spec.loss)
    ctx = UpdateContext(history=History(stream, upto=t), t=t, loss=loss.loss, train=cfg.train,
                        generator=torch.Generator().manual_seed(seed), fresh_model=lambda: copy.deepcopy(theta0))
    model, _ = build_update(spec.update, seed=seed).update(theta0, opt0, ctx)
    gen = build_generator(spec.generator)
    gen.observe(t, model)
    for m in (model, gen.serving_model(model)):
        got = {k: v.shape for k, v in m.state_dict().items()}
        assert got == shapes, "parameter shapes changed"


ALL_CHECKS = [check_no_mutation, check_deterministic, check_resume, check_shapes]


# --------------------------------------------------------------------------------------------------
# pre-run check: can every component of every run act?

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
    from reloop.memory.config import MemoryConfig

    where = f"runs.{name}.memory"
    assert spec.memory is not None
    mem = MemoryConfig.parse(spec.memory)  # validated with the config already
    found = []
    if mem.lam == 0.0:
        found.append(Finding("warning", f"{where}.lambda",
                             "0 serves the base model's prediction unchanged: the memory never changes what "
                             "is served; use a value > 0 (ReLoop2: 0.3-0.9)"))
    if mem.write == "errors" and mem.error_threshold >= 1.0:
        found.append(Finding("error", f"{where}.error_threshold",
                             f"{mem.error_threshold} with write: errors stores only rows with |y - ŷ| above it, "
                             "and |y - ŷ| < 1 always: the memory is never written; use a value below 1"))
    trains = build_update(spec.update).trains
    if not (mem.reset_on_update and trains):
        return found  # the memory keeps what it was written across periods: it can be read from the second
    delay = cfg.protocol.feedback_delay
    batch = cfg.protocol.serve_batch_size
    # a batch is read before its labels exist; labels arrive `delay` batches later; the memory is
    # emptied before each period: a period whose batches number at most delay + 1 reads an empty memory
    blind = [(period, phase, rows) for period, phase, rows in served.periods
             if _batches(rows, batch) < delay + 2]
    if not blind:
        return found
    test = [x for x in served.periods if x[1] == "test"]
    blind_test = [x for x in blind if x[1] == "test"]
    smallest = min(rows for _, _, rows in blind)
    fits = (smallest - 1) // (delay + 1)
    fix = (f"set protocol.serve_batch_size <= {fits}" if fits >= 1 else "use fewer, larger periods") + \
        f" or {where}.reset_on_update: false (keep the memory across updates)"
    if delay:
        fix += f", or a smaller protocol.feedback_delay (now {delay})"
    scope = ("any served period" if len(blind) == len(served.periods) else
             f"{len(blind_test)} of the {len(test)} test periods" if blind_test else
             f"{len(blind)} of the {len(served.periods)} served periods (no test period)")
    found.append(Finding(
        "warning", where,
        f"can never act in {scope}: the memory is emptied at every update (reset_on_update: true) and "
        f"a period of {smallest} rows is served in {_batches(smallest, batch)} batch(es) of "
        f"protocol.serve_batch_size={batch}, each predicted before its labels are written"
        + (f" ({delay} batch(es) later, protocol.feedback_delay)" if delay else "")
        + f", so every read finds it empty and the run equals the same run without a memory; {fix}"))
    return found


def _generator_findings(name: str, spec: RunSpec, cfg: Config) -> list[Finding]:
    from reloop.update.generators.config import parse_generator

    gen_name, options = parse_generator(spec.generator)
    if gen_name == "identity":
        return []
    where = f"runs.{name}.generator.{gen_name}"
    # A learned generator serves Θ*_t once it has seen `min_models` updated models and learned
    # `warmup` times (it learns once per period from its min_models-th model on): from the
    # (min_models + warmup)-th update on. With `init: identity` its untrained output is Θ_t itself,
    # so it changes what is served only after learning once.
    min_models = getattr(options, "k", 1)
    warmup = int(getattr(options, "warmup", 0))
    first = min_models + max(warmup, 1 if getattr(options, "init", None) == "identity" else 0)
    p = cfg.protocol
    knobs = ("k and warmup" if hasattr(options, "k") else "warmup")
    if first > p.served_periods:
        return [Finding("error", where,
                        f"serves a generated model from update {first} on (k + warmup = {first}), "
                        f"but the protocol makes {p.served_periods} updates (protocol.warmup + valid + test): "
                        f"it never acts; lower {where}.{knobs.replace(' and ', ' / ')} or raise protocol.warmup")]
    if first > p.warmup + p.valid + 1:
        missed = first - (p.warmup + p.valid + 1)
        return [Finding("warning", where,
                        f"serves the updated model (no generated one) in the first {missed} of the {p.test} test "
                        f"periods (k + warmup = {first} updates needed); raise protocol.warmup to "
                        f"{first - 1 - p.valid} or lower {where}.{knobs.replace(' and ', ' / ')}")]
    return []


def _loss_update_findings(name: str, spec: RunSpec) -> list[Finding]:
    found = []
    loss = build_loss(spec.loss)
    loss_name = spec.loss if isinstance(spec.loss, str) else next(iter(spec.loss))
    strategy = build_update(spec.update)
    if not strategy.trains and loss_name != "ce":
        found.append(Finding("error", f"runs.{name}.loss",
                             f"{loss_name} is a training loss, but update: none never trains: it never acts; "
                             f"drop runs.{name}.loss or choose an update that trains"))
    weight = getattr(loss.loss, "alpha", getattr(loss.loss, "beta", getattr(loss.loss, "weight", None)))
    if loss_name != "ce" and weight == 0.0:
        found.append(Finding("warning", f"runs.{name}.loss.{loss_name}",
                             "0 makes the loss plain cross-entropy (the run equals the same run with loss: ce)"))
    if loss.y_last == "compensated" and spec.memory is None:
        found.append(Finding("warning", f"runs.{name}.loss.y_last",
                             "compensated without a memory is the served base prediction (the same as served); "
                             f"add runs.{name}.memory or drop y_last"))
    if getattr(strategy, "ratio", None) == 0.0:
        found.append(Finding("warning", f"runs.{name}.update.replay.ratio",
                             "0 replays no rows: the run equals update: incremental; use a ratio > 0"))
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
