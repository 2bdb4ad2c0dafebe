"""ASMG-GRU / ASMG-Linear generators and the ``generator:`` config."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from reloop.data.schema import EncodedField, FeatureMap
from reloop.data.tensors import History, LookAheadError, PeriodTensors, Stream
from reloop.models.base import build_model
from reloop.update.generators.asmg import ASMGGRU, ASMGLinear, CoordinateGRU, loss_weights
from reloop.update.generators.base import ModelGenerator, functional_forward
from reloop.update.generators.config import build_generator, parse_generator
from reloop.update.generators.sml import SML
from reloop.update.losses import CrossEntropy
from reloop.update.strategies import Incremental, UpdateContext
from reloop.update.trainer import TrainConfig, predict_rows, train_rows

# ---------------------------------------------------------------------------------------------------
# a tiny drifting stream


def make_stream(
    n_periods: int = 10,
    rows: int = 300,
    n_users: int = 12,
    n_items: int = 15,
    n_genres: int = 5,
    drift: float = 0.0,
    trend: float = 0.0,
    seed: int = 0,
) -> Stream:
    """Planted logistic truth: user + item effects (item effects and the intercept move linearly in t)."""
    g = torch.Generator().manual_seed(seed)
    user_eff = torch.randn(n_users, generator=g) * 0.7
    item_eff = torch.randn(n_items, generator=g) * 0.7
    item_slope = torch.randn(n_items, generator=g) * drift
    item_genres = torch.randint(1, n_genres + 1, (n_items, 2), generator=g)
    item_genres[torch.rand(n_items, generator=g) < 0.5, 1] = 0  # some items have one genre
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("user", "item", "genre", "label")}
    bounds, start = [], 0
    for t in range(1, n_periods + 1):
        u = torch.randint(n_users, (rows,), generator=g)
        i = torch.randint(n_items, (rows,), generator=g)
        logit = trend * (t - n_periods / 2) + user_eff[u] + item_eff[i] + item_slope[i] * (t - n_periods / 2)
        y = torch.bernoulli(torch.sigmoid(logit), generator=g)
        genre = item_genres[i].clone()
        genre[genre > 0] += 1  # ids start after the reserved rows (0 = pad, 1 = OOV)
        cols["user"].append(u + 2)
        cols["item"].append(i + 2)
        cols["genre"].append(genre)
        cols["label"].append(y)
        bounds.append((start, start + rows))
        start += rows
    data = {k: torch.cat(v) for k, v in cols.items()}
    data["row"] = torch.arange(start, dtype=torch.int64)
    fmap = FeatureMap(
        fields=[
            EncodedField(name="user", kind="categorical", table="user", size=n_users + 2),
            EncodedField(name="item", kind="categorical", table="item", size=n_items + 2),
            EncodedField(name="genre", kind="sequence", table="genre", size=n_genres + 2, max_len=2),
        ],
        user_field="user",
    )
    return Stream(feature_map=fmap, rows=PeriodTensors(data), bounds=bounds)


def make_model(stream: Stream, seed: int = 0, dim: int = 4, hidden: list[int] | None = None):
    torch.manual_seed(seed)
    return build_model(
        {"name": "emb_mlp", "embedding_dim": dim, "hidden_units": hidden or [6], "init_std": 0.1}, stream.feature_map
    )


def ctx_for(
    stream: Stream, t: int, g: torch.Generator, history: History | None = None, batch_size: int = 64, lr: float = 1e-2
) -> UpdateContext:
    return UpdateContext(
        history=history or History(stream, t),
        t=t,
        loss=CrossEntropy(),
        train=TrainConfig(batch_size=batch_size, lr=lr),
        generator=g,
        fresh_model=lambda: make_model(stream),
    )


def pretrain(stream: Stream, P: int, g: torch.Generator, epochs: int = 5, lr: float = 1e-2):
    model = make_model(stream)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_rows(
        model,
        opt,
        History(stream, P).periods(1, P),
        CrossEntropy(),
        TrainConfig(batch_size=64, lr=lr),
        g,
        epochs=epochs,
    )
    return model, opt.state_dict()


def bce(model, rows) -> float:
    logits, _ = predict_rows(model, rows)
    return float(F.binary_cross_entropy_with_logits(logits, rows.data["label"]))


def drive(stream: Stream, gen: ModelGenerator, P: int, T: int, seed: int = 0, base_lr: float = 1e-2, hook=None):
    """The protocol: IU, observe, serve D_{t+1}, learn. Returns per-period (serving, base) next-period BCE."""
    g = torch.Generator().manual_seed(seed)
    model, opt_state = pretrain(stream, P, g, lr=base_lr)
    iu = Incremental()
    out = []
    for t in range(P + 1, T):
        model, opt_state = iu.update(model, opt_state, ctx_for(stream, t, g, lr=base_lr))
        gen.observe(t, model)
        serving = gen.serving_model(model)
        nxt = stream.period(t + 1)
        out.append((t, bce(serving, nxt), bce(model, nxt)))
        if hook is not None:
            hook("before_learn", t, gen, model)
        gen.learn(History(stream, t + 1), t + 1, ctx_for(stream, t + 1, g))
        if hook is not None:
            hook("after_learn", t, gen, model)
    return out


# ---------------------------------------------------------------------------------------------------
# the coordinate-wise GRU against a hand-written cell


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def hand_gru(x: float, h: list[float], gru: CoordinateGRU, p: int) -> tuple[list[float], float]:
    """One GRU step of coordinate p in plain Python floats (METHODS.md equations + gate biases)."""
    d = gru.hidden
    U = gru.u.detach().double()
    Wzr = gru.w_zr.detach().double()
    Wh = gru.w_h.detach().double()
    B = gru.bias.detach().double() if gru.bias is not None else torch.zeros(3, gru.n_coords, d, dtype=torch.float64)
    z, r = [], []
    for j in range(d):
        sz = x * float(U[0, p, j]) + sum(h[i] * float(Wzr[p, i, j]) for i in range(d)) + float(B[0, p, j])
        sr = x * float(U[1, p, j]) + sum(h[i] * float(Wzr[p, i, d + j]) for i in range(d)) + float(B[1, p, j])
        z.append(_sig(sz))
        r.append(_sig(sr))
    new = []
    for j in range(d):
        sh = x * float(U[2, p, j]) + sum(r[i] * h[i] * float(Wh[p, i, j]) for i in range(d)) + float(B[2, p, j])
        new.append((1 - z[j]) * h[j] + z[j] * math.tanh(sh))
    y = sum(new[j] * float(gru.w_out[p, j].detach()) for j in range(d)) + float(gru.b_out[p].detach())
    if gru.residual:
        y += x
    return new, y


@pytest.mark.parametrize("init", ["identity", "glorot"])
@pytest.mark.parametrize("kind", ["dense", "embedding"])
def test_vectorised_gru_matches_hand_written_cell(kind, init):
    g = torch.Generator().manual_seed(3)
    P, d = (7, 3) if kind == "dense" else (4, 3)
    gru = CoordinateGRU(P, d, gate_bias=True, init=init, generator=g)
    with torch.no_grad():  # non-trivial biases and output layer
        gru.bias.copy_(torch.randn(gru.bias.shape, generator=g))
        gru.w_out.copy_(torch.randn(gru.w_out.shape, generator=g))
        gru.b_out.copy_(torch.randn(gru.b_out.shape, generator=g))
    N = 1 if kind == "dense" else 6  # dense: one row of P coordinates; embedding: N ids × P dims
    x = torch.randn(N, P, generator=g)
    h = torch.randn(N, P, d, generator=g) * 0.5
    with torch.no_grad():
        h_new = gru.step(x, h)
        y = gru.output(x, h_new)
    for n, p in [(0, 2), (0, 6)] if kind == "dense" else [(3, 1), (5, 3), (0, 0)]:
        ref_h, ref_y = hand_gru(float(x[n, p]), [float(v) for v in h[n, p]], gru, p)
        assert torch.allclose(h_new[n, p].double(), torch.tensor(ref_h, dtype=torch.float64), atol=1e-6)
        assert abs(float(y[n, p]) - ref_y) < 1e-5


def test_embedding_dimension_shares_weights_across_ids():
    gru = CoordinateGRU(4, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 4)
    x[3] = x[1]
    h = torch.zeros(5, 4, 2)
    out = gru.step(x, h)
    assert torch.equal(out[3], out[1])  # same input + state -> same output, whatever the id


def test_no_gate_bias_has_no_bias_parameter():
    gru = CoordinateGRU(3, 4, gate_bias=False, init="glorot")
    assert gru.bias is None
    names = {n for n, _ in gru.named_parameters()}
    assert names == {"u", "w_zr", "w_h", "w_out", "b_out"}
    # TF glorot on [P, 1, H]: |U| ≤ sqrt(6 / (P (1 + H)))
    assert float(gru.u.detach().abs().max()) <= math.sqrt(6 / (3 * 5)) + 1e-6


# ---------------------------------------------------------------------------------------------------
# generator mechanics


def _perturbed_models(stream, k: int, seed: int = 0):
    base = make_model(stream, seed=seed)
    models = []
    for j in range(k):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * (j + 1) * torch.randn_like(p))
            for emb in m.embedding.tables.values():
                emb.weight[0].zero_()
        models.append(m)
    return models


def test_loss_weights_for_k3():
    assert torch.allclose(loss_weights("multi", 3), torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))
    assert torch.allclose(loss_weights("unif", 3), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert loss_weights("single", 3).tolist() == [0.0, 0.0, 1.0]
    assert torch.allclose(loss_weights("zero", 3), loss_weights("multi", 3))
    assert torch.allclose(loss_weights("full", 5).sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["multi", "full"])
def test_generated_params_have_base_shapes(variant):
    stream = make_stream(n_periods=4)
    gen = ASMGGRU(k=3, hidden=4, variant=variant, warmup=0, init="glorot")
    models = _perturbed_models(stream, 3)
    for t, m in enumerate(models, start=1):
        gen.observe(t, m)
    served = gen.serving_model(models[-1])
    assert served is not models[-1]
    ref = dict(models[-1].named_parameters())
    got = dict(served.named_parameters())
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].shape == ref[name].shape
        assert not torch.allclose(got[name], ref[name])  # glorot: not the input model
    # the padding row of generated tables stays zero
    for table in served.embedding.tables.values():
        assert torch.count_nonzero(table.weight[0]) == 0
    outs, states = gen.generate([p for _, p in gen.window()], None, outputs=[0, 1, 2])
    for j in range(3):
        assert {n: v.shape for n, v in outs[j].items()} == {n: v.shape for n, v in ref.items()}
    emb = "embedding.tables.item.weight"
    assert states[0][emb].shape == (ref[emb].shape[0], ref[emb].shape[1], 4)
    assert states[0]["head.weight"].shape == (1, ref["head.weight"].numel(), 4)


def test_identity_init_serves_latest_model():
    stream = make_stream(n_periods=4)
    models = _perturbed_models(stream, 3)
    for gen in (ASMGGRU(k=3, warmup=0), ASMGLinear(k=1, warmup=0), SML(warmup=0)):
        for t, m in enumerate(models, start=1):
            gen.observe(t, m)
        served = gen.serving_model(models[-1])
        for name, p in models[-1].named_parameters():
            assert torch.allclose(dict(served.named_parameters())[name], p, atol=1e-6), (gen.name, name)


def test_warmup_serves_base_model():
    stream = make_stream(n_periods=8)
    seen = []

    def hook(stage, t, gen, model):
        if stage == "before_learn":
            seen.append((t, gen.ready, gen.n_trained))

    drive(stream, ASMGGRU(k=3, warmup=1), P=3, T=8, hook=hook)
    # models observed from t=4: k=3 models at t=6, first training at learn(7), first generated serve at t=7
    assert seen == [(4, False, 0), (5, False, 0), (6, False, 0), (7, True, 1)]


def test_asmg_linear_zero_weights_is_mean_of_k_models():
    stream = make_stream(n_periods=4)
    models = _perturbed_models(stream, 3)
    gen = ASMGLinear(k=3, warmup=0)
    for t, m in enumerate(models, start=1):
        gen.observe(t, m)
    served = gen.serving_model(models[-1])
    for name, p in served.named_parameters():
        mean = torch.stack([dict(m.named_parameters())[name] for m in models]).mean(0)
        assert torch.allclose(p, mean, atol=1e-6)


def test_hidden_state_carry_and_zero_variant():
    stream = make_stream(n_periods=9)
    record = {}

    def hook(stage, t, gen, model):
        if stage == "before_learn":
            record[t] = {
                "window": [copy.deepcopy(p) for _, p in gen.window()],
                "h0": copy.deepcopy(gen.initial_state()),
            }
        else:
            record[t]["h_after"] = copy.deepcopy(gen._h)
            record[t]["gen"] = copy.deepcopy(gen)

    drive(stream, ASMGGRU(k=3, variant="multi"), P=3, T=9, hook=hook)
    trained = [t for t in record if record[t]["h_after"] is not None]
    assert trained == [6, 7, 8]
    assert record[6]["h0"] is None  # first training starts from h_0 = 0
    for t in trained:
        gen = record[t]["gen"]
        with torch.no_grad():
            _, states = gen.generate(record[t]["window"], record[t]["h0"], outputs=[])
        for name, h in record[t]["h_after"].items():
            assert torch.allclose(h, states[0][name]), name
        assert any(float(h.abs().max()) > 0 for h in record[t]["h_after"].values())
        if t + 1 in record:  # the carried state starts the next period's window
            nxt = record[t + 1]["h0"]
            assert all(torch.equal(nxt[n], record[t]["h_after"][n]) for n in nxt)

    record.clear()
    drive(stream, ASMGGRU(k=3, variant="zero"), P=3, T=9, hook=hook)
    assert all(record[t]["h_after"] is None and record[t]["h0"] is None for t in record)


class RecordingHistory(History):
    log: list[tuple[int, int]] = []

    def period(self, i):
        RecordingHistory.log.append((i, i))
        return super().period(i)

    def periods(self, first, last):
        RecordingHistory.log.append((first, last))
        return super().periods(first, last)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ASMGGRU(k=2, variant="multi"),
        lambda: ASMGGRU(k=2, variant="full"),
        lambda: ASMGLinear(k=2),
        lambda: SML(),
    ],
)
def test_no_look_ahead(make):
    stream = make_stream(n_periods=7, rows=120)
    gen = make()
    g = torch.Generator().manual_seed(0)
    model, opt_state = pretrain(stream, 3, g, epochs=1)
    for t in range(4, 7):
        model, opt_state = Incremental().update(model, opt_state, ctx_for(stream, t, g))
        RecordingHistory.log = []
        gen.observe(t, model)
        gen.serving_model(model)
        assert RecordingHistory.log == []  # serving reads no data at all
        with pytest.raises(LookAheadError):  # learning needs D_{t+1}: impossible with data up to t
            gen.learn(History(stream, t), t + 1, ctx_for(stream, t, g))
        hist = RecordingHistory(stream, t + 1)
        gen.learn(hist, t + 1, ctx_for(stream, t + 1, g, history=hist))
        if gen.n_trained:
            assert max(last for _, last in RecordingHistory.log) == t + 1
            assert (t + 1, t + 1) in RecordingHistory.log
        assert gen.last_learn_seconds >= 0.0


def test_learn_requires_the_next_period():
    stream = make_stream(n_periods=5)
    gen = ASMGLinear(k=1)
    m = make_model(stream)
    gen.observe(2, m)
    with pytest.raises(ValueError, match="t_next"):
        gen.learn(History(stream, 4), 4, ctx_for(stream, 4, torch.Generator()))


def test_gru_generator_beats_serving_the_last_model_under_drift():
    # the intercept and the item effects move linearly; IU (small lr) lags behind them
    stream = make_stream(n_periods=12, rows=300, drift=0.5, trend=0.1, seed=1)
    gen = ASMGGRU(k=3, hidden=4, variant="multi", lr=1e-2, epochs=1)
    out = drive(stream, gen, P=3, T=12, base_lr=3e-3)
    served = [(s, b) for t, s, b in out if t >= 7]  # generated models serve from t = 7 (k = 3, warmup 1)
    gen_loss = sum(s for s, _ in served) / len(served)
    base_loss = sum(b for _, b in served) / len(served)
    assert gen_loss < base_loss - 0.02, (gen_loss, base_loss)  # measured ≈ 0.695 vs 0.744
    assert gen.last_learn_seconds > 0


def run_periods(stream: Stream, gen: ModelGenerator, around_learn=None):
    """Pretrain on periods 1..3, then IU, observe, serve and learn for t = 4..6 (Algorithm 1's loop)."""
    g = torch.Generator().manual_seed(0)
    model, opt_state = pretrain(stream, 3, g, epochs=1)
    for t in range(4, 7):
        model, opt_state = Incremental().update(model, opt_state, ctx_for(stream, t, g))
        gen.observe(t, model)
        gen.serving_model(model)
        learn = lambda t=t: gen.learn(History(stream, t + 1), t + 1, ctx_for(stream, t + 1, g))  # noqa: E731
        around_learn(g, learn) if around_learn else learn()
    return gen, model, opt_state, g


def test_state_dict_round_trip():
    stream = make_stream(n_periods=9, rows=150)
    for make in (
        lambda: ASMGGRU(k=2, variant="multi"),
        lambda: ASMGGRU(k=2, variant="full"),
        lambda: ASMGLinear(k=2),
        lambda: SML(),
    ):
        gen, model, opt_state, _ = run_periods(stream, make())
        copied = copy.deepcopy(gen)
        buf = io.BytesIO()
        torch.save(gen.state_dict(), buf)
        buf.seek(0)
        fresh = make()
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        results = []
        for other in (gen, copied, fresh):
            g2 = torch.Generator().manual_seed(5)
            m, st = Incremental().update(model, copy.deepcopy(opt_state), ctx_for(stream, 7, g2))
            other.observe(7, m)
            first = other.serving_model(m)
            other.learn(History(stream, 8), 8, ctx_for(stream, 8, g2))
            m, st = Incremental().update(m, st, ctx_for(stream, 8, g2))
            other.observe(8, m)
            results.append((first.state_dict(), other.serving_model(m).state_dict()))
        for res in results[1:]:
            for a, b in zip(results[0], res):
                assert all(torch.equal(a[n], b[n]) for n in a), gen.name
        with pytest.raises(ValueError):
            ASMGGRU(k=5).load_state_dict(gen.state_dict()) if gen.name == "asmg_gru" else type(gen)(
                warmup=3
            ).load_state_dict(gen.state_dict())


def test_functional_forward_of_generated_params_has_gradients():
    stream = make_stream(n_periods=4)
    models = _perturbed_models(stream, 3)
    gen = ASMGGRU(k=3, warmup=0, init="glorot")
    for t, m in enumerate(models, start=1):
        gen.observe(t, m)
    outs, _ = gen.generate([p for _, p in gen.window()], None)
    batch = dict(stream.period(1).slice(0, 32).data)
    loss = F.binary_cross_entropy_with_logits(functional_forward(models[-1], outs[2], batch), batch["label"])
    loss.backward()
    grads = [p.grad for p in gen.meta.parameters()]
    assert all(gr is not None for gr in grads)


# ---------------------------------------------------------------------------------------------------
# config


def test_generator_config_forms():
    assert type(build_generator("identity")) is ModelGenerator
    assert type(build_generator(None)) is ModelGenerator
    assert isinstance(build_generator("sml"), SML)
    assert build_generator({"sml": {"lr": 0.01}}).lr == 0.01
    gru = build_generator(
        {
            "asmg_gru": {
                "k": 4,
                "hidden": 2,
                "variant": "unif",
                "lr": 0.001,
                "epochs": 2,
                "gate_bias": False,
                "init": "glorot",
                "warmup": 0,
            }
        }
    )
    assert isinstance(gru, ASMGGRU)
    assert (gru.k, gru.hidden, gru.variant, gru.lr, gru.epochs, gru.gate_bias, gru.init, gru.warmup) == (
        4,
        2,
        "unif",
        0.001,
        2,
        False,
        "glorot",
        0,
    )
    lin = build_generator({"asmg_linear": {"k": 2, "lr": 0.05}})
    assert isinstance(lin, ASMGLinear) and lin.k == 2 and lin.lr == 0.05
    assert parse_generator({"asmg_gru": None})[0] == "asmg_gru"


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"asmg_gru": {"kk": 3}}, "generator.asmg_gru.kk"),
        ({"asmg_gru": {"variant": "half"}}, "generator.asmg_gru.variant"),
        ({"asmg_gru": {"k": 0}}, "generator.asmg_gru.k"),
        ({"asmg_linear": {"hidden": 3}}, "generator.asmg_linear.hidden"),
        ({"sml": {"init": "zeros"}}, "generator.sml.init"),
        ("asmg", "generator"),
    ],
)
def test_generator_config_errors_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_generator(cfg)


