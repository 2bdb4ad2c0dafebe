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
from pathlib import Path
from typing import Any

import torch

from reloop.components import build_generator, build_loss, build_update
from reloop.config import Config, RunSpec
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
    "memory=sketch-centroid-keep": {
        "memory": {"sketch": {"arrays": 8, "bits": 4, "similarity": "centroid"}, "reset_on_update": False, "decay": 0.9}
    },
    "memory=auto": {"memory": {"exact": {"size": 256, "top_k": 16}, "lambda": "auto", "reset_on_update": False}},
    "memory=exact": {"memory": {"exact": {"size": 256, "top_k": 16}, "write": "errors", "error_threshold": 0.2}},
    "combo=asmg+sc+sketch": {
        "loss": {"self_correction": 0.5},
        "generator": {"asmg_gru": {"k": 2}},
        "memory": {"sketch": {"arrays": 8, "bits": 4}},
    },
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
    ctx = UpdateContext(
        history=History(stream, upto=t),
        t=t,
        loss=loss.loss,
        train=cfg.train,
        generator=torch.Generator().manual_seed(seed),
        fresh_model=lambda: copy.deepcopy(theta0),
    )
    model, _ = build_update(spec.update, seed=seed).update(theta0, opt0, ctx)
    gen = build_generator(spec.generator)
    gen.observe(t, model)
    for m in (model, gen.serving_model(model)):
        got = {k: v.shape for k, v in m.state_dict().items()}
        assert got == shapes, "parameter shapes changed"


ALL_CHECKS = [check_no_mutation, check_deterministic, check_resume, check_shapes]
