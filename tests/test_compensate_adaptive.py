"""Self-tuning λ for the error memory (``lambda: auto``; issue #15 item 2).

The compensator learns λ by Hedge over a grid of candidate λ (λ = 0, the bare model, included) from
the labelled rows it is fed, scoring each row with an ê that existed before its label did.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reloop.combine import log_loss
from reloop.memory import (
    Compensator,
    ExactMemory,
    MemoryConfig,
    SketchMemory,
    build_memory,
    compensate,
)
from reloop.memory.compensate import DEFAULT_GRID, LambdaTuner

T = torch.tensor
D = torch.float64

# ---------------------------------------------------------------- unit: hand-computed


def test_lambda_choice_by_hand():
    """Grid {0, 0.5, 1}, η = 1, ŷ = 0.5, ê = 0.4: the experts predict 0.5, 0.7, 0.9.
    After y = 1: w ∝ (0.5, 0.7, 0.9); after y = 0 as well: w ∝ (0.25, 0.21, 0.09)."""
    tuner = LambdaTuner([1.0, 0.0, 0.5])  # sorted on the way in
    assert tuner.grid == (0.0, 0.5, 1.0) and tuner.lam == pytest.approx(0.5)
    y_hat, e_hat = T([0.5], dtype=D), T([0.4], dtype=D)
    assert tuner.experts(y_hat, e_hat)[:, 0].tolist() == pytest.approx([0.5, 0.7, 0.9])
    tuner.update(y_hat, e_hat, T([1.0]))
    assert list(tuner.weights.values()) == pytest.approx([0.5 / 2.1, 0.7 / 2.1, 0.9 / 2.1], rel=1e-12)
    assert tuner.lam == pytest.approx((0.5 * 0.7 + 0.9) / 2.1, rel=1e-12)  # 0.5952
    assert tuner.serve(y_hat, e_hat).item() == pytest.approx((0.25 + 0.49 + 0.81) / 2.1, rel=1e-12)
    tuner.update(y_hat, e_hat, T([0.0]))
    assert list(tuner.weights.values()) == pytest.approx([0.25 / 0.55, 0.21 / 0.55, 0.09 / 0.55], rel=1e-12)
    assert tuner.lam == pytest.approx((0.5 * 0.21 + 0.09) / 0.55, rel=1e-12)  # 0.3545
    leader = LambdaTuner([0.0, 0.5, 1.0], select="leader")
    leader.load_state_dict({**tuner.state_dict(), "select": "leader"})
    assert leader.lam == 0.0  # the heaviest λ
    assert leader.serve(y_hat, e_hat).item() == pytest.approx(0.5)


def test_compensator_scores_the_memory_read_before_the_write():
    """Exact memory, top-1: one stored row (y = 1, ŷ = 0.5) at the query's key gives ê = 0.5.
    Feeding back (y = 0, ŷ = 0.5) at that key charges λ ∈ {0, 0.5, 1} for predicting 0.5, 0.75,
    1 − ε — not the ê = 0 that the memory would give after writing the row itself."""
    comp = Compensator(ExactMemory(2, size=8, top_k=1), tuner=LambdaTuner([0.0, 0.5, 1.0]))
    h = T([[1.0, 0.0]])
    comp.feedback(h, T([1.0]), T([0.5], dtype=D))  # empty memory: ê = 0, every λ scores alike
    assert list(comp.tuner.weights.values()) == pytest.approx([1 / 3] * 3)
    comp.feedback(h, T([0.0]), T([0.5], dtype=D))
    L = comp.tuner.hedge.losses
    assert L["lambda=0.5"] - L["lambda=0"] == pytest.approx(-math.log(0.25) + math.log(0.5), rel=1e-6)
    assert L["lambda=1"] - L["lambda=0"] == pytest.approx(-math.log(1e-6) + math.log(0.5), rel=1e-9)
    assert comp.tuner.weights[0.0] > 0.66


def test_fixed_lambda_is_unchanged():
    """Without ``auto`` nothing changes: outputs are ``compensate(ŷ, ê, λ)`` bit for bit, ``feedback``
    ignores ``e_hat``, and the state has exactly the keys it always had."""
    g = torch.Generator().manual_seed(0)
    comp = build_memory({"exact": {"size": 64, "top_k": 4}, "lambda": 0.3}, dim=5, seed=0)
    ref = ExactMemory(5, size=64, top_k=4, seed=0)
    assert comp.tuner is None and not comp.adaptive and comp.lam == 0.3
    for _ in range(4):
        h, p = torch.randn(16, 5, generator=g), torch.rand(16, generator=g)
        y = (torch.rand(16, generator=g) < 0.5).float()
        out = comp.predict(h, p)
        assert torch.equal(out, compensate(p, ref.estimate(h, p)[0], 0.3))
        comp.feedback(h, y, p, e_hat=torch.zeros(16))
        ref.write(h, y, p)
    assert set(comp.state_dict()) == {"lambda", "eps", "reset_on_update", "key", "memory"}


def test_leader_starts_off():
    """``select: leader`` serves the smallest λ until another is heavier: before any evidence it is
    exactly the (clipped) base model."""
    comp = Compensator(ExactMemory(3, size=16, top_k=2), tuner=LambdaTuner(select="leader"))
    comp.feedback(torch.eye(3), T([1.0, 1.0, 0.0]), T([0.2, 0.3, 0.9]), e_hat=torch.zeros(3))
    h, p = torch.eye(3), T([0.2, 0.3, 0.9])
    assert comp.lam == 0.0 and torch.equal(comp.predict(h, p), compensate(p, torch.zeros(3), 0.0))


# ---------------------------------------------------------------- a stream with a known truth


def _stream(informative: bool, seed: int, n: int, b: int):
    """Keys in 8 clusters. Informative: the base model says 0.5 everywhere while the true rate depends
    on the cluster (the memory's neighbours know it) and is 0.2 to 0.4 away from 0.5, above it in four
    clusters and below it in the other four — so there is always something to rank (uniform rates in
    [0.1, 0.9] can all land near 0.5; independent signs can all agree, e.g. seed 4657, and then rates
    0.7–0.9 leave too little to rank for a fixed margin). Noise: the base model is the truth
    (calibrated), so any compensation only adds the neighbours' sampling noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, 8, generator=g) * 3
    sign = torch.where(torch.rand(8, generator=g).argsort().argsort() < 4, -1.0, 1.0)  # four of each
    rate = 0.5 + sign * (0.2 + 0.2 * torch.rand(8, generator=g))
    for _ in range(n):
        c = torch.randint(0, 8, (b,), generator=g)
        h = centres[c] + torch.randn(b, 8, generator=g)
        if informative:
            y_hat, q = torch.full((b,), 0.5), rate[c]
        else:
            y_hat = torch.rand(b, generator=g) * 0.8 + 0.1
            q = y_hat
        yield h, y_hat, (torch.rand(b, generator=g) < q).float()


def _serve(comp: Compensator, stream, pass_e_hat: bool = True) -> tuple[float, float]:
    """Predict each batch, then feed its labels back; (served log loss, base log loss)."""
    served = base = 0.0
    for h, y_hat, y in stream:
        out, e_hat, _ = comp.predict_with_support(h, y_hat)
        served += float(log_loss(out.to(D), y).sum())
        base += float(log_loss(y_hat.to(D).clamp(1e-6, 1 - 1e-6), y).sum())
        comp.feedback(h, y, y_hat, e_hat if pass_e_hat else None)
    return served, base


def _memory(kind: str, seed: int):
    return ExactMemory(8, size=256, top_k=8) if kind == "exact" else SketchMemory(8, arrays=16, bits=4, seed=seed)


@settings(max_examples=12, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from(["exact", "sketch"]),
    st.sampled_from(["mix", "leader"]),
    st.sampled_from([16, 32]),
    st.booleans(),
)
def test_harmful_memory_switches_itself_off(seed, kind, select, b, pass_e_hat):
    """Pure-noise ê: λ stays low; the served loss is within 0.02 nats a row of the base model's (an
    empirical margin: fixed share keeps ≥ 1% of the weight on every λ, so the cost does not vanish),
    and with ``select: mix`` within the Hedge regret bound (the theorem; ``leader`` has none).

    "Low", not "≈ 0": a small λ over noise costs so little that 1,280 rows do not separate it from
    λ = 0, so the ``mix`` weights have not concentrated yet. Over 76 seeds × {exact, sketch} × {16, 32}
    the largest final λ was 0.49 (mix) and 0.2 (leader); the bounds below leave a margin over those.

    Mutation caught: estimating ê *after* writing the batch (its own labels leak into ê, so a large λ
    looks perfect and is kept)."""
    comp = Compensator(_memory(kind, seed), tuner=LambdaTuner(select=select, share=0.01))
    served, base = _serve(comp, _stream(False, seed, 40, b), pass_e_hat)
    assert comp.lam <= (0.65 if select == "mix" else 0.4)
    assert served <= base + 0.02 * 40 * b
    assert comp.tuner.hedge.losses["lambda=0"] == pytest.approx(base, rel=1e-6)
    if select == "mix":  # the served mixture is what Hedge scored: its guarantee is about the service
        assert served == pytest.approx(comp.tuner.hedge.mixture_loss, rel=1e-6)
        assert served <= base + comp.tuner.hedge.regret_bound("lambda=0") + 1e-6


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["exact", "sketch"]), st.sampled_from(["mix", "leader"]))
def test_informative_memory_is_used(seed, kind, select):
    """Cluster-level truth the base model misses: λ ends above 0.3 and the served loss beats the base."""
    comp = Compensator(_memory(kind, seed), tuner=LambdaTuner(select=select, share=0.01))
    served, base = _serve(comp, _stream(True, seed, 40, 32))
    assert comp.lam > 0.3
    assert served < base - 0.01 * 40 * 32


