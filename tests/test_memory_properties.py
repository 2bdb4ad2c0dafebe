"""Property tests of the error memories: fixed size, bounded outputs, agreement between memories."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reloop.memory import ExactMemory, SketchMemory, compensate

FAST = settings(max_examples=15, deadline=None)


def _data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn((n, d), generator=g),
        torch.bernoulli(torch.full((n,), 0.3), generator=g),
        torch.rand(n, generator=g),
    )


def _shapes(mem) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in mem.state_dict().items() if isinstance(v, torch.Tensor)}


@settings(max_examples=4, deadline=None)
@given(
    arrays=st.integers(1, 16),
    bits=st.integers(0, 10),
    similarity=st.sampled_from(["density", "centroid"]),
    decay=st.sampled_from([1.0, 0.999]),
)
def test_sketch_bytes_fixed_after_a_million_writes(arrays, bits, similarity, decay):
    mem = SketchMemory(8, arrays=arrays, bits=bits, similarity=similarity, decay=decay)
    nbytes, shapes = mem.nbytes, _shapes(mem)
    expected = arrays * bits * 8 * 4 + 3 * arrays * 2**bits * 8  # planes f32 + (n, Σy, Σŷ) f64
    if similarity == "centroid":
        expected += arrays * 2**bits * 8 * 4  # Σh f32
    assert nbytes == expected
    h, y, y_hat = _data(10_000, 8, 0)
    for _ in range(100):
        mem.write(h, y, y_hat)
    assert mem.n_written == 1_000_000
    assert mem.nbytes == nbytes and _shapes(mem) == shapes
    e, support = mem.estimate(h[:100], y_hat[:100])
    assert torch.isfinite(e).all() and (support == arrays).all()  # written keys hit full buckets


@FAST
@given(
    arrays=st.integers(1, 12),
    bits=st.integers(0, 10),
    d=st.integers(1, 12),
    similarity=st.sampled_from(["density", "centroid"]),
    decay=st.sampled_from([1.0, 0.9]),
    batches=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    seed=st.integers(0, 9),
)
def test_sketch_state_shapes_and_bytes_never_change(arrays, bits, d, similarity, decay, batches, seed):
    mem = SketchMemory(d, arrays=arrays, bits=bits, similarity=similarity, decay=decay, seed=seed)
    nbytes, shapes = mem.nbytes, _shapes(mem)
    for i, n in enumerate(batches):
        mem.write(*_data(n, d, seed + i))
        assert mem.nbytes == nbytes and _shapes(mem) == shapes
    assert mem.n_written == sum(batches)
    h, _, y_hat = _data(50, d, 123)
    e, support = mem.estimate(h, y_hat)
    # γ = 1: ŷ + ê = ȳ, a convex combination of labels, so it lies in [0, 1].
    assert ((y_hat.double() + e.double()) >= -1e-6).all() and ((y_hat + e) <= 1 + 1e-6).all()
    assert ((support >= 0) & (support <= arrays)).all()
    if sum(batches):
        assert (support > 0).any() or bits > 0


@settings(max_examples=60, deadline=None)
@given(lam=st.floats(0.0, 1.0), data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_compensate_strictly_inside_unit_interval(lam, data, dtype):
    n = data.draw(st.integers(1, 30))
    y_hat = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)), dtype=dtype)
    e_hat = torch.tensor(data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n)), dtype=dtype)
    out = compensate(y_hat, e_hat, lam)
    assert bool((out > 0).all()) and bool((out < 1).all())
    assert torch.isfinite(-torch.log(out)).all() and torch.isfinite(-torch.log1p(-out)).all()


@FAST
@given(
    n=st.integers(1, 200),
    d=st.integers(1, 8),
    decay=st.sampled_from([1.0, 0.7]),
    gamma=st.floats(0.0, 1.0),
    splits=st.integers(1, 4),
    seed=st.integers(0, 99),
)
def test_exact_all_neighbours_agrees_with_global_sketch(n, d, decay, gamma, splits, seed):
    """k = M with τ → ∞ and an L = 0 sketch both average every sample with weight ρ^age."""
    sketch = SketchMemory(d, arrays=3, bits=0, gamma=gamma, decay=decay)
    exact = ExactMemory(d, size=n, top_k=n, gamma=gamma, decay=decay, temperature=1e12)
    h, y, y_hat = _data(n, d, seed)
    for part in torch.arange(n).chunk(splits):
        sketch.write(h[part], y[part], y_hat[part])
        exact.write(h[part], y[part], y_hat[part])
    q, _, y_q = _data(5, d, seed + 1)
    e_s, _ = sketch.estimate(q, y_q)
    e_x, _ = exact.estimate(q, y_q)
    assert torch.allclose(e_s, e_x, atol=1e-5)


@FAST
@given(seed=st.integers(0, 99), bits=st.integers(0, 6), kind=st.sampled_from(["sketch", "exact"]))
def test_state_round_trip_and_no_label_leakage(seed, bits, kind):
    def make():
        if kind == "sketch":
            return SketchMemory(5, arrays=6, bits=bits, seed=seed, gamma=0.5)
        return ExactMemory(5, size=40, top_k=7, gamma=0.5)

    mem = make()
    mem.write(*_data(60, 5, seed))
    q, _, y_q = _data(20, 5, seed + 1)
    e1, s1 = mem.estimate(q, y_q)
    clone = make()
    clone.load_state_dict(mem.state_dict())
    e2, s2 = clone.estimate(q, y_q)
    assert torch.equal(e1, e2) and torch.equal(s1, s2)
    # The query batch's labels only matter once written.
    e3, _ = mem.estimate(q, y_q)
    assert torch.equal(e1, e3)
    mem.write(q, torch.ones(20), y_q)
    clone.write(q, torch.zeros(20), y_q)
    assert (mem.estimate(q, y_q)[0] > clone.estimate(q, y_q)[0]).all()


@FAST
@given(seed=st.integers(0, 99), cut=st.integers(0, 300))
def test_sketch_write_is_order_and_batching_invariant(seed, cut):
    h, y, y_hat = _data(300, 8, seed)
    one, two = SketchMemory(8, arrays=5, bits=4), SketchMemory(8, arrays=5, bits=4)
    one.write(h, y, y_hat)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(seed))
    two.write(h[perm[:cut]], y[perm[:cut]], y_hat[perm[:cut]])
    two.write(h[perm[cut:]], y[perm[cut:]], y_hat[perm[cut:]])
    assert torch.allclose(one.acc, two.acc, atol=1e-9)


@FAST
@given(
    arrays=st.integers(1, 20),
    bits=st.integers(0, 12),
    gamma=st.sampled_from([1.0, 0.5]),
    decay=st.sampled_from([1.0, 0.8]),
    temperature=st.sampled_from([0.01, 0.1, 2.0]),
    written=st.integers(1, 400),
    seed=st.integers(0, 9),
    accum=st.sampled_from([torch.float64, torch.float32]),
)
def test_sketch_fused_estimate_equals_the_masked_softmax(arrays, bits, gamma, decay, temperature, written, seed, accum):
    """The density fast path (closed-form removal of empty buckets) against the generic masked
    softmax over ``_retrieve``'s neighbours, with sparse memories (many empty buckets) included."""
    from reloop.memory.base import ErrorMemory

    mem = SketchMemory(
        6, arrays=arrays, bits=bits, gamma=gamma, decay=decay, temperature=temperature, seed=seed, accum_dtype=accum
    )
    for i in range(3):
        mem.write(*_data(written, 6, seed + i))
    h, _, y_hat = _data(700, 6, 99)
    e, support = mem.estimate(h, y_hat.double())
    keys = mem._centred(mem._check_h(h))
    e_ref, s_ref = ErrorMemory._estimate_block(mem, keys, y_hat.double())
    assert torch.equal(support, s_ref)
    assert torch.allclose(e, e_ref.to(e.dtype), rtol=0, atol=1e-9 if accum == torch.float64 else 1e-5)
    assert (e[support == 0] == 0).all()
