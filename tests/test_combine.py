"""Hedge / exponentially weighted averaging of experts' probabilities (reloop.combine)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reloop.combine import CombineOptions, Hedge, HedgeOptions, log_loss

T = torch.tensor

# ---------------------------------------------------------------- unit: hand-computed


def test_weights_after_two_updates_by_hand():
    """η = 0.5 makes w_k ∝ Π sqrt(p_k(y)): after (0.8, 0.4 | y=1) and (0.3, 0.6 | y=0),
    w_a ∝ sqrt(0.8·0.7), w_b ∝ sqrt(0.4·0.4) = 0.4."""
    h = Hedge(["a", "b"], eta=0.5)
    assert torch.allclose(h.weights, T([0.5, 0.5], dtype=torch.float64))
    p1, p2 = T([[0.8], [0.4]], dtype=torch.float64), T([[0.3], [0.6]], dtype=torch.float64)
    assert h.predict(p1).item() == pytest.approx(0.6)
    ell1 = h.update(p1, T([1.0]))
    assert ell1.tolist() == pytest.approx([-math.log(0.8), -math.log(0.4)])
    wa1 = math.sqrt(0.8) / (math.sqrt(0.8) + math.sqrt(0.4))
    assert h.weights[0].item() == pytest.approx(wa1, rel=1e-12)
    served2 = wa1 * 0.3 + (1 - wa1) * 0.6
    assert h.predict(p2).item() == pytest.approx(served2, rel=1e-6)
    h.update(p2, T([0.0]))
    wa2 = math.sqrt(0.56) / (math.sqrt(0.56) + 0.4)
    assert h.weights[0].item() == pytest.approx(wa2, rel=1e-12)  # 0.651669...
    assert h.weights.sum().item() == pytest.approx(1.0, abs=1e-15)
    # the mixture is charged what it served, each batch under the weights before its update
    assert h.mixture_loss == pytest.approx(-math.log(0.6) - math.log(1 - served2), rel=1e-12)
    assert h.losses == pytest.approx({"a": -math.log(0.8 * 0.7), "b": -math.log(0.4 * 0.4)})
    assert (h.rows, h.updates) == (2, 2)


def test_fixed_share_by_hand():
    """α = 0.2: after the exponential step, w ← 0.8·w + 0.2·π (π uniform)."""
    h = Hedge(["a", "b"], eta=1.0, share=0.2)
    h.update(T([[0.9], [0.1]], dtype=torch.float64), T([1.0]))  # v = (0.9, 0.1)
    assert h.weights.tolist() == pytest.approx([0.8 * 0.9 + 0.1, 0.8 * 0.1 + 0.1], rel=1e-12)
    h.update(T([[0.9], [0.1]], dtype=torch.float64), T([1.0]))
    v = torch.tensor([0.82 * 0.9, 0.18 * 0.1], dtype=torch.float64)
    v = v / v.sum()
    assert h.weights.tolist() == pytest.approx((0.8 * v + 0.1).tolist(), rel=1e-12)


def test_prior_and_batch_loss():
    h = Hedge(["a", "b", "c"], eta=1.0, prior=[2.0, 1.0, 1.0])
    assert h.weights.tolist() == pytest.approx([0.5, 0.25, 0.25])
    probs = T([[0.9, 0.2], [0.5, 0.5], [0.1, 0.8]])
    y = T([1.0, 0.0])
    ell = h.update(probs, y)
    assert ell.tolist() == pytest.approx(log_loss(probs.double(), y).sum(1).tolist())
    expect = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64) * torch.exp(-ell)
    assert torch.allclose(h.weights, expect / expect.sum())


def test_predict_reads_only_and_update_charges_the_served_mixture():
    """Batch semantics: ``predict`` never moves the weights; the batch's ``update`` scores the mixture
    under the weights that served it (mutation: scoring after the step would make the loss smaller)."""
    g = torch.Generator().manual_seed(0)
    h = Hedge(["a", "b", "c"], eta=1.0)
    h.update(torch.rand(3, 8, generator=g), (torch.rand(8, generator=g) < 0.5).double())
    w = h.weights
    probs = torch.rand(3, 16, generator=g)
    y = (torch.rand(16, generator=g) < 0.5).double()
    served = h.predict(probs)
    assert torch.equal(h.weights, w)
    assert torch.equal(h.predict(probs), served)
    before = h.mixture_loss
    h.update(probs, y)
    assert h.mixture_loss - before == pytest.approx(float(log_loss(served.double(), y).sum()), rel=1e-6)


def test_state_round_trip_is_exact():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(3, 5, generator=g), (torch.rand(5, generator=g) < 0.4).double()) for _ in range(6)]
    a = Hedge(["x", "y", "z"], eta=0.7, share=0.05)
    for p, y in batches[:3]:
        a.update(p, y)
    b = Hedge(["x", "y", "z"], eta=0.7, share=0.05)
    b.load_state_dict(a.state_dict())
    for p, y in batches[3:]:
        assert torch.equal(a.predict(p), b.predict(p))
        a.update(p, y)
        b.update(p, y)
    assert torch.equal(a.weights, b.weights) and a.losses == b.losses
    assert (a.mixture_loss, a.guarantee()) == (b.mixture_loss, b.guarantee())
    with pytest.raises(ValueError, match="eta"):
        Hedge(["x", "y", "z"], eta=1.0, share=0.05).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="names"):
        Hedge(["x", "z", "y"], eta=0.7, share=0.05).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"names": []}, "names"),
        ({"names": ["a", "a"]}, "unique"),
        ({"eta": 0.0}, "eta"),
        ({"eta": math.inf}, "eta"),
        ({"eps": 0.5}, "eps"),
        ({"share": 1.0}, "share"),
        ({"prior": [1.0, 0.0]}, "prior"),
        ({"prior": [1.0]}, "prior"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hedge(**{"names": ["a", "b"], **kwargs})


def test_bad_inputs():
    h = Hedge(["a", "b"])
    with pytest.raises(ValueError, match=r"probs: expected a tensor \[2, B\]"):
        h.predict(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="y: expected shape"):
        h.update(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="y: values"):
        h.update(torch.zeros(2, 2), T([0.0, 2.0]))
    assert h.update(torch.zeros(2, 0), torch.zeros(0)).tolist() == [0.0, 0.0]
    assert h.updates == 0


# ---------------------------------------------------------------- properties: the regret bounds

prob = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 1e-300, 1 - 1e-16]))


@st.composite
def rounds(draw, max_k: int = 5, max_t: int = 25, max_b: int = 1):
    k = draw(st.integers(1, max_k))
    t = draw(st.integers(1, max_t))
    out = []
    for _ in range(t):
        b = draw(st.integers(1, max_b))
        p = T([[draw(prob) for _ in range(b)] for _ in range(k)], dtype=torch.float64)
        y = T([float(draw(st.integers(0, 1))) for _ in range(b)], dtype=torch.float64)
        out.append((p, y))
    return k, out


def _run(h: Hedge, seq) -> None:
    for p, y in seq:
        served = h.predict(p)
        assert torch.isfinite(served).all() and bool(((served > 0) & (served < 1)).all())
        h.update(p, y)
        w = h.weights
        assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(rounds())
def test_bayes_mixture_regret_at_most_ln_k(case):
    """η = 1, one row per update (the classical mixture of probabilities): L_mix ≤ min_k L_k + ln K."""
    k, seq = case
    h = Hedge([f"e{i}" for i in range(k)], eta=1.0)
    _run(h, seq)
    assert h.mixture_loss <= min(h.losses.values()) + math.log(k) + 1e-9
    assert h.guarantee() <= min(h.losses.values()) + math.log(k) + 1e-9


@settings(max_examples=100, deadline=None)
@given(rounds(max_b=6), st.floats(0.05, 1.0))
def test_batched_exp_concave_regret(case, scale):
    """Updates of up to B rows with η ≤ 1/B: L_mix ≤ min_k L_k + ln K / η."""
    k, seq = case
    b_max = max(p.shape[1] for p, _ in seq)
    eta = scale / b_max
    h = Hedge([f"e{i}" for i in range(k)], eta=eta)
    _run(h, seq)
    assert h.mixture_loss <= min(h.losses.values()) + math.log(k) / eta + 1e-7


@settings(max_examples=100, deadline=None)
@given(rounds(max_b=6), st.floats(0.01, 20.0), st.sampled_from([0.0, 0.01, 0.3]), st.sampled_from([1e-6, 1e-2]))
def test_any_eta_any_batch_stays_under_the_stated_guarantee(case, eta, share, eps):
    """Bound (a) (Hoeffding) for every η, batch size and share rate; bound (b) whenever η·B ≤ 1."""
    k, seq = case
    h = Hedge([f"e{i}" for i in range(k)], eta=eta, share=share, eps=eps)
    _run(h, seq)
    assert h.mixture_loss <= h.guarantee() + 1e-7
    if share > 0:  # fixed share keeps at least α·π_k on every expert
        assert bool((h.weights >= share / k * (1 - 1e-9)).all())


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 6),
    st.floats(1e3, 1e9),
    st.lists(st.sampled_from([0.0, 1.0, math.nan, math.inf, -math.inf, 1e-320]), min_size=2, max_size=12),
)
def test_weights_stay_finite_with_extreme_inputs(k, eta, values):
    """Certain-and-wrong experts, NaN/inf scores (a diverged model) and a huge η keep the weights a
    finite distribution and the mixture strictly inside (0, 1)."""
    h = Hedge([f"e{i}" for i in range(k)], eta=eta, eps=1e-12)
    for i in range(len(values)):
        p = T([[values[(i + j) % len(values)]] * 3 for j in range(k)], dtype=torch.float64)
        y = T([float(i % 2)] * 3)
        served = h.predict(p)
        assert torch.isfinite(served).all() and bool(((served > 0) & (served < 1)).all())
        h.update(p, y)
        assert torch.isfinite(h.weights).all()
        assert h.weights.sum().item() == pytest.approx(1.0, abs=1e-9)
        assert math.isfinite(h.mixture_loss)


# ---------------------------------------------------------------- simulation


def _stream(n_batches: int, b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        q = torch.rand(b, generator=g) * 0.8 + 0.1  # true click probabilities
        y = (torch.rand(b, generator=g) < q).double()
        yield q, y, g


def test_mixture_tracks_the_best_expert_and_drops_the_bad_one():
    """Experts: the truth plus noise (best), a constant (mediocre), the truth reversed (bad)."""
    h = Hedge(["good", "const", "bad"], eta=1.0)
    served_loss = 0.0
    for q, y, g in _stream(40, 64, seed=3):
        good = (q + 0.05 * torch.randn(q.shape, generator=g)).clamp(0.01, 0.99)
        probs = torch.stack([good, torch.full_like(q, 0.5), 1 - q])
        served_loss += float(log_loss(h.predict(probs).double(), y).sum())
        h.update(probs, y)
    L = h.losses
    assert served_loss == pytest.approx(h.mixture_loss, rel=1e-5)
    assert L["good"] < L["const"] < L["bad"]
    assert h.weights[0].item() > 0.999 and h.weights[2].item() < 1e-6
    # within one batch's worth of loss of the best expert: the first batch is served uniformly
    assert h.mixture_loss - L["good"] < 0.4 * 64
    assert h.mixture_loss < L["const"] - 0.05 * h.rows


def _switching(hedges, n=40, b=64, seed=5):
    """The good and the bad expert swap halfway (drift); returns the switching sequence's loss."""
    best = 0.0
    for i, (q, y, _) in enumerate(_stream(n, b, seed)):
        good, bad = q, (q + 0.4).clamp(max=0.99)
        probs = torch.stack([good, bad] if i < n // 2 else [bad, good])
        best += float(log_loss(good.double(), y).sum())
        for h in hedges:
            h.update(probs, y)
    return best


def test_fixed_share_follows_a_switch_that_plain_hedge_misses():
    """Fixed share (α = 0.05) pays about ln(K/α) nats per switch; plain Hedge must first lose back the
    whole first half's loss gap before it moves to the new best expert."""
    plain, shared = Hedge(["A", "B"], eta=1.0), Hedge(["A", "B"], eta=1.0, share=0.05)
    best = _switching([plain, shared])
    assert plain.mixture_loss - best > 500.0
    assert shared.mixture_loss - best < 64 * math.log(2)  # about one batch served half-wrong


def test_fixed_share_switching_bound():
    """Regret against the best sequence with m = 1 switch over T updates, in the exp-concave regime
    (η·B = 1): L_mix ≤ L_seq + [ln K + m·ln(K/α) + (T − m − 1)·ln(1/(1 − α))] / η."""
    b, n, alpha = 16, 30, 0.05
    h = Hedge(["A", "B"], eta=1.0 / b, share=alpha)
    best = _switching([h], n=n, b=b)
    bound = (math.log(2) + math.log(2 / alpha) + (n - 2) * -math.log1p(-alpha)) * b
    assert h.mixture_loss <= best + bound
    assert h.mixture_loss > best  # not vacuous: the mixture does pay for the switch


# ---------------------------------------------------------------- config


def test_options_parse_and_build():
    opts = CombineOptions.model_validate({"experts": ["IU", "ReLoop2"], "hedge": {"eta": 0.5, "share": 0.01}})
    h = opts.build(opts.experts)
    assert (h.names, h.eta, h.share, h.eps) == (("IU", "ReLoop2"), 0.5, 0.01, 1e-6)
    assert CombineOptions.model_validate({}).hedge == HedgeOptions()
    for bad in (
        {"hedge": {"etta": 1}},
        {"hedge": {"eta": 0}},
        {"hedge": {"eps": 0.5}},
        {"experts": []},
        {"experts": ["IU", "IU"]},
        {"weights": 1},
        {"hedge": {"eta": "inf"}},
    ):
        with pytest.raises(ValueError):
            CombineOptions.model_validate(bad)


def test_named_prior_weights_by_hand():
    """``prior: {IU: 4}`` over five experts: π_IU = 4/8, each other 1/8; the bound against IU is ln 2 / η."""
    opts = HedgeOptions.model_validate({"eta": 0.5, "prior": {"IU": 4}})
    h = opts.build(["combined", "IU", "a", "b", "c"])
    assert h.weights.tolist() == pytest.approx([0.125, 0.5, 0.125, 0.125, 0.125], abs=1e-12)
    assert h.regret_bound("IU") == pytest.approx(math.log(2) / 0.5)
    assert h.regret_bound("a") == pytest.approx(math.log(8) / 0.5)
    # the prior is part of the configuration a saved state must match
    other = HedgeOptions.model_validate({"eta": 0.5}).build(["combined", "IU", "a", "b", "c"])
    with pytest.raises(ValueError, match="log_prior"):
        other.load_state_dict(h.state_dict())


def test_prior_errors_name_the_field():
    from reloop.config import ConfigError, parse_config

    def cfg(prior: object) -> dict:
        return {
            "data": {"source": "synthetic"},
            "runs": {
                "IU": {"update": "incremental"},
                "mix": {"update": "incremental", "combine": {"hedge": {"prior": prior}}},
            },
        }

    with pytest.raises(ConfigError, match=r"runs\.mix\.combine\.hedge\.prior: \['IUx'\] are not experts"):
        parse_config(cfg({"IUx": 2}))
    with pytest.raises(ConfigError, match=r"runs\.mix\.combine\.hedge\.prior"):
        parse_config(cfg({"IU": 0}))
    with pytest.raises(ConfigError, match=r"runs\.mix\.combine\.hedge\.prior"):
        parse_config(cfg({"IU": float("nan")}))
    got = parse_config(cfg({"mix": 1, "IU": 3}))
    assert got.runs["mix"].combine is not None
    assert got.runs["mix"].combine.build(["mix", "IU"]).weights.tolist() == pytest.approx([0.25, 0.75])