@pytest.mark.parametrize(
    "make",
    [lambda s: ASMGGRU(k=2, sparse_rows=s), lambda s: ASMGLinear(k=2, sparse_rows=s), lambda s: SML(sparse_rows=s)],
)
def test_sparse_rows_training_equals_full_tables(make):
    stream = make_stream(n_periods=7, rows=200, n_users=400, n_items=500, drift=0.5, trend=0.1)
    results = []
    for sparse in (True, False):
        gen = make(sparse)
        drive(stream, gen, P=3, T=7)
        assert gen.n_trained > 0 and gen._sparse_ok is (True if sparse else None)
        results.append(gen.meta.state_dict())
    for name, value in results[0].items():
        assert torch.allclose(value, results[1][name], atol=1e-5), name


def test_sparse_rows_falls_back_when_forward_hooks_miss_reads():
    stream = make_stream(n_periods=7, rows=100, n_users=400)

    class Peeking(type(make_model(stream))):
        def body(self, batch):  # reads the user table's weights directly, not through its forward
            h = super().body(batch)
            return h + self.embedding.tables["user"].weight[1].sum()  # the OOV row: no id reads it

    model = make_model(stream)
    peeking = Peeking(stream.feature_map, model.options)
    peeking.load_state_dict(model.state_dict())
    gen = ASMGGRU(k=1, init="glorot")
    gen.observe(3, peeking)
    with pytest.warns(UserWarning, match="full tables"):
        gen.learn(History(stream, 4), 4, ctx_for(stream, 4, torch.Generator().manual_seed(0)))
    assert gen._sparse_ok is False


