"""The step engine (``reloop.engine.RunEngine``): offline and online run the same period the same way,
and the guard never serves a generated model that is non-finite or clearly worse than the update's."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

warnings.filterwarnings("ignore", message=".*httpx2.*")
from fastapi.testclient import TestClient  # noqa: E402

from reloop.config import parse_config  # noqa: E402
from reloop.data.prepare import prepare_stream  # noqa: E402
from reloop.data.sources import load_source  # noqa: E402
from reloop.engine import GUARD_ROWS, GuardDecision, RunEngine, logloss  # noqa: E402
from reloop.models.base import CTRModel  # noqa: E402
from reloop.protocol.runner import pretrain, run_one  # noqa: E402
from reloop.serve.app import create_app  # noqa: E402
from reloop.serve.registry import ModelDir, bootstrap  # noqa: E402
from reloop.serve.retrain import RetrainOptions, retrain  # noqa: E402
from reloop.update.generators.base import ModelGenerator  # noqa: E402
from reloop.update.trainer import predict_rows  # noqa: E402

ROWS = 300
RUNS = {
    "IU": {"update": "incremental"},
    "SC": {"update": "incremental", "loss": {"self_correction": 0.5}},
    "BU": {"update": {"batch": 2}},
}


def _raw(tmp_path) -> dict:
    return {
        "data": {
            "source": "synthetic",
            "synthetic": {"users": 60, "items": 40, "rows_per_period": ROWS, "periods": 8, "seed": 0},
            "periods": {"count": 8, "by": "rows"},
            "cache": str(tmp_path / "cache"),
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 64, "lr": 0.01},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0], "serve_batch_size": ROWS},
        "runs": RUNS,
    }


@pytest.mark.parametrize("run", sorted(RUNS))
def test_offline_and_online_train_the_same_period_bit_for_bit(tmp_path, run):
    """Period P+1 through ``reloop run`` (run_one) and through the service (predict, feedback, retrain)
    gives the same Θ_{P+1} and the same served model, bit for bit: one step engine, one meaning of a
    config (fails if either path builds its strategy, loss, RNG or y_last differently)."""
    torch.set_num_threads(1)
    raw = _raw(tmp_path)
    raw["protocol"]["guard_periods"] = 0  # BU's first step would serve the shadow IU model for lack of evidence
    cfg = parse_config(raw)
    P = cfg.protocol.pretrain
    spec = cfg.runs[run]

    # offline: Θ0 serves period P+1, then the engine trains on it
    stream = prepare_stream(cfg.data, P).stream
    theta0, optim0 = pretrain(cfg, stream, 0)
    out = tmp_path / "offline"
    run_one(cfg, stream, run, spec, 0, theta0, optim0, out=out, stop_after=P + 1)
    blob = torch.load(out / "checkpoints" / run / "seed0.pt", weights_only=True)
    offline = blob["model"]

    # online: the same rows as live traffic, then one retrain of the open period
    md = bootstrap(cfg, tmp_path / "md", run, log=lambda *_: None).path
    frame = load_source(cfg.data).frame.slice(P * ROWS, ROWS)
    client = TestClient(create_app(md))
    recs = frame.select(["user_id", "item_id", "item_cat", "hour"]).to_dicts()
    r = client.post("/predict", json={"records": recs})
    assert r.status_code == 200, r.text
    ids = [p["impression_id"] for p in r.json()["predictions"]]
    labels = frame["label"].to_list()
    fb = client.post("/feedback", json={"events": [{"impression_id": i, "label": y} for i, y in zip(ids, labels)]})
    assert fb.status_code == 200, fb.text
    result = retrain(md, RetrainOptions(holdout=0.0, max_auc_drop=1.0))
    assert result.outcome == "published", result
    mdir = ModelDir(md)
    online = mdir.load_base(result.version).state_dict()
    serving = mdir.load_serving(result.version).state_dict()

    assert offline.keys() == online.keys()
    for k in offline:
        assert torch.equal(offline[k], online[k]), f"{run}: {k} differs between offline and online"
        assert torch.equal(offline[k], serving[k]), f"{run}: identity generator must serve Θ_t ({k})"
    assert not torch.equal(offline["head.weight"], theta0.state_dict()["head.weight"])  # it did train


def test_the_out_of_sample_guard_decides_the_same_offline_and_online(tmp_path, monkeypatch):
    """Four periods of a run with a generator through ``reloop run`` and through the service (one retrain
    per period, a fresh engine each time): the guard's decisions, the served models and the gaps agree
    (fails if a service version forgets the gaps or Θ*_{t−1}, e.g. ``version_state`` without ``guard``)."""
    torch.set_num_threads(1)
    raw = _raw(tmp_path)
    raw["protocol"].update(warmup=2, valid=1, test=1, guard_metric="logloss")  # scaling logits keeps the AUC
    raw["runs"] = {"IU": {"update": "incremental"}}
    cfg = parse_config(raw)
    P = cfg.protocol.pretrain
    periods = range(P + 1, P + 5)
    monkeypatch.setattr("reloop.engine.build_generator", lambda *a, **k: _Scaled(0.8))

    stream = prepare_stream(cfg.data, P).stream
    theta0, optim0 = pretrain(cfg, stream, 0)
    rows = run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, optim0, stop_after=periods[-1])
    offline = {r["period"] - 1: r["fallback"] for r in rows if r["period"] - 1 in periods}
    assert any(offline.values()) and not all(offline.values()), offline  # both decisions occur

    assert _online_guard_decisions(cfg, tmp_path, "IU", periods) == offline


def _online_guard_decisions(cfg, tmp_path, run: str, periods: range) -> dict[int, str]:
    """The service's guard decision per period: bootstrap ``run``, then per period predict, label and
    retrain (a fresh app each time: the new version serves the next period)."""
    md = bootstrap(cfg, tmp_path / "md", run, log=lambda *_: None).path
    frame = load_source(cfg.data).frame
    online = {}
    for t in periods:
        client = TestClient(create_app(md))
        part = frame.slice((t - 1) * ROWS, ROWS)
        recs = part.select(["user_id", "item_id", "item_cat", "hour"]).to_dicts()
        ids = [p["impression_id"] for p in client.post("/predict", json={"records": recs}).json()["predictions"]]
        events = [{"impression_id": i, "label": y} for i, y in zip(ids, part["label"].to_list())]
        assert client.post("/feedback", json={"events": events}).status_code == 200
        client.close()
        result = retrain(md, RetrainOptions(holdout=0.0, max_auc_drop=1.0))
        assert result.outcome == "published", result
        online[t] = ModelDir(md).meta(result.version)["validation"]["guard"]
    return online


def test_the_shadow_check_of_an_sc_run_decides_the_same_offline_and_online(tmp_path):
    """A ReLoop (SC) run's shadow IU check over four periods, through ``reloop run`` and through the
    service (one retrain per period, ŷ_last from the service's log): the same decisions (fails if a
    service version forgets the shadow chain or its gaps, or the service does not train the shadow)."""
    torch.set_num_threads(1)
    raw = _raw(tmp_path)
    raw["protocol"].update(warmup=2, valid=1, test=1)
    raw["runs"] = {"ReLoop": {"update": "incremental", "loss": {"self_correction": 0.5}}}
    cfg = parse_config(raw)
    P = cfg.protocol.pretrain
    periods = range(P + 1, P + 5)
    stream = prepare_stream(cfg.data, P).stream
    theta0, optim0 = pretrain(cfg, stream, 0)
    rows = run_one(cfg, stream, "ReLoop", cfg.runs["ReLoop"], 0, theta0, optim0, stop_after=periods[-1])
    offline = {r["period"] - 1: r["fallback"] for r in rows if r["period"] - 1 in periods}
    assert "shadow IU" in offline[P + 1]  # nothing scored out of sample yet: the shadow serves

    assert _online_guard_decisions(cfg, tmp_path, "ReLoop", periods) == offline


class _Diverging(ModelGenerator):
    """A generator whose Θ* outputs NaN (SML's failure mode, made certain)."""

    name = "diverging"

    def serving_model(self, model: CTRModel) -> CTRModel:
        import copy

        out = copy.deepcopy(model)
        with torch.no_grad():
            out.head.bias.fill_(float("nan"))
        return out


class _Scaled(ModelGenerator):
    """A generator that serves Θ_t with its logits scaled by ``factor`` (over-confident when > 1)."""

    name = "scaled"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def serving_model(self, model: CTRModel) -> CTRModel:
        import copy

        out = copy.deepcopy(model)
        with torch.no_grad():
            out.head.weight.mul_(self.factor)
            out.head.bias.mul_(self.factor)
        return out


def _engine_and_stream(tmp_path, margin: float = 0.1, periods: int = 0):
    """``periods=0``: the in-sample margin alone (the out-of-sample check has its own tests below, in
    log loss unless a test sets ``engine.guard_metric``)."""
    raw = _raw(tmp_path)
    raw["protocol"]["guard_margin"] = margin
    raw["protocol"]["guard_periods"] = periods
    raw["protocol"]["guard_metric"] = "logloss"
    cfg = parse_config(raw)
    stream = prepare_stream(cfg.data, cfg.protocol.pretrain).stream
    theta0, optim0 = pretrain(cfg, stream, 0)
    engine = RunEngine(cfg, cfg.runs["IU"], 0, stream.feature_map)
    return cfg, stream, theta0, optim0, engine


def test_guard_serves_the_updated_model_when_the_generated_one_is_non_finite(tmp_path):
    """A generated model with NaN scores is never served; the reason is recorded (fails if the guard
    only compares finite losses, or is skipped)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0, engine = _engine_and_stream(tmp_path)
    engine.generator = _Diverging()
    step = engine.step(theta0, optim0, stream, cfg.protocol.pretrain + 1, None)
    assert step.serving is step.model
    assert step.guard.served == "base" and "non-finite" in step.guard.reason


def test_guard_margin_decides_between_generated_and_updated(tmp_path):
    """Over-confident logits (×8) lose far more than 10% log loss: the updated model serves; a mild
    change (×1.02) stays within the margin and is served (fails if the guard ignores the margin either way)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0, engine = _engine_and_stream(tmp_path, margin=0.1)
    t = cfg.protocol.pretrain + 1
    engine.generator = _Scaled(8.0)
    bad = engine.step(theta0, optim0, stream, t, None)
    assert bad.serving is bad.model and bad.guard.served == "base"
    assert bad.guard.loss_generated > 1.1 * bad.guard.loss_base
    engine.generator = _Scaled(1.02)
    ok = engine.step(theta0, optim0, stream, t, None)
    assert ok.serving is not ok.model and ok.guard.served == "generated"
    assert math.isfinite(ok.guard.loss_generated)


def test_out_of_sample_gap_scores_the_previous_pair_before_the_update(tmp_path):
    """g_t = L(Θ*_{t−1}; D_t) − L(Θ_{t−1}; D_t): both models from step t−1, scored on D_t before step t
    trains on it (fails if Θ_t, the freshly updated model, or Θ*_t is scored instead, or if no gap is
    kept)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0, engine = _engine_and_stream(tmp_path, periods=3)
    engine.generator = _Scaled(1.3)
    t = cfg.protocol.pretrain + 1
    first = engine.step(theta0, optim0, stream, t, None)
    assert engine.gaps == [] and first.guard.served == "base" and "out of sample yet" in first.guard.reason
    generated, base = copy.deepcopy(engine.last_generated), copy.deepcopy(first.model)
    rows = stream.period(t + 1)
    rows = rows.slice(max(0, len(rows) - GUARD_ROWS), len(rows))
    batch = cfg.train.eval_batch_size
    want = logloss(predict_rows(generated, rows, batch)[0], rows.data["label"]) - logloss(
        predict_rows(base, rows, batch)[0], rows.data["label"]
    )
    second = engine.step(first.model, first.optim_state, stream, t + 1, None, release=True)
    assert engine.gaps == pytest.approx([want], abs=1e-9)
    assert want != pytest.approx(0.0, abs=1e-6)
    assert (second.guard.served == "generated") == (want < 0)


def test_out_of_sample_gap_in_auc(tmp_path):
    """``guard_metric: auc``: g_t = AUC(Θ_{t−1}; D_t) − AUC(Θ*_{t−1}; D_t), a positive gap meaning the
    generated model ranked worse (fails if the sign is flipped or log loss is used instead)."""
    from reloop.protocol.metrics import auc

    torch.set_num_threads(1)
    cfg, stream, theta0, optim0, engine = _engine_and_stream(tmp_path, periods=3)
    engine.guard_metric = "auc"
    engine.generator = _Scaled(-1.0)  # reversed scores: AUC 1 − AUC(Θ)
    t = cfg.protocol.pretrain + 1
    first = engine.step(theta0, optim0, stream, t, None)
    generated, base = copy.deepcopy(engine.last_generated), copy.deepcopy(first.model)
    rows = stream.period(t + 1)
    rows = rows.slice(max(0, len(rows) - GUARD_ROWS), len(rows))
    y = rows.data["label"].numpy()
    batch = cfg.train.eval_batch_size
    want = auc(y, predict_rows(base, rows, batch)[0].numpy()) - auc(y, predict_rows(generated, rows, batch)[0].numpy())
    second = engine.step(first.model, first.optim_state, stream, t + 1, None)
    assert want > 0.05 and engine.gaps == pytest.approx([want], abs=1e-9)
    assert second.guard.served == "base" and "AUC fell short" in second.guard.reason


@pytest.mark.parametrize(
    ("gaps", "served"),
    [
        ([], "base"),
        ([0.01], "base"),
        ([0.0], "base"),
        ([-0.01], "generated"),
        ([0.02, -0.03, -0.01], "generated"),
        ([-0.02, 0.03, 0.01], "base"),
    ],
)
def test_out_of_sample_rule_by_hand(tmp_path, gaps, served):
    """Θ*_t serves iff gaps were measured and their mean is < 0; ``guard_periods: 0`` switches it off
    (fails if the sign, the mean or the no-evidence default is wrong)."""
    cfg, stream, theta0, optim0, engine = _engine_and_stream(tmp_path, periods=3)
    engine.gaps = list(gaps)
    assert engine.evidence(GuardDecision("generated")).served == served
    engine.guard_periods = 0
    assert engine.evidence(GuardDecision("generated")).served == "generated"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=st.lists(st.floats(-1.0, 1.0, allow_nan=False), max_size=12), window=st.integers(0, 5))
def test_out_of_sample_rule_property(tmp_path, gaps, window):
    """For any gaps and window: the candidate serves iff the check is off, or gaps exist and their mean
    is < 0 (fails if the mean is replaced by the last gap or the max, or the no-evidence default flips)."""
    engine = _PROPERTY_ENGINE.setdefault("e", _engine_and_stream(tmp_path, periods=3)[-1])
    engine.guard_periods = window
    engine.gaps = list(gaps)
    served = engine.evidence(GuardDecision("generated")).served
    if window == 0:
        assert served == "generated"
    else:
        assert served == ("generated" if gaps and sum(gaps) / len(gaps) < 0 else "base")


_PROPERTY_ENGINE: dict = {}  # one engine for every example (building one trains Θ0)


def test_out_of_sample_window_and_state_round_trip(tmp_path):
    """Only the last ``guard_periods`` gaps count; the gaps and Θ*_{t−1} survive state_dict (fails if the
    window is not trimmed or a resumed engine forgets the pair it must score next)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0, engine = _engine_and_stream(tmp_path, periods=2)
    engine.generator = _Scaled(0.9)
    model, optim = theta0, optim0
    t = cfg.protocol.pretrain + 1
    for s in range(t, t + 4):
        step = engine.step(model, optim, stream, s, None)
        model, optim = step.model, step.optim_state
    assert len(engine.gaps) == 2
    state = engine.state_dict()
    other = RunEngine(cfg, cfg.runs["IU"], 0, stream.feature_map)
    other.generator = _Scaled(0.9)
    other.load_state_dict(state)
    assert other.gaps == engine.gaps
    for a, b in zip(other.last_generated.state_dict().values(), engine.last_generated.state_dict().values()):
        assert torch.equal(a, b)
    nxt_a = engine.step(model, optim, stream, t + 4, None)
    nxt_b = other.step(copy.deepcopy(model), copy.deepcopy(optim), stream, t + 4, None)
    assert engine.gaps == other.gaps and nxt_a.guard.served == nxt_b.guard.served


def test_run_records_the_fallback_in_its_rows(tmp_path, monkeypatch):
    """run_one writes the guard's reason into each period's row (empty when Θ*_t was served)."""
    torch.set_num_threads(1)
    cfg, stream, theta0, optim0, _ = _engine_and_stream(tmp_path)
    monkeypatch.setattr("reloop.engine.build_generator", lambda *a, **k: _Diverging())
    rows = run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, optim0)
    assert len(rows) == cfg.protocol.served_periods + 1  # Θ0 serves P+1, then one row per step
    assert all("non-finite" in r["fallback"] for r in rows[1:])
    assert all(math.isfinite(r["logloss"]) for r in rows)


def test_periods_csv_records_the_fallback(tmp_path, monkeypatch):
    """The guard's reason reaches periods.csv (column ``fallback``) and reads back; old files without the
    column still read."""
    from reloop.protocol.report import read_periods, write_periods

    torch.set_num_threads(1)
    cfg, stream, theta0, optim0, _ = _engine_and_stream(tmp_path)
    monkeypatch.setattr("reloop.engine.build_generator", lambda *a, **k: _Diverging())
    rows = run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, optim0)
    write_periods(rows, tmp_path / "periods.csv")
    back = read_periods(tmp_path / "periods.csv")
    assert back[0]["fallback"] == "" and all("non-finite" in r["fallback"] for r in back[1:])
    old = tmp_path / "old.csv"
    old.write_text("run,seed,period,phase,auc,gauc,logloss,rows\nIU,0,4,warmup,0.6,nan,0.6,10\n")
    assert read_periods(old)[0]["fallback"] == ""
