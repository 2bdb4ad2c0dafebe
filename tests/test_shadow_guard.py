"""The guard's shadow IU chain (issue #15 item 4): a run whose base update is not incremental (BU-w,
full retraining, replay) is compared with the IU model on the latest labelled period, and the IU model
serves when the run's model is non-finite or clearly worse."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine import _raw

from reloop.config import parse_config
from reloop.data.prepare import prepare_stream
from reloop.engine import RunEngine
from reloop.protocol.runner import pretrain, run_one
from reloop.update.strategies import BatchWindow


def _setup(tmp_path, runs: dict):
    """test_engine's tiny synthetic world (same data, model, training, protocol) with these ``runs``."""
    raw = {**_raw(tmp_path), "runs": runs}
    cfg = parse_config(raw)
    stream = prepare_stream(cfg.data, cfg.protocol.pretrain).stream
    theta0, optim0 = pretrain(cfg, stream, 0)
    return cfg, stream, theta0, optim0


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shadow_is_the_iu_chain_and_leaves_the_run_alone(tmp_path):
    """Over three periods a BU-2 engine's shadow equals an IU engine's model bit for bit (plain cross-entropy
    from Θ_{t−1}^IU, its own random stream), while BU-2's own models equal those of an engine without a
    shadow (fails if the shadow uses the run's loss or RNG, starts from the run's model after the first
    step, or disturbs the run's chain)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0 = _setup(
        tmp_path, {"BU": {"update": {"batch": 2}, "loss": {"self_correction": 0.5}}, "IU": {}}
    )
    bu, steps = _beside_iu(cfg, stream, theta0, optim0, "BU", None, 3)
    assert bu.shadow_iu and len(steps) == 3


def _beside_iu(cfg, stream, theta0, optim0, run: str, served, periods: int):
    """``periods`` steps of ``run`` from Θ0, beside an engine of the same run without the shadow and
    an IU engine: each step's shadow equals IU's model bit for bit, the run's own model equals the
    unshadowed engine's, and differs from IU's. Returns the run's engine and its steps."""
    engine = RunEngine(cfg, cfg.runs[run], 0, stream.feature_map)
    plain = RunEngine(cfg, cfg.runs[run], 0, stream.feature_map)
    plain.shadow_iu = False
    iu = RunEngine(cfg, cfg.runs["IU"], 0, stream.feature_map)
    assert not iu.shadow_iu
    states = {"run": (theta0, optim0), "plain": (theta0, optim0), "iu": (theta0, optim0)}
    steps = []
    for t in range(cfg.protocol.pretrain + 1, cfg.protocol.pretrain + 1 + periods):
        a = engine.step(*states["run"], stream, t, served)
        b = plain.step(*states["plain"], stream, t, served)
        c = iu.step(*states["iu"], stream, t, None)
        assert a.shadow is not None and _same(a.shadow, c.model), f"shadow ≠ IU at t={t}"
        assert _same(a.model, b.model), f"the shadow changed {run}'s own model at t={t}"
        assert not _same(a.model, c.model)  # not IU: the comparison above means something
        states = {"run": (a.model, a.optim_state), "plain": (b.model, b.optim_state), "iu": (c.model, c.optim_state)}
        steps.append(a)
    return engine, steps


@pytest.mark.parametrize("how", ["nan", "overconfident"])
def test_a_bad_bu_model_is_replaced_by_the_shadow_iu(tmp_path, monkeypatch, how):
    """BU-w returning a model with NaN scores, or with logits ×8, is not served: Θ^IU_t is, with the reason
    (fails if the shadow comparison is skipped or ignores the margin)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0 = _setup(tmp_path, {"BU": {"update": {"batch": 2}}})
    original = BatchWindow.update

    def broken(self, model, optim_state, ctx):
        new, state = original(self, model, optim_state, ctx)
        new = copy.deepcopy(new)
        with torch.no_grad():
            if how == "nan":
                new.head.bias.fill_(float("nan"))
            else:
                new.head.weight.mul_(8.0)
                new.head.bias.mul_(8.0)
        return new, state

    monkeypatch.setattr(BatchWindow, "update", broken)
    engine = RunEngine(cfg, cfg.runs["BU"], 0, stream.feature_map)
    step = engine.step(theta0, optim0, stream, cfg.protocol.pretrain + 1, None)
    assert step.serving is step.shadow and step.guard.served == "iu"
    assert "shadow IU" in step.guard.reason
    assert ("non-finite" in step.guard.reason) == (how == "nan")
    rows = run_one(cfg, stream, "BU", cfg.runs["BU"], 0, theta0, optim0)
    assert all("shadow IU" in r["fallback"] for r in rows[1:])
    assert all(torch.isfinite(torch.tensor(r["logloss"])) for r in rows)


def test_a_healthy_bu_model_is_served(tmp_path):
    """Without a defect, BU-2's own model passes the in-sample check and serves (out-of-sample check off)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0 = _setup(tmp_path, {"BU": {"update": {"batch": 2}}})
    engine = RunEngine(cfg, cfg.runs["BU"], 0, stream.feature_map)
    engine.guard_periods = 0
    step = engine.step(theta0, optim0, stream, cfg.protocol.pretrain + 1, None)
    assert step.serving is step.model and step.guard.reason == ""