def test_runner_rows_carry_per_period_seconds(stream):
    """The runner times each period's steps (ASMG Table 3: the generator's training time per period)."""
    from conftest import tiny_config

    from reloop.config import RunSpec
    from reloop.protocol.runner import pretrain as pretrain_theta0
    from reloop.protocol.runner import run_one

    cfg = tiny_config()
    theta0, opt0 = pretrain_theta0(cfg, stream, 0)
    keys = ("update_s", "generate_s", "serve_s", "generator_fit_s")
    runs = {
        name: run_one(cfg, stream, name, RunSpec(**spec), 0, theta0, opt0)
        for name, spec in (("gru", {"generator": {"asmg_gru": {"k": 2}}}), ("IU", {}))
    }
    for rows in runs.values():
        first, *rest = rows
        assert not any(k in first for k in keys)  # Θ0 serving period P+1: no step of the loop ran
        assert len(rest) == cfg.protocol.served_periods
        assert all(isinstance(r[k], float) and r[k] >= 0.0 for r in rest for k in keys)
    fit = {name: sum(r["generator_fit_s"] for r in rows[1:]) for name, rows in runs.items()}
    assert fit["gru"] > fit["IU"]  # the identity generator learns nothing


@pytest.mark.parametrize("make", [lambda: ASMGGRU(k=2), lambda: ASMGLinear(k=2), lambda: SML()])
def test_learning_leaves_the_run_rng_alone(make):
    """Base models of an ASMG run must be the IU run's: the generator shuffles with its own RNG."""

    def unchanged(g, learn):
        before = g.get_state()
        learn()
        assert torch.equal(before, g.get_state())

    run_periods(make_stream(n_periods=8, rows=120), make(), around_learn=unchanged)


def test_run_seed_offsets_the_generator_seed():
    from reloop.update.generators.config import build_generator

    a, b = build_generator({"asmg_gru": {"k": 2}}, run_seed=0), build_generator({"asmg_gru": {"k": 2}}, run_seed=3)
    assert (a.seed, b.seed) == (0, 3)