def test_passed_and_reread_estimates_agree_without_delay():
    """Labels that arrive right after their batch: the memory has not changed since the batch was
    served, so re-reading it gives the served ê and both modes learn the same λ."""
    a = Compensator(_memory("exact", 0), tuner=LambdaTuner())
    b = Compensator(_memory("exact", 0), tuner=LambdaTuner())
    sa, _ = _serve(a, _stream(True, 1, 10, 16), pass_e_hat=True)
    sb, _ = _serve(b, _stream(True, 1, 10, 16), pass_e_hat=False)
    assert sa == sb and a.tuner.hedge.losses == b.tuner.hedge.losses


# ---------------------------------------------------------------- no look-ahead


def test_a_batch_labels_never_reach_its_own_prediction():
    """Two runs that differ only in batch 3's labels serve batches 0..3 identically; batch 4 differs
    (the labels do move λ and the memory, once they have arrived)."""
    batches = list(_stream(True, 2, 6, 16))
    flipped = [(h, p, 1 - y) if i == 3 else (h, p, y) for i, (h, p, y) in enumerate(batches)]
    outs = []
    for stream in (batches, flipped):
        comp = Compensator(_memory("exact", 0), tuner=LambdaTuner())
        served = []
        for h, p, y in stream:
            out, e_hat, _ = comp.predict_with_support(h, p)
            served.append(out)
            comp.feedback(h, y, p, e_hat)
        outs.append(served)
    for i in range(4):
        assert torch.equal(outs[0][i], outs[1][i])
    assert not torch.equal(outs[0][4], outs[1][4])