def test_the_shadow_check_is_out_of_sample_too(tmp_path):
    """The run's choice at t−1 and Θ^IU_{t−1}, scored on D_t before step t trains: the gap is kept, the run
    serves iff the mean gap is < 0, and the shadow serves until one gap exists (fails if the shadow
    comparison keeps no evidence, scores the models after training, or ignores the gap's sign)."""
    from reloop.engine import GUARD_ROWS, logloss
    from reloop.update.trainer import predict_rows

    torch.set_num_threads(1)
    cfg, stream, theta0, optim0 = _setup(tmp_path, {"BU": {"update": {"batch": 2}}})
    engine = RunEngine(cfg, cfg.runs["BU"], 0, stream.feature_map)
    engine.guard_metric = "logloss"
    t = cfg.protocol.pretrain + 1
    first = engine.step(theta0, optim0, stream, t, None)
    assert first.serving is first.shadow and "out of sample yet" in first.guard.reason
    run_choice, shadow = copy.deepcopy(first.model), copy.deepcopy(first.shadow)
    rows = stream.period(t + 1)
    rows = rows.slice(max(0, len(rows) - GUARD_ROWS), len(rows))
    batch, y = cfg.train.eval_batch_size, rows.data["label"]
    want = logloss(predict_rows(run_choice, rows, batch)[0], y) - logloss(predict_rows(shadow, rows, batch)[0], y)
    second = engine.step(first.model, first.optim_state, stream, t + 1, None)
    assert engine.shadow_gaps == pytest.approx([want], abs=1e-9) and want != pytest.approx(0.0, abs=1e-6)
    assert (second.serving is second.model) == (want < 0)
    assert (second.serving is second.shadow) == (want >= 0)
    for gaps, own in (([-0.01], True), ([0.01], False), ([], False)):
        engine.shadow_gaps = gaps
        engine.last_run_model = None  # keep the gaps as set: nothing new to score
        step = engine.step(second.model, second.optim_state, stream, t + 2, None)
        assert (step.serving is step.model) == own, gaps


def test_the_shadow_resumes_exactly(tmp_path):
    """state_dict → load_state_dict in a new engine continues the shadow chain bit for bit (fails if the
    shadow's model, optimizer or RNG is not saved)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0 = _setup(tmp_path, {"BU": {"update": {"batch": 2}}})
    t = cfg.protocol.pretrain + 1
    a = RunEngine(cfg, cfg.runs["BU"], 0, stream.feature_map)
    first = a.step(theta0, optim0, stream, t, None)
    state = copy.deepcopy(a.state_dict())
    assert state["shadow"] is not None
    b = RunEngine(cfg, cfg.runs["BU"], 0, stream.feature_map)
    b.load_state_dict(state)
    sa = a.step(first.model, first.optim_state, stream, t + 1, None)
    sb = b.step(first.model, first.optim_state, stream, t + 1, None)
    assert sa.shadow is not None and sb.shadow is not None and _same(sa.shadow, sb.shadow)


@pytest.mark.parametrize(
    ("spec", "shadowed"),
    [
        ({}, False),  # IU: it is Θ^IU
        ({"loss": {"self_correction": 0.1}}, True),  # ReLoop: the loss shapes the chain
        ({"loss": {"distill": 0.3}}, True),  # IncCTR's KD
        ({"update": {"batch": 2}}, True),
        ({"update": "none", "loss": {"self_correction": 0.1}}, False),  # nothing trains: nothing to guard
        ({"generator": {"asmg_gru": {"k": 2, "hidden": 2}}}, False),  # its own fallback is Θ_t (= IU)
    ],
)
def test_which_runs_train_the_shadow(tmp_path, spec, shadowed):
    """Every run whose models may differ from plain IU's, and has no Θ^IU of its own, trains the shadow
    (fails if SC or KD runs are left unguarded, or if an IU run pays for a second chain)."""
    cfg, stream, _, _ = _setup(tmp_path, {"R": spec})
    assert RunEngine(cfg, cfg.runs["R"], 0, stream.feature_map).shadow_iu == shadowed


def test_an_sc_run_is_guarded_by_the_shadow_and_left_alone(tmp_path):
    """ReLoop (SC): the shadow equals an IU run's model bit for bit, the run's own models equal those it
    trains without a shadow, and it serves its own model iff its out-of-sample gap against Θ^IU is < 0
    (fails if the SC run keeps no shadow, or the shadow disturbs the run's chain)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0 = _setup(tmp_path, {"SC": {"loss": {"self_correction": 0.5}}, "IU": {}})
    served = torch.full((len(stream.rows),), 0.5)  # ŷ_last for the SC loss: any served prediction
    sc, steps = _beside_iu(cfg, stream, theta0, optim0, "SC", served, 3)
    first = steps[0]  # nothing scored out of sample yet: Θ^IU serves
    assert first.serving is first.shadow and first.guard.served == "iu"
    t = cfg.protocol.pretrain + 1
    assert len(sc.shadow_gaps) == 1  # guard_periods 1: the last gap
    for gaps, own in (([-0.01], True), ([0.01], False)):
        sc.shadow_gaps, sc.last_run_model = gaps, None
        step = sc.step(steps[-1].model, steps[-1].optim_state, stream, t + 3, served)
        assert (step.serving is step.model) == own and (step.serving is step.shadow) == (not own), gaps
