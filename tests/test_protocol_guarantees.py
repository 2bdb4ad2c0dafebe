"""Protocol guarantees that a test would catch (issue #15, item 6).

Each test states in its docstring the mutation of the library it catches ("Catches: ..."). The
guarantees (METHODS.md "The protocol"):

(a) the update of period t reads periods ≤ t only (never D_{t+1}, the period it will serve);
(b) a served batch is predicted before its labels reach the error memory (never written first);
(c) the error memory is emptied when the base model changes and ``reset_on_update`` is true;
(d) ReLoop's ŷ_last is the prediction served for that row (base or compensated, as configured);
(e) the IncCTR KD teacher is Θ_{t−1}, the model the update starts from;
(f) BU-w trains on exactly D_{t−w+1} ∪ … ∪ D_t;
(g) the encoder's capacities and statistics are fitted on the pretraining periods 1..P only.

The tests drive public entry points (``run_one``, ``UpdateStrategy.update``, ``serve_period``,
``Compensator``, ``prepare_stream``) and observe them with spies: a memory subclass or a loss passed
in, or a wrapper around a public method that records its arguments and calls through. Everything
runs on tiny synthetic streams and models, on the CPU, in seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from reloop.components import build_update
from reloop.config import RunSpec, parse_config
from reloop.data.encode import FeatureEncoder
from reloop.data.periods import PeriodsConfig, period_bounds
from reloop.data.prepare import prepare_stream
from reloop.data.schema import FeatureSchema, FeatureSpec
from reloop.data.sources import load_source
from reloop.data.tensors import History, LookAheadError, PeriodTensors, Stream
from reloop.memory.base import ErrorMemory
from reloop.memory.compensate import Compensator
from reloop.memory.exact import ExactMemory
from reloop.models.base import CTRModel
from reloop.protocol.runner import fresh_model, pretrain, run_one
from reloop.protocol.serving import serve_period
from reloop.update.losses import CrossEntropy, Distill, SelfCorrection
from reloop.update.strategies import UpdateContext, UpdateStrategy
from reloop.update.trainer import TrainConfig

torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest (and CI shares cores)

P = 3  # pretraining periods of tiny_config / the conftest stream (8 periods; serves 4..8)
EXACT = {"exact": {"size": 512, "top_k": 32}, "key": "hidden"}


# ------------------------------------------------------------------------------------------- helpers


def period_of(stream: Stream, rows: torch.Tensor) -> torch.Tensor:
    """The 1-based period of each global row id."""
    ends = torch.tensor([end for _, end in stream.bounds])
    return torch.bucketize(rows.cpu(), ends, right=True) + 1


def rows_of_periods(stream: Stream, first: int, last: int) -> torch.Tensor:
    return stream.periods(max(first, 1), last).data["row"].cpu()


class RowSpy(CrossEntropy):
    """A CE loss passed in through ``UpdateContext.loss`` that records the global rows it trains on."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.rows.append(batch["row"].detach().cpu().clone())
        return super().__call__(logits, batch)

    def trained(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0, dtype=torch.long)


class PermissiveHistory(History):
    """Data up to ``upto`` = the last period, so a strategy that looks ahead is not stopped by
    ``LookAheadError`` but recorded: the test then sees what it trained on."""

    def __init__(self, stream: Stream) -> None:
        super().__init__(stream, upto=stream.n_periods)


def context(
    stream: Stream, t: int, loss, train: TrainConfig, model: CTRModel | None = None, history: History | None = None
) -> UpdateContext:
    return UpdateContext(
        history=history if history is not None else History(stream, upto=t),
        t=t,
        loss=loss,
        train=train,
        generator=torch.Generator().manual_seed(0),
        fresh_model=lambda: fresh_model(tiny_config(), stream, 1),
    )