def test_reread_estimate_excludes_the_rows_own_labels():
    """Re-read mode: the λ losses of a feedback batch equal those computed with the memory as it was
    before the write (a copy taken then), even with labels delayed so the memory moved since serving."""
    comp = Compensator(_memory("exact", 0), tuner=LambdaTuner([0.0, 0.5, 1.0]))
    batches = list(_stream(False, 3, 5, 16))
    for h, p, y in batches[:4]:
        comp.feedback(h, y, p)
    h, p, y = batches[4]
    before = copy.deepcopy(comp)
    e_before = before.memory.estimate(h, p)[0]
    expect = log_loss(before.tuner.experts(p, e_before).to(D).clamp(1e-6, 1 - 1e-6), y).sum(1)
    L0 = torch.tensor(list(comp.tuner.hedge.losses.values()), dtype=D)
    comp.feedback(h, y, p)
    L1 = torch.tensor(list(comp.tuner.hedge.losses.values()), dtype=D)
    assert torch.allclose(L1 - L0, expect, rtol=1e-9)
    after = before.memory
    after.write(h, y, p)
    leaked = log_loss(before.tuner.experts(p, after.estimate(h, p)[0]).to(D).clamp(1e-6, 1 - 1e-6), y).sum(1)
    assert not torch.allclose(L1 - L0, leaked)  # the test can tell the two apart


# ---------------------------------------------------------------- life cycle and state


def test_model_update_keeps_lambda_history_and_reset_forgets_it():
    comp = Compensator(_memory("exact", 0), tuner=LambdaTuner(), reset_on_update=True)
    _serve(comp, _stream(True, 4, 10, 16))
    w = comp.tuner.hedge.weights
    comp.on_model_update()
    assert comp.memory.n_written == 0 and torch.equal(comp.tuner.hedge.weights, w)
    comp.reset()
    assert torch.allclose(comp.tuner.hedge.weights, torch.full((11,), 1 / 11, dtype=D))


