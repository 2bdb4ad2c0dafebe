"""SML transfer generator and SPMF replay."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from reloop.data.schema import EncodedField, FeatureMap
from reloop.data.tensors import History, PeriodTensors, Stream
from reloop.models.base import build_model
from reloop.update.generators.base import functional_forward
from reloop.update.generators.sml import SML, TransferCNN
from reloop.update.losses import CrossEntropy
from reloop.update.replay import Replay, rank_weights, reservoir_absorb
from reloop.update.strategies import Incremental, UpdateContext
from reloop.update.trainer import TrainConfig, predict_rows, train_rows


def make_stream(
    n_periods: int = 8, rows: int = 200, n_users: int = 10, n_items: int = 12, trend: float = 0.1, seed: int = 0
) -> Stream:
    g = torch.Generator().manual_seed(seed)
    user_eff = torch.randn(n_users, generator=g) * 0.7
    item_eff = torch.randn(n_items, generator=g) * 0.7
    item_slope = torch.randn(n_items, generator=g) * 0.5
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("user", "item", "label")}
    bounds, start = [], 0
    for t in range(1, n_periods + 1):
        u = torch.randint(n_users, (rows,), generator=g)
        i = torch.randint(n_items, (rows,), generator=g)
        logit = (trend + item_slope[i]) * (t - n_periods / 2) + user_eff[u] + item_eff[i]
        cols["user"].append(u + 2)
        cols["item"].append(i + 2)
        cols["label"].append(torch.bernoulli(torch.sigmoid(logit), generator=g))
        bounds.append((start, start + rows))
        start += rows
    data = {k: torch.cat(v) for k, v in cols.items()}
    data["row"] = torch.arange(start, dtype=torch.int64)
    fmap = FeatureMap(
        fields=[
            EncodedField(name="user", kind="categorical", table="user", size=n_users + 2),
            EncodedField(name="item", kind="categorical", table="item", size=n_items + 2),
        ],
        user_field="user",
    )
    return Stream(feature_map=fmap, rows=PeriodTensors(data), bounds=bounds)


def make_model(stream: Stream, seed: int = 0, hidden: list[int] | None = None):
    torch.manual_seed(seed)
    return build_model(
        {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": hidden or [6], "init_std": 0.1}, stream.feature_map
    )


def ctx_for(stream: Stream, t: int, g: torch.Generator, lr: float = 1e-2) -> UpdateContext:
    return UpdateContext(
        history=History(stream, t),
        t=t,
        loss=CrossEntropy(),
        train=TrainConfig(batch_size=50, lr=lr),
        generator=g,
        fresh_model=lambda: make_model(stream),
    )


def pretrain(stream: Stream, P: int, g: torch.Generator, epochs: int = 3):
    model = make_model(stream)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_rows(
        model, opt, History(stream, P).periods(1, P), CrossEntropy(), TrainConfig(batch_size=50), g, epochs=epochs
    )
    return model, opt.state_dict()


def bce_params(model, params, rows) -> float:
    with torch.no_grad():
        logits = functional_forward(model, params, dict(rows.data))
    return float(F.binary_cross_entropy_with_logits(logits, rows.data["label"]))


# ---------------------------------------------------------------------------------------------------
# SML


@pytest.mark.parametrize("init", ["identity", "glorot"])
def test_transfer_cnn_shapes(init):
    g = torch.Generator().manual_seed(0)
    emb = TransferCNN(dim=4, n1=10, n2=5, l1=20, init=init, generator=g)
    prev, hat = torch.randn(9, 4), torch.randn(9, 4)
    assert emb(prev, hat).shape == (9, 4)
    dense = TransferCNN(dim=30, n1=5, n2=3, l1=12, init=init, generator=g)
    assert dense(torch.randn(1, 30), torch.randn(1, 30)).shape == (1, 30)
    if init == "identity":
        assert torch.equal(emb(prev, hat), hat)  # residual, last layer zero: serves W_hat untrained
    else:
        assert not torch.allclose(emb(prev, hat), hat)


def test_sml_sizes_follow_the_reference():
    stream = make_stream()
    model = make_model(stream, hidden=[20, 10])
    gen = SML(init="glorot")
    gen.observe(1, model)
    fc1 = gen.meta["embedding__tables__item__weight"].fc1
    assert fc1.shape == (5 * 4, 20)  # n2 · d_e -> l1 = 20
    # dense: n2 = 3, l1 = 2 × the last dim (ML/Tmall: fc1 kernel 80, bias 40, ..., fc3 bias 2)
    assert gen.meta["mlp__net__0__weight"].fc1.shape == (3 * 20 * 8, 16)
    assert gen.meta["mlp__net__0__bias"].fc1.shape == (3 * 20, 40)
    assert gen.meta["head__bias"].fc1.shape == (3, 2)
    served = gen.serving_model(model)
    assert served is model  # warm-up: not trained yet
    gen.warmup = 0
    served = gen.serving_model(model)
    for name, p in model.named_parameters():
        assert dict(served.named_parameters())[name].shape == p.shape
    for table in served.embedding.tables.values():
        assert torch.count_nonzero(table.weight[0]) == 0  # padding row


@pytest.mark.parametrize("init", ["identity", "glorot"])
def test_sml_learn_reduces_target_loss_and_moves_w_prev(init):
    stream = make_stream(n_periods=7)
    g = torch.Generator().manual_seed(0)
    model, opt_state = pretrain(stream, 4, g)
    gen = SML(lr=1e-2, epochs=5, init=init)
    for t in (5, 6):
        model, opt_state = Incremental().update(model, opt_state, ctx_for(stream, t, g))
        gen.observe(t, model)
        prev = {n: v.clone() for n, v in gen._prev.items()}
        hat = gen._models[-1][1]
        target = stream.period(t + 1)
        with torch.no_grad():
            before = bce_params(model, gen.transfer(prev, hat), target)
        gen.learn(History(stream, t + 1), t + 1, ctx_for(stream, t + 1, g))
        with torch.no_grad():
            after_params = gen.transfer(prev, hat)
        after = bce_params(model, after_params, target)
        assert after < before, (t, before, after)
        for n, v in after_params.items():  # W_prev := f(W_prev, Θ_t) with the updated f
            assert torch.allclose(gen._prev[n], v)
    assert gen.ready and gen.last_learn_seconds > 0


# ---------------------------------------------------------------------------------------------------
# SPMF replay


def test_rank_weights_favour_low_scores():
    scores = torch.tensor([0.9, -1.0, 0.1, 2.0, -3.0])
    p = rank_weights(scores)
    assert torch.allclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    order = torch.argsort(scores)  # ascending score -> descending probability
    assert torch.all(p[order][:-1] > p[order][1:])
    n = 5  # exp(r / |R|) with r = 0 for the highest score
    assert torch.allclose(p[3] / p[4], torch.exp(torch.tensor(-(n - 1) / n, dtype=torch.float64)))


def test_reservoir_absorb_is_uniform_and_fixed_size():
    g = torch.Generator().manual_seed(0)
    hits = 0.0
    trials = 200
    for _ in range(trials):
        res = reservoir_absorb(torch.arange(100), torch.arange(100, 1000), n_seen=100, generator=g)
        assert res.numel() == 100 and res.unique().numel() == 100
        hits += float((res < 100).sum())
    # every one of the 1000 ids is kept with probability 100 / 1000: ≈ 10 of the first 100 survive
    assert 9.0 < hits / trials < 11.0
    assert torch.equal(reservoir_absorb(torch.arange(3), torch.empty(0, dtype=torch.long), 3, g), torch.arange(3))


def _replay_run(stream, replay, seed=0, periods=(5, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    model, opt_state = pretrain(stream, 4, g, epochs=1)
    for t in periods:
        model, opt_state = replay.update(model, opt_state, ctx_for(stream, t, g))
    return model, opt_state, g


def test_replay_reservoir_and_training_rows():
    stream = make_stream(n_periods=8)
    g = torch.Generator().manual_seed(0)
    model, _ = pretrain(stream, 4, g)
    replay = Replay(reservoir=0.3, ratio=0.5)
    ctx = ctx_for(stream, 5, g)
    rows = replay.rows_for(model, ctx)
    past = stream.periods(1, 4)
    n_pos_past = int(past.data["label"].sum())
    assert replay.pos.numel() == round(0.3 * n_pos_past)
    assert replay.neg.numel() == round(0.3 * (len(past) - n_pos_past))
    assert bool((stream.rows.data["label"][replay.pos] == 1).all())
    assert bool((stream.rows.data["label"][replay.neg] == 0).all())
    sizes = (replay.pos.numel(), replay.neg.numel())
    # training rows = sampled reservoir rows (time order) followed by D_t, not shuffled
    cur = stream.period(5)
    sampled = replay.last_sampled
    m = sampled.numel()
    assert torch.equal(rows.data["row"][:m], sampled) and torch.equal(rows.data["row"][m:], cur.data["row"])
    assert torch.equal(sampled, sampled.sort().values)
    assert bool(torch.isin(sampled, torch.cat([replay.pos, replay.neg])).all())
    n_pos = int(cur.data["label"].sum())
    assert int(rows.data["label"][:m].sum()) == round(0.5 * n_pos)
    assert m - round(0.5 * n_pos) == round(0.5 * (len(cur) - n_pos))
    assert int(sampled.max()) < cur.data["row"][0]  # replayed rows all come from earlier periods
    # the reservoirs absorb D_t and keep their size
    replay.after_update(ctx)
    assert (replay.pos.numel(), replay.neg.numel()) == sizes
    assert replay.seen_pos == n_pos_past + n_pos
    for t in (6, 7):
        model, _ = replay.update(model, None, ctx_for(stream, t, g))
        assert (replay.pos.numel(), replay.neg.numel()) == sizes


def test_replay_samples_favour_low_scored_positives():
    stream = make_stream(n_periods=8, rows=400)
    g = torch.Generator().manual_seed(1)
    model, _ = pretrain(stream, 4, g)
    replay = Replay(reservoir=1.0, ratio=0.3)
    ctx = ctx_for(stream, 5, g)
    means = []
    for _ in range(20):
        sampled = replay.sample(model, ctx)
        pos = sampled[stream.rows.data["label"][sampled] == 1]
        logits, _ = predict_rows(model, stream.rows.take(pos))
        means.append(float(logits.mean()))
    all_logits, _ = predict_rows(model, stream.rows.take(replay.pos))
    assert sum(means) / len(means) < float(all_logits.mean()) - 0.02


def test_replay_is_deterministic_under_the_generator():
    stream = make_stream(n_periods=8)
    a = Replay()
    b = Replay()
    ma, _, _ = _replay_run(stream, a, seed=3)
    mb, _, _ = _replay_run(stream, b, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert torch.equal(a.pos, b.pos) and torch.equal(a.neg, b.neg)
    c = Replay()
    _replay_run(stream, c, seed=4)
    assert not (torch.equal(a.pos, c.pos) and torch.equal(a.neg, c.neg))
    # with its own seed, the reservoir draws do not depend on ctx.generator (the scores do: other model)
    d, e = Replay(seed=7), Replay(seed=7)
    _replay_run(stream, d, seed=3, periods=(5,))
    _replay_run(stream, e, seed=4, periods=(5,))
    assert torch.equal(d.pos, e.pos) and torch.equal(d.neg, e.neg)


@pytest.mark.parametrize("seed", [None, 11])
def test_replay_state_round_trip(seed):
    stream = make_stream(n_periods=8)
    replay = Replay(reservoir=0.3, ratio=0.5, seed=seed)
    model, opt_state, g = _replay_run(stream, replay, periods=(5, 6))
    copied = copy.deepcopy(replay)
    buf = io.BytesIO()
    torch.save(replay.state_dict(), buf)
    buf.seek(0)
    fresh = Replay(reservoir=0.3, ratio=0.5, seed=seed)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    outs = []
    for r in (replay, copied, fresh):
        g2 = torch.Generator().manual_seed(9)
        m, _ = r.update(model, copy.deepcopy(opt_state), ctx_for(stream, 7, g2))
        outs.append((m.state_dict(), r.pos.clone(), r.neg.clone(), r.last_sampled.clone()))
    for other in outs[1:]:
        assert all(torch.equal(outs[0][0][n], other[0][n]) for n in outs[0][0])
        assert all(torch.equal(x, y) for x, y in zip(outs[0][1:], other[1:]))
    with pytest.raises(ValueError):
        Replay(ratio=0.1).load_state_dict(replay.state_dict())