@contextmanager
def updates_recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Wrap ``UpdateStrategy.update`` (every strategy but replay inherits it): record t, a copy of
    the model it starts from (Θ_{t−1}) and of the model it returns (Θ_t); ``current`` holds the t
    of the update in progress, so loss spies can file what they see under it. The guard's shadow IU
    chain (``ctx.extras["shadow"]``, runs whose update is not incremental) is not the run's update
    and is not recorded."""
    log: list[dict[str, Any]] = []
    original = UpdateStrategy.update

    def update(self, model, optim_state, ctx):
        if ctx.extras.get("shadow"):
            return original(self, model, optim_state, ctx)
        entry = {"t": ctx.t, "upto": ctx.history.upto, "before": copy.deepcopy(model).cpu()}
        log.append(entry)
        new, state = original(self, model, optim_state, ctx)
        entry["after"] = copy.deepcopy(new).cpu()
        return new, state

    monkeypatch.setattr(UpdateStrategy, "update", update)
    yield log


def current_t(log: list[dict[str, Any]]) -> int | None:
    return log[-1]["t"] if log and "after" not in log[-1] else None


@contextmanager
def serving_recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, dict[str, float]]]:
    """What was served for each global row: ``{row: {"base": p, "final": p'}}``.

    ``CTRModel.forward_key`` (the serving path's model call) gives the rows and the base probability
    σ(logit); ``Compensator.predict_with_support`` (called right after it for the same batch when a
    memory is configured) gives the compensated one.
    """
    served: dict[int, dict[str, float]] = {}
    pending: list[list[int]] = []
    fk, pws = CTRModel.forward_key, Compensator.predict_with_support

    def forward_key(self, batch, key="hidden"):
        logits, h = fk(self, batch, key)
        rows = batch["row"].tolist()
        for r, p in zip(rows, torch.sigmoid(logits.detach().float()).cpu()):
            served[r] = {"base": p, "final": p}
        pending.append(rows)
        return logits, h

    def predict_with_support(self, h, y_hat):
        out = pws(self, h, y_hat)
        rows = pending.pop(0)
        for r, p in zip(rows, out[0].detach().cpu()):
            served[r]["final"] = p
        return out

    monkeypatch.setattr(CTRModel, "forward_key", forward_key)
    monkeypatch.setattr(Compensator, "predict_with_support", predict_with_support)
    yield served


def run(cfg, stream: Stream, spec: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    theta0, optim0 = pretrain(cfg, stream, seed, device="cpu")
    return run_one(cfg, stream, "case", RunSpec(**spec), seed, theta0, optim0, device="cpu")


# ------------------------------------------------------------------------ (a) no look-ahead in updates

STRATEGIES = [
    "incremental",
    {"batch": 2},
    {"batch": 9},
    "full",
    {"full": {"start": "scratch"}},
    {"replay": {"reservoir": 0.5, "ratio": 0.5}},
]


@pytest.mark.parametrize("update", STRATEGIES, ids=str)
def test_update_trains_only_on_periods_up_to_t(update, stream):
    """(a) Catches: a strategy reads period t+1 (e.g. ``Incremental.training_rows`` returns
    ``ctx.history.period(ctx.t + 1)``).

    The history handed over holds every period, so reading ahead is not stopped by ``LookAheadError``:
    the rows the loss sees must still all come from periods ≤ t (IU: exactly period t).
    """
    cfg = tiny_config()
    strategy = build_update(update, seed=0)
    model = fresh_model(cfg, stream, 0)
    state = None
    for t in (P + 1, P + 2):  # twice: replay's second update samples its reservoir
        spy = RowSpy()
        model, state = strategy.update(
            model, state, context(stream, t, spy, cfg.train, history=PermissiveHistory(stream))
        )
        periods = period_of(stream, spy.trained())
        assert len(periods) and int(periods.max()) <= t, f"{update}: trained on period {int(periods.max())} at t={t}"
        if update == "incremental":
            assert set(periods.tolist()) == {t}


def test_history_refuses_the_future(stream):
    """(a) Catches: ``History`` lets period t+1 through (e.g. ``if i > self.upto + 1``)."""
    h = History(stream, upto=P + 1)
    assert len(h.period(P + 1)) and len(h.periods(1, P + 1))
    with pytest.raises(LookAheadError):
        h.period(P + 2)
    with pytest.raises(LookAheadError):
        h.periods(P + 1, P + 2)


def shifting_stream(items: int = 60, per_period: int = 800, periods: int = 8, seed: int = 0) -> Stream:
    """Labels a deterministic function of (item, period), redrawn independently every period.

    A model trained on periods ≤ t knows nothing about period t+1 (served AUC ≈ 0.5); one that has
    seen D_{t+1} scores it well (AUC ≈ 0.9 and more; measured 0.89–1.0 over seeds 0–5).
    """
    rng = np.random.default_rng(seed)
    n = per_period * periods
    item = rng.integers(0, items, n)
    label = rng.integers(0, 2, (periods, items))[np.arange(n) // per_period, item]
    frame = pl.DataFrame(
        {"label": label.astype(np.int8), "time": np.arange(n, dtype=np.int64), "item_id": [f"i{i}" for i in item]}
    )
    bounds = period_bounds(frame["time"].to_numpy(), PeriodsConfig(count=periods))
    enc = FeatureEncoder(FeatureSchema(features=[FeatureSpec(name="item_id")]))
    enc.fit_capacities(frame.slice(0, bounds[P - 1][1]))
    cols = enc.transform(frame)
    cols["row"] = torch.arange(n)
    return Stream(enc.feature_map(), PeriodTensors(cols), bounds)


def test_served_period_is_unknown_to_the_model_serving_it():
    """(a) Catches: the run's update reads period t+1, the period the updated model then serves
    (e.g. the step engine builds period t's context for t + 1: ``self.context(stream, t + 1, ...)``).

    Mechanism-free: on a stream whose item→label map is redrawn each period, a model that never saw
    the period it serves scores at chance; one trained on it scores far above (see ``shifting_stream``).
    """
    cfg = parse_config(
        {
            "data": {"source": "synthetic", "periods": {"count": 8}},
            "model": {"name": "emb_mlp", "embedding_dim": 8, "hidden_units": [8]},
            "train": {"epochs": 3, "pretrain_epochs": 2, "batch_size": 64, "lr": 0.1},
            "protocol": {"pretrain": P, "warmup": 1, "valid": 1, "test": 2, "seeds": [0], "serve_batch_size": 256},
            "runs": {"IU": {"update": "incremental"}},
        }
    )
    rows = run(cfg, shifting_stream(), {"update": "incremental"})
    after_update = [r["auc"] for r in rows if r["period"] >= P + 2]
    assert len(after_update) == 4
    assert float(np.mean(after_update)) < 0.7, f"served AUCs {after_update}: the update saw the served period"


# --------------------------------------------------------------- (b) predict a batch, then learn from it


class OrderMemory(ExactMemory):
    """An exact memory that logs ``("estimate" | "write", h)`` in call order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, torch.Tensor]] = []

    def estimate(self, h, y_hat_q):
        self.calls.append(("estimate", h.detach().clone()))
        return super().estimate(h, y_hat_q)

    def write(self, h, y, y_hat):
        self.calls.append(("write", h.detach().clone()))
        super().write(h, y, y_hat)


def check_predicted_before_written(calls: list[tuple[str, torch.Tensor]]) -> None:
    """Every written batch was estimated by an earlier call; no estimate sees a batch already written."""
    estimated: list[torch.Tensor] = []
    written: list[torch.Tensor] = []
    for kind, h in calls:
        if kind == "estimate":
            assert not any(w.shape == h.shape and torch.equal(w, h) for w in written), (
                "a batch was written to the memory before it was predicted"
            )
            estimated.append(h)
        else:
            assert any(e.shape == h.shape and torch.equal(e, h) for e in estimated), (
                "a batch was written to the memory before it was predicted"
            )
            written.append(h)
    assert estimated and written


@pytest.fixture(scope="module")
def serving_model(stream):
    return fresh_model(tiny_config(), stream, 0).eval()


@settings(max_examples=20, deadline=None)
@given(batch_size=st.sampled_from([16, 50, 64, 128]), delay=st.integers(0, 3), data=st.data())
def test_a_batch_is_predicted_before_its_labels_reach_the_memory(stream, serving_model, batch_size, delay, data):
    """(b) Catches: ``serve_period`` writes a batch to the memory before predicting it (the feedback
    block moved above ``compensator.predict``), or delivers labels sooner than ``feedback_delay``.

    Flipping the labels of batch k must leave the served predictions of batches ≤ k + delay bit for
    bit unchanged; with a memory that attends to every stored row, every later batch does change (so
    the test can tell). The memory's call log must show each batch estimated before it is written.
    """
    rows = stream.period(P + 1)
    n_batches = -(-len(rows) // batch_size)
    k = data.draw(st.integers(0, n_batches - 1), label="flipped batch")
    dim = serving_model.key_dim("hidden")

    def serve(labels: torch.Tensor) -> tuple[torch.Tensor, OrderMemory]:
        memory = OrderMemory(dim, size=1024, top_k=1024)
        comp = Compensator(memory, lam=1.0, key="hidden")
        out = serve_period(serving_model, rows.with_columns(label=labels), comp, batch_size, delay)
        return out.final, memory

    labels = rows.data["label"]
    flipped = labels.clone()
    flipped[k * batch_size : (k + 1) * batch_size] = 1.0 - flipped[k * batch_size : (k + 1) * batch_size]
    a, memory = serve(labels)
    b, _ = serve(flipped)
    safe = min(len(rows), (k + delay + 1) * batch_size)  # rows served before batch k's labels may arrive
    assert torch.equal(a[:safe], b[:safe]), "a batch's labels reached the memory before it was served"
    if safe < len(rows):
        assert not torch.equal(a[safe:], b[safe:]), "the memory never used batch k's labels"
    check_predicted_before_written(memory.calls)


def test_run_predicts_every_batch_before_writing_it(stream, monkeypatch):
    """(b) Catches: the run writes a served batch to its memory before predicting it (in
    ``serve_period`` or whatever serves the periods of ``run_one``).

    The memory of the run is built inside ``run_one``, so ``ErrorMemory.estimate``/``write`` are
    wrapped to log their calls in order, then checked as in the test above.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    est, wr = ErrorMemory.estimate, ErrorMemory.write

    def estimate(self, h, y_hat_q):
        calls.append(("estimate", h.detach().clone()))
        return est(self, h, y_hat_q)

    def write(self, h, y, y_hat):
        calls.append(("write", h.detach().clone()))
        return wr(self, h, y, y_hat)

    monkeypatch.setattr(ErrorMemory, "estimate", estimate)
    monkeypatch.setattr(ErrorMemory, "write", write)
    run(tiny_config(), stream, {"update": "incremental", "memory": EXACT})
    check_predicted_before_written(calls)
    n_served = sum(end - start for start, end in stream.bounds[P:])
    assert sum(h.shape[0] for kind, h in calls if kind == "estimate") == n_served


# ------------------------------------------------------------------------ (c) reset on a model update


def memory_fill_at_period_starts(
    stream: Stream, monkeypatch: pytest.MonkeyPatch, memory: dict[str, Any]
) -> dict[int, int]:
    """Run IU with ``memory`` and return ``{served period: n_written when its first batch is estimated}``."""
    seen: list[tuple[int, int]] = []  # (rows in the call, n_written before it)
    est = ErrorMemory.estimate

    def estimate(self, h, y_hat_q):
        seen.append((h.shape[0], self.n_written))
        return est(self, h, y_hat_q)

    monkeypatch.setattr(ErrorMemory, "estimate", estimate)
    run(tiny_config(), stream, {"update": "incremental", "memory": memory})
    starts, offset = {}, 0
    firsts = {
        sum(end - start for start, end in stream.bounds[P : p - 1]): p for p in range(P + 1, stream.n_periods + 1)
    }
    for rows, n_written in seen:
        if offset in firsts:
            starts[firsts[offset]] = n_written
        offset += rows
    assert sorted(starts) == list(range(P + 1, stream.n_periods + 1)), "not every served period was estimated"
    return starts


def test_memory_is_empty_when_an_updated_model_starts_serving(stream, monkeypatch):
    """(c) Catches: the run does not reset the memory after an update although ``reset_on_update`` is
    true (the reset dropped from ``run_one``/the step engine, or ``memory_resets_on_update`` ignoring it).

    Every served period starts with an empty memory; with ``reset_on_update: false`` the same run
    starts periods with a filled one (the test can tell the two apart).
    """
    reset = memory_fill_at_period_starts(stream, monkeypatch, {**EXACT, "reset_on_update": True})
    assert all(n == 0 for n in reset.values()), f"memory not emptied after the update: {reset}"
    monkeypatch.undo()
    kept = memory_fill_at_period_starts(stream, monkeypatch, {**EXACT, "reset_on_update": False})
    assert all(n > 0 for p, n in kept.items() if p > P + 1), f"reset_on_update: false emptied the memory: {kept}"


@pytest.mark.parametrize("reset_on_update", [True, False])
def test_compensator_on_model_update_follows_reset_on_update(reset_on_update):
    """(c) Catches: ``Compensator.on_model_update`` ignores ``reset_on_update`` (never resets, or
    always does): the service and the step engine rely on it."""
    comp = Compensator(ExactMemory(4, size=16, top_k=4), lam=0.5, reset_on_update=reset_on_update)
    comp.feedback(torch.randn(8, 4), torch.ones(8), torch.full((8,), 0.3))
    comp.on_model_update()
    assert comp.memory.n_written == (0 if reset_on_update else 8)
    _, support = comp.memory.estimate(torch.randn(3, 4), torch.full((3,), 0.3))
    assert bool((support == 0).all()) == reset_on_update


# ---------------------------------------------------------------------- (d) ŷ_last is what was served


@pytest.mark.parametrize(
    "spec, column",
    [
        ({"loss": {"self_correction": 0.5}}, "final"),
        ({"loss": {"self_correction": 0.5, "y_last": "compensated"}, "memory": {**EXACT, "lambda": 0.8}}, "final"),
        ({"loss": {"self_correction": 0.5, "y_last": "served"}, "memory": {**EXACT, "lambda": 0.8}}, "base"),
    ],
    ids=["no-memory", "compensated", "served-base"],
)
def test_self_correction_y_last_is_the_served_prediction(spec, column, stream, monkeypatch):
    """(d) Catches: ReLoop's ŷ_last is not the prediction served for the row (e.g. recomputed by
    Θ_{t−1} instead of read from what was served, or the base prediction used where ``y_last:
    compensated`` asks for the compensated one, or rows misaligned).

    Every row the self-correction loss trains on carries, bit for bit, the probability served for
    it: the compensated one for ``y_last: compensated``, the serving model's own for ``served``.
    """
    seen_rows, seen_y_last = [], []
    sc = SelfCorrection.__call__

    def spy(self, logits, batch):
        seen_rows.append(batch["row"].detach().cpu())
        seen_y_last.append(batch["y_last"].detach().cpu())
        return sc(self, logits, batch)

    monkeypatch.setattr(SelfCorrection, "__call__", spy)
    with serving_recorded(monkeypatch) as served:
        run(tiny_config(), stream, {"update": "incremental", **spec})
    rows, y_last = torch.cat(seen_rows), torch.cat(seen_y_last)
    assert len(rows) == sum(end - start for start, end in stream.bounds[P:-1])  # periods P+1..7, once each
    expected = torch.stack([served[r][column] for r in rows.tolist()])
    assert torch.equal(y_last.to(expected.dtype), expected), (
        f"ŷ_last differs from the served prediction on {int((y_last != expected).sum())} rows"
    )
    if "memory" in spec:  # compensated and base differ: the test tells which one was used
        other = torch.stack([served[r]["base" if column == "final" else "final"] for r in rows.tolist()])
        assert not torch.equal(expected, other)


# -------------------------------------------------------------------------- (e) the KD teacher is Θ_{t−1}


@pytest.mark.parametrize("update", ["incremental", {"batch": 2}, {"full": {"start": "scratch"}}], ids=str)
def test_distillation_teacher_is_the_previous_model(update, stream, monkeypatch):
    """(e) Catches: the KD teacher is not Θ_{t−1} (e.g. the loss columns attached from the model being
    trained — a fresh one for ``full: scratch`` — or from Θ0, or from an untrained model), or the run
    does not start update t from Θ_{t−1}.

    The update of period t must start from the model the update of t−1 returned (Θ0 first), and the
    teacher logit of each trained row must be that model's logit for the row.
    """
    teachers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dist = Distill.__call__
    cfg = tiny_config()
    theta0, optim0 = pretrain(cfg, stream, 0, device="cpu")
    with updates_recorded(monkeypatch) as log:

        def spy(self, logits, batch):
            teachers.setdefault(current_t(log), []).append(
                (batch["row"].detach().cpu(), batch["teacher"].detach().cpu())
            )
            return dist(self, logits, batch)

        monkeypatch.setattr(Distill, "__call__", spy)
        run_one(cfg, stream, "case", RunSpec(update=update, loss={"distill": 0.3}), 0, theta0, optim0, device="cpu")
    assert [e["t"] for e in log] == list(range(P + 1, stream.n_periods))
    previous = theta0
    for entry in log:
        t, before = entry["t"], entry["before"]
        assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), previous.state_dict().values())), (
            f"update {t} did not start from Θ_{t - 1}"
        )
        rows = torch.cat([r for r, _ in teachers[t]])
        teacher = torch.cat([z for _, z in teachers[t]])
        with torch.no_grad():
            expected = before.eval()(stream.rows.take(rows).data)
        assert torch.allclose(teacher, expected, atol=1e-5), f"teacher at t={t} is not Θ_{t - 1}"
        if t > P + 1:  # Θ_{t−1} differs from Θ0 by now: a Θ0 teacher would be caught
            with torch.no_grad():
                assert not torch.allclose(teacher, theta0.eval()(stream.rows.take(rows).data), atol=1e-5)
        previous = entry["after"]


# --------------------------------------------------------------------------- (f) BU-w's window of periods


@settings(max_examples=15, deadline=None)
@given(window=st.integers(1, 5), t=st.integers(P + 1, 8), epochs=st.integers(1, 2))
def test_batch_window_trains_on_exactly_the_last_w_periods(stream, window, t, epochs):
    """(f) Catches: BU-w trains on other periods than t−w+1..t (e.g. ``ctx.t - self.window`` as the
    first period, or the window ending at t−1).

    The loss sees every row of D_{max(1, t−w+1)} … D_t exactly ``epochs`` times, and no other row.
    """
    cfg = tiny_config()
    train = cfg.train.model_copy(update={"epochs": epochs})
    spy = RowSpy()
    build_update({"batch": window}).update(
        fresh_model(cfg, stream, 0), None, context(stream, t, spy, train, history=PermissiveHistory(stream))
    )
    got = torch.sort(spy.trained()).values
    expected = torch.sort(rows_of_periods(stream, t - window + 1, t).repeat(epochs)).values
    assert torch.equal(got, expected), (
        f"BU-{window} at t={t} trained on periods {sorted(set(period_of(stream, got).tolist()))}"
    )


# ------------------------------------------------------- (g) encoder fitted on the pretraining periods only


def test_encoder_is_fitted_on_the_pretraining_periods_only(tmp_path):
    """(g) Catches: the encoder's capacities (or numeric statistics) are fitted on more than the
    pretraining periods (e.g. ``enc.fit_capacities(frame)`` or ``bounds[pretrain][1]`` in
    ``prepare_stream``).

    Every period brings new items and shifts prices, so fitting on even one period more changes the
    feature map; the prepared stream must equal an encoder fitted on periods 1..P by hand.
    """
    periods, per, pretrain_p = 6, 100, 2
    rng = np.random.default_rng(0)
    p = np.repeat(np.arange(periods), per)
    frame = pl.DataFrame(
        {
            "time": np.arange(periods * per) * 60,
            "label": rng.integers(0, 2, periods * per),
            "item_id": [f"i{k}_{j}" for k, j in zip(p, rng.integers(0, 30, periods * per))],
            "price": rng.normal(10.0 + 50.0 * p, 1.0),
        }
    )
    frame.write_csv(tmp_path / "log.csv")
    data = {
        "source": "csv",
        "path": str(tmp_path / "log.csv"),
        "features": {"item_id": "categorical", "price": "numeric"},
        "periods": {"count": periods},
    }
    prepared = prepare_stream(data, pretrain_p, cache_dir=tmp_path / "cache", use_cache=False)

    log = load_source(data)
    bounds = period_bounds(log.frame["time"].to_numpy(), PeriodsConfig(count=periods))

    def fitted(last: int) -> FeatureEncoder:
        enc = FeatureEncoder(log.schema)
        enc.fit_capacities(log.frame.slice(0, bounds[last - 1][1]))
        return enc

    ref, more = fitted(pretrain_p), fitted(pretrain_p + 1)
    assert ref.feature_map() != more.feature_map() and ref.numeric_stats != more.numeric_stats  # can tell
    assert prepared.stream.feature_map == ref.feature_map()
    assert prepared.encoder.numeric_stats == ref.numeric_stats
    assert {t: v.capacity for t, v in prepared.encoder.vocabs.items()} == {t: v.capacity for t, v in ref.vocabs.items()}