def test_state_round_trip_resumes_exactly():
    """state_dict → torch.save → load into a fresh compensator: the rest of the stream is served
    bit for bit as without the interruption."""
    cfg = {"sketch": {"arrays": 8, "bits": 4}, "lambda": "auto", "adapt": {"share": 0.05, "eta": 0.5}}
    batches = list(_stream(True, 5, 12, 16))
    a = build_memory(cfg, dim=8, seed=3)
    _serve(a, batches[:6])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_memory(cfg, dim=8, seed=3)
    b.load_state_dict(torch.load(buf, weights_only=False))
    for h, p, y in batches[6:]:
        oa, ea, _ = a.predict_with_support(h, p)
        ob, eb, _ = b.predict_with_support(h, p)
        assert torch.equal(oa, ob)
        a.feedback(h, y, p, ea)
        b.feedback(h, y, p, eb)
    assert torch.equal(a.tuner.hedge.weights, b.tuner.hedge.weights) and a.lam == b.lam
    other = build_memory({**cfg, "adapt": {"share": 0.01, "eta": 0.5}}, dim=8, seed=3)
    with pytest.raises(ValueError, match="adapt"):
        other.load_state_dict(a.state_dict())
    fixed = build_memory({**{k: v for k, v in cfg.items() if k != "adapt"}, "lambda": 0.5}, dim=8, seed=3)
    with pytest.raises(ValueError, match="lambda"):
        fixed.load_state_dict(a.state_dict())


# ---------------------------------------------------------------- config


def test_config_auto_and_adapt():
    cfg = MemoryConfig.parse({"exact": {}, "lambda": "auto"})
    assert cfg.adaptive and cfg.adapt is None
    comp = build_memory(cfg, dim=4, seed=0)
    assert comp.adaptive and comp.tuner.grid == DEFAULT_GRID and comp.tuner.select == "mix"
    assert (comp.tuner.hedge.eta, comp.tuner.hedge.share) == (1.0, 0.0)
    cfg = MemoryConfig.parse(
        {"exact": {}, "lambda": "auto", "adapt": {"grid": [0, 0.3], "eta": 0.5, "share": 0.0, "select": "leader"}}
    )
    comp = build_memory(cfg, dim=4, seed=0)
    assert (comp.tuner.grid, comp.tuner.hedge.eta, comp.tuner.hedge.share, comp.tuner.select) == (
        (0.0, 0.3),
        0.5,
        0.0,
        "leader",
    )
    assert cfg.to_dict()["lambda"] == "auto" and cfg.to_dict()["adapt"]["grid"] == [0.0, 0.3]
    assert MemoryConfig.parse({"exact": {}, "lambda": 1}).lam == 1.0


