"""The synthetic drifting click stream: determinism, truth, learnability, drift, item life cycles."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from reloop.data.sources import load_source
from reloop.data.sources.synthetic import SyntheticConfig, SyntheticWorld, generate

CFG = SyntheticConfig()
R = CFG.rows_per_period


@pytest.fixture(scope="module")
def log():
    return generate(CFG)


@pytest.fixture(scope="module")
def period(log) -> np.ndarray:
    return np.arange(log.frame.height) // R


def test_default_stream_shape_types_and_speed(log) -> None:
    t0 = time.perf_counter()
    again = load_source({"source": "synthetic"})
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"generating the default stream took {elapsed:.2f}s"
    f = log.frame
    assert f.height == 31 * 4000
    assert f.schema == pl.Schema(
        {
            "label": pl.Int8,
            "time": pl.Int64,
            "user_id": pl.String,
            "item_id": pl.String,
            "item_cat": pl.String,
            "hour": pl.String,
            "p_true": pl.Float64,
        }
    )
    assert log.truth == "p_true" and again.truth == "p_true"
    assert [s.name for s in log.schema.features] == ["user_id", "item_id", "item_cat", "hour"]
    assert "p_true" not in [s.name for s in log.schema.features] and log.schema.user == "user_id"
    assert f["time"].is_sorted() and f["time"].n_unique() > f.height * 0.9
    # periods are windows of period_seconds; hour agrees with the timestamp
    t = f["time"].to_numpy()
    per = (t - CFG.start) // CFG.period_seconds
    assert np.array_equal(per, np.arange(f.height) // R)
    assert np.array_equal(f["hour"].cast(pl.Int64).to_numpy(), (t % 86400) // 3600)
    p = f["p_true"].to_numpy()
    assert np.all((p > 0) & (p < 1))
    assert 0.2 < f["label"].mean() < 0.6
    assert abs(f["label"].mean() - p.mean()) < 0.01  # labels drawn from p_true


def test_deterministic_under_seed() -> None:
    small = SyntheticConfig(users=100, items=80, rows_per_period=300, periods=5, seed=11)
    a, b = generate(small), generate(small)
    assert a.frame.equals(b.frame)
    c = generate(small.model_copy(update={"seed": 12}))
    assert not a.frame.equals(c.frame)
    # the world does not depend on the traffic volume
    w1 = SyntheticWorld(small)
    w2 = SyntheticWorld(small.model_copy(update={"rows_per_period": 50}))
    assert np.array_equal(w1.user_vec, w2.user_vec) and np.array_equal(w1.item_arrival, w2.item_arrival)


def test_oracle_auc_well_above_half(log, period) -> None:
    y, p = log.frame["label"].to_numpy(), log.frame["p_true"].to_numpy()
    aucs = [roc_auc_score(y[period == t], p[period == t]) for t in range(CFG.periods)]
    assert min(aucs) > 0.72, aucs


def test_truth_drifts_over_time() -> None:
    w = SyntheticWorld(CFG)
    rng = np.random.default_rng(0)
    n = 20_000
    u, i, h = rng.integers(0, CFG.users, n), rng.integers(0, 300, n), rng.integers(0, 24, n)
    p0 = w.click_probability(u, i, h, 0)
    gap = {t: float(np.abs(w.click_probability(u, i, h, t) - p0).mean()) for t in (1, 3, 10, 20, 30)}
    assert gap[1] < gap[3] < gap[10] and gap[30] > 2 * gap[1], gap
    # user drift alone (no context, no ageing): also grows
    quiet = SyntheticWorld(CFG.model_copy(update={"context_amplitude": 0.0, "novelty": 0.0}))
    q0 = quiet.click_probability(u, i, h, 0)
    qgap = [float(np.abs(quiet.click_probability(u, i, h, t) - q0).mean()) for t in (1, 5, 15, 30)]
    assert qgap == sorted(qgap) and qgap[-1] > 3 * qgap[0], qgap
    # abrupt switches happen at the configured rate
    assert abs(w.switched[1:].mean() - CFG.switch_share) < 0.01
    # and no drift when every knob is off
    still = SyntheticWorld(
        CFG.model_copy(update={"drift_sigma": 0.0, "switch_share": 0.0, "context_amplitude": 0.0, "novelty": 0.0})
    )
    assert np.allclose(still.click_probability(u, i, h, 30), still.click_probability(u, i, h, 0))


def test_stale_oracle_degrades(log, period) -> None:
    """The true model of period 9, frozen, loses most of its edge later; the current truth does not."""
    w = SyntheticWorld(CFG)
    f = log.frame
    users = f["user_id"].str.slice(1).cast(pl.Int64).to_numpy()
    items = f["item_id"].str.slice(1).cast(pl.Int64).to_numpy()
    hours = f["hour"].cast(pl.Int64).to_numpy()
    assert np.allclose(w.click_probability(users, items, hours, period), f["p_true"].to_numpy())
    frozen = w.click_probability(users, items, hours, np.full_like(period, 9))
    y = f["label"].to_numpy()
    early = roc_auc_score(y[period == 10], frozen[period == 10])
    late = np.mean([roc_auc_score(y[period == t], frozen[period == t]) for t in range(20, 31)])
    assert early - late > 0.08, (early, late)


def test_model_fit_early_degrades_and_refit_helps(log, period) -> None:
    """A one-hot logistic regression fit on periods 0-9 scores lower on late periods than on period
    10, and lower than the same model refit on the ten periods before the test period."""
    f = log.frame
    X = f.select("user_id", "item_id", "item_cat", "hour").to_numpy()
    y = f["label"].to_numpy()

    def fit(mask):
        enc = OneHotEncoder(handle_unknown="ignore")
        return enc, LogisticRegression(solver="liblinear").fit(enc.fit_transform(X[mask]), y[mask])

    def auc(model, t):
        enc, m = model
        at = period == t
        return roc_auc_score(y[at], m.predict_proba(enc.transform(X[at]))[:, 1])

    stale = fit(period < 10)
    fresh = auc(stale, 10)
    late = [auc(stale, t) for t in (26, 28, 30)]
    refit = [auc(fit((period >= t - 10) & (period < t)), t) for t in (26, 28, 30)]
    assert fresh - np.mean(late) > 0.015, (fresh, late)
    assert np.mean(refit) - np.mean(late) > 0.02, (refit, late)


def test_new_items_arrive_and_old_items_fade(log, period) -> None:
    items = log.frame["item_id"].to_numpy()
    early = set(items[period < 10])
    first = log.frame.with_columns(period=pl.Series(period)).group_by("item_id").agg(pl.col("period").min())
    arrivals = first["period"].value_counts()
    assert first["period"].max() >= 25 and arrivals.height > 20  # items keep arriving
    assert len(set(items[period == 30]) - early) > 0
    share_unseen = np.mean([it not in early for it in items[period == 30]])
    assert share_unseen > 0.5, share_unseen
    # exposure of the initial items falls as they age
    w = SyntheticWorld(CFG)
    initial = w.item_arrival == 0
    assert w.exposure(0)[initial].sum() == pytest.approx(1.0)
    assert w.exposure(30)[initial].sum() < 0.1
    assert np.all(w.exposure(5)[w.item_arrival > 5] == 0)  # never shown before arrival


def test_history_option_strictly_before() -> None:
    cfg = SyntheticConfig(users=30, items=40, rows_per_period=200, periods=4, seed=3, history=5)
    log = generate(cfg)
    f = log.frame
    spec = log.schema.feature("history")
    assert spec.kind == "sequence" and spec.vocab == "item_id" and spec.max_len == 5
    pos = f.filter(pl.col("label") == 1)
    for r in np.random.default_rng(0).choice(f.height, 40, replace=False):
        row = f.row(int(r), named=True)
        prev = pos.filter((pl.col("user_id") == row["user_id"]) & (pl.col("time") < row["time"]))
        assert row["history"] == prev["item_id"].to_list()[::-1][:5]
    assert generate(cfg.model_copy(update={"history": None})).frame.columns == [
        "label", "time", "user_id", "item_id", "item_cat", "hour", "p_true",
    ]  # fmt: skip


def test_label_noise_flips_the_requested_share_and_keeps_the_oracle():
    from reloop.data.sources import load_source, parse_source_config

    small = {"users": 200, "items": 100, "rows_per_period": 2000, "periods": 5}
    clean = load_source(parse_source_config({"source": "synthetic", "synthetic": small})).frame
    noisy = load_source(parse_source_config({"source": "synthetic", "synthetic": {**small, "label_noise": 0.1}})).frame
    share = (clean["label"] != noisy["label"]).mean()
    assert 0.085 < share < 0.115
    assert (clean["p_true"] == noisy["p_true"]).all()


def test_stream_cache_survives_a_concurrent_writer(tmp_path, monkeypatch):
    """Two workers preparing the same stream on a cold cache (``bench paper --jobs 2`` on a new
    machine): a writer that finishes between the other's save and replace must not make it fail."""
    import reloop.data.prepare as prep

    data = {"source": "synthetic", "synthetic": {"users": 50, "items": 40, "periods": 6, "rows_per_period": 200}}
    real_save = torch.save
    nested: list = []
    raced = []

    def save_then_race(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if not raced:  # the other worker writes and replaces the same cache file meanwhile
            raced.append(True)
            nested.append(prep.prepare_stream(data, 3, cache_dir=tmp_path))

    monkeypatch.setattr(prep.torch, "save", save_then_race)
    first = prep.prepare_stream(data, 3, cache_dir=tmp_path)
    assert nested and len(first.stream.rows) == len(nested[0].stream.rows)
    assert [p.name for p in tmp_path.iterdir()] == [f"stream-{first.stream.meta['key']}.pt"]  # no temp left
    cached = prep.prepare_stream(data, 3, cache_dir=tmp_path)
    assert torch.equal(cached.stream.rows.data["row"], first.stream.rows.data["row"])