@pytest.mark.parametrize(
    "data, key",
    [
        ({"exact": {}, "lambda": "automatic"}, "memory.lambda"),
        ({"exact": {}, "lambda": True}, "memory.lambda"),
        ({"exact": {}, "lambda": -0.1}, "memory.lambda"),
        ({"exact": {}, "adapt": {}}, "memory.adapt: only with lambda: auto"),
        ({"exact": {}, "lambda": 0.4, "adapt": {"eta": 1}}, "memory.adapt: only with lambda: auto"),
        ({"exact": {}, "lambda": "auto", "adapt": {"grid": [0, 1.2]}}, "memory.adapt.grid"),
        ({"exact": {}, "lambda": "auto", "adapt": {"grid": [0, 0]}}, "memory.adapt.grid"),
        ({"exact": {}, "lambda": "auto", "adapt": {"grid": []}}, "memory.adapt.grid"),
        ({"exact": {}, "lambda": "auto", "adapt": {"eta": 0}}, "memory.adapt.eta"),
        ({"exact": {}, "lambda": "auto", "adapt": {"share": 1}}, "memory.adapt.share"),
        ({"exact": {}, "lambda": "auto", "adapt": {"select": "best"}}, "memory.adapt.select"),
        ({"exact": {}, "lambda": "auto", "adapt": {"halflife": 3}}, "memory.adapt.halflife"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MemoryConfig.parse({"memory": data})


def test_tuner_arguments():
    with pytest.raises(ValueError, match="grid"):
        LambdaTuner([0.0, 0.0])
    with pytest.raises(ValueError, match="grid"):
        LambdaTuner([])
    with pytest.raises(ValueError, match="select"):
        LambdaTuner(select="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        Compensator(ExactMemory(2), tuner=LambdaTuner(eps=1e-3))
    comp = Compensator(ExactMemory(2), tuner=LambdaTuner())
    with pytest.raises(ValueError, match="e_hat"):
        comp.feedback(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), e_hat=torch.zeros(2))


# ---------------------------------------------------------------- select: auc (ranking-based λ)


def test_rank_auc_by_hand():
    from reloop.memory.compensate import rank_auc

    assert rank_auc(T([0.1, 0.4, 0.35, 0.8]), T([0, 0, 1, 1])) == pytest.approx(0.75)
    assert rank_auc(T([0.5, 0.5]), T([0, 1])) == pytest.approx(0.5)  # a tie counts one half
    assert math.isnan(rank_auc(T([0.2, 0.3]), T([1, 1])))


def _serve_auc(comp: Compensator, stream) -> tuple[float, float, list[Tensor], list[float]]:
    """Served and base AUC over the whole stream, the served batches and λ before each batch."""
    from reloop.memory.compensate import rank_auc

    outs, bases, ys, lams = [], [], [], []
    for h, y_hat, y in stream:
        lams.append(comp.lam)
        out, e_hat, _ = comp.predict_with_support(h, y_hat)
        outs.append(out)
        bases.append(y_hat)
        ys.append(y)
        comp.feedback(h, y, y_hat, e_hat)
    y_all = torch.cat(ys)
    return rank_auc(torch.cat(outs), y_all), rank_auc(torch.cat(bases), y_all), outs, lams


Tensor = torch.Tensor


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["exact", "sketch"]))
def test_auc_select_backs_off_a_memory_that_hurts_the_ranking(seed, kind):
    """Noise ê on a calibrated base model: λ starts at 0 (off until min_rows), and the served ranking
    stays within 0.02 AUC of the base model's — a wrong switch-on on 1,024 noisy rows costs a little
    (the worst of 870 seeds × memories measured: −0.013) — where always-on compensation (λ = 1, exact
    memory) loses more than 0.1 (−0.21 at best over 435 seeds) (fails if λ is never switched off)."""
    comp = Compensator(_memory(kind, seed), tuner=LambdaTuner(select="auc", window=1024, min_rows=64))
    served, base, outs, lams = _serve_auc(comp, _stream(False, seed, 40, 32))
    assert lams[0] == 0.0 and lams[1] == 0.0  # 32 rows < min_rows: still off
    assert served >= base - 0.02
    if kind == "exact":
        always, _, _, _ = _serve_auc(Compensator(_memory(kind, seed), lam=1.0), _stream(False, seed, 40, 32))
        assert always < base - 0.1


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["exact", "sketch"]))
def test_auc_select_uses_a_memory_that_helps_the_ranking(seed, kind):
    """Cluster-level truth the base model misses (it says 0.5 everywhere, AUC exactly 0.5): λ* > 0 and
    the served AUC beats the base model's by more than 0.05 (the first min_rows rows are served uncompensated)."""
    comp = Compensator(_memory(kind, seed), tuner=LambdaTuner(select="auc", window=512, min_rows=64))
    served, base, _, lams = _serve_auc(comp, _stream(True, seed, 40, 32))
    assert lams[-1] > 0.0
    assert served > base + 0.05


def test_auc_select_never_uses_a_batch_labels_for_its_own_prediction_and_resumes_exactly():
    """Two runs that differ only in batch 10's labels serve batches 0..10 identically; a tuner saved
    after batch 20 and restored serves the rest bit for bit like the uninterrupted one."""
    batches = list(_stream(True, 3, 30, 32))
    flipped = [(h, p, 1 - y) if i == 10 else (h, p, y) for i, (h, p, y) in enumerate(batches)]

    def make() -> Compensator:
        return Compensator(_memory("exact", 0), tuner=LambdaTuner(select="auc", window=256, min_rows=64))

    _, _, a, _ = _serve_auc(make(), iter(batches))
    _, _, b, _ = _serve_auc(make(), iter(flipped))
    assert all(torch.equal(x, y) for x, y in zip(a[:11], b[:11]))
    assert not all(torch.equal(x, y) for x, y in zip(a[11:], b[11:]))
    first = make()
    _serve_auc(first, iter(batches[:20]))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make()
    second.load_state_dict(torch.load(buf, weights_only=True))
    _, _, rest, _ = _serve_auc(second, iter(batches[20:]))
    assert all(torch.equal(x, y) for x, y in zip(rest, a[20:]))


def test_auc_select_from_the_config():
    mem = MemoryConfig.parse(
        {"exact": {"size": 64, "top_k": 8}, "lambda": "auto", "adapt": {"select": "auc", "window": 256, "min_rows": 32}}
    )
    comp = build_memory(mem, dim=8, seed=0)
    assert comp.tuner is not None and comp.tuner.select == "auc" and comp.tuner.window == 256
    assert comp.lam == 0.0
