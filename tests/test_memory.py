"""Hand-checked behaviour of the ReLoop2 error memories, the compensator and the config block."""

from __future__ import annotations

import math

import pytest
import torch

from reloop.memory import (
    Compensator,
    ExactMemory,
    MemoryConfig,
    SketchMemory,
    build_memory,
    compensate,
)

T = torch.tensor


def f64(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# Four samples whose errors y - ŷ are 0.5, -0.25, 0.25, 0.5: mean error 0.25, mean label 0.75.
Y4 = f64(1, 0, 1, 1)
YH4 = f64(0.5, 0.25, 0.75, 0.5)


def keys(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, d), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- sketch: global statistics
def test_sketch_no_bits_gamma0_is_global_mean_error():
    mem = SketchMemory(6, arrays=5, bits=0, gamma=0.0)
    mem.write(keys(2), Y4[:2], YH4[:2])
    mem.write(keys(2, seed=1), Y4[2:], YH4[2:])
    e, support = mem.estimate(keys(3, seed=2), f64(0.1, 0.5, 0.9))
    assert torch.allclose(e, f64(0.25, 0.25, 0.25))
    assert support.tolist() == [5, 5, 5]  # one (the global) bucket per array


def test_sketch_no_bits_gamma1_is_mean_label_minus_query_prediction():
    mem = SketchMemory(6, arrays=3, bits=0)  # gamma defaults to 1, the paper's setting
    mem.write(keys(4), Y4, YH4)
    e, _ = mem.estimate(keys(2, seed=3), f64(0.1, 0.9))
    assert torch.allclose(e, f64(0.75 - 0.1, 0.75 - 0.9))


def test_sketch_buckets_range_and_scale_invariance():
    mem = SketchMemory(6, arrays=7, bits=5, seed=3)
    h = keys(50)
    b = mem.buckets(h)
    assert b.shape == (50, 7) and int(b.min()) >= 0 and int(b.max()) < 32
    assert torch.equal(mem.buckets(3.0 * h), b)  # SimHash only sees directions
    assert torch.equal(SketchMemory(6, arrays=7, bits=5, seed=3).planes, mem.planes)
    assert not torch.equal(SketchMemory(6, arrays=7, bits=5, seed=4).planes, mem.planes)
    assert mem.planes.shape == (7, 5, 6)


def _two_plane_sketch(**kw) -> SketchMemory:
    """Array 0 hashes on the sign of x, array 1 on the sign of y (d = 2, L = 1)."""
    mem = SketchMemory(2, arrays=2, bits=1, **kw)
    mem.planes.copy_(T([[[1.0, 0.0]], [[0.0, 1.0]]]))
    mem.write(T([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]), f64(1, 0, 1), f64(0.2, 0.4, 0.6))
    return mem


def test_sketch_hand_computed_attention():
    mem = _two_plane_sketch(gamma=0.5, temperature=0.1)
    # Query (1, -1): array 0 hits x>0 = samples {0, 1}: n=2, ȳ=0.5, ŷ=0.3, s=2/3;
    #                array 1 hits y<0 = sample {1}:    n=1, ȳ=0,   ŷ=0.4, s=1/3.
    h = T([[1.0, -1.0]])
    nb = mem.neighbours(h)
    assert torch.allclose(nb.s, f64(2 / 3, 1 / 3)[None])
    assert torch.allclose(nb.y, f64(0.5, 0.0)[None])
    assert torch.allclose(nb.y_base, f64(0.3, 0.4)[None])
    a0 = math.exp(20 / 3) / (math.exp(20 / 3) + math.exp(10 / 3))
    y_bar, y_bar_base = a0 * 0.5, a0 * 0.3 + (1 - a0) * 0.4
    expected = 0.5 * (y_bar - 0.2) + 0.5 * (y_bar - y_bar_base)
    e, support = mem.estimate(h, f64(0.2))
    assert e.item() == pytest.approx(expected, abs=1e-12)
    assert support.item() == 2


def test_sketch_empty_bucket_is_masked():
    mem = SketchMemory(2, arrays=2, bits=1)
    mem.planes.copy_(T([[[1.0, 0.0]], [[0.0, 1.0]]]))
    mem.write(T([[1.0, 1.0]]), f64(1), f64(0.25))
    # (1, -1) hits the written bucket in array 0 only; array 1's bucket y<0 is empty.
    nb = mem.neighbours(T([[1.0, -1.0]]))
    assert nb.valid.tolist() == [[True, False]]
    e, support = mem.estimate(T([[1.0, -1.0], [-1.0, -1.0]]), f64(0.5, 0.5))
    assert support.tolist() == [1, 0]
    assert e.tolist() == pytest.approx([0.5, 0.0])  # no neighbour at all: no correction


def test_sketch_centroid_similarity_is_cosine_to_bucket_mean():
    mem = SketchMemory(3, arrays=2, bits=0, similarity="centroid")
    h = T([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    mem.write(h, f64(1, 0), f64(0.5, 0.5))
    q = T([[1.0, 1.0, 1.0]])
    centre = h.mean(0)
    cos = torch.nn.functional.cosine_similarity(q, centre[None]).item()
    assert mem.neighbours(q).s[0].tolist() == pytest.approx([cos, cos], rel=1e-6)
    assert mem.nbytes == 3 * 2 * 8 + 2 * 3 * 4  # n,Σy,Σŷ (float64) + Σh (float32); no planes


# ---------------------------------------------------------------- exact memory
def test_exact_full_topk_large_temperature_gamma0_is_buffer_mean_error():
    mem = ExactMemory(6, size=4, top_k=4, temperature=1e9, gamma=0.0)
    mem.write(keys(4), Y4, YH4)
    e, support = mem.estimate(keys(3, seed=5), f64(0.3, 0.6, 0.9))
    assert torch.allclose(e, f64(0.25, 0.25, 0.25), atol=1e-7)
    assert support.tolist() == [4, 4, 4]


def test_exact_ring_buffer_overwrites_oldest():
    mem = ExactMemory(6, size=3, top_k=3, temperature=1e9, gamma=0.0)
    y = f64(1, 1, 0, 0, 1)
    yh = f64(0, 0, 0.5, 0.5, 0.5)
    mem.write(keys(2), y[:2], yh[:2])
    mem.write(keys(3, seed=1), y[2:], yh[2:])
    assert mem.filled == 3 and mem.n_written == 5
    assert sorted(mem.labels.tolist()) == [0.0, 0.0, 1.0]  # samples 2, 3, 4 survive
    e, _ = mem.estimate(keys(1, seed=9), f64(0.5))
    assert e.item() == pytest.approx((-0.5 - 0.5 + 0.5) / 3, abs=1e-6)
    # An oversized batch keeps its last `size` samples.
    mem.write(keys(7, seed=2), f64(0, 0, 0, 0, 1, 1, 1), f64(0, 0, 0, 0, 0, 0, 0))
    assert mem.labels.tolist() == [1.0, 1.0, 1.0]


def test_exact_hand_computed_attention():
    mem = ExactMemory(2, size=3, top_k=3, temperature=0.5)
    r = 1 / math.sqrt(2)
    mem.write(T([[1.0, 0.0], [0.0, 3.0], [r, r]]), f64(1, 0, 1), f64(0.5, 0.5, 0.5))
    nb = mem.neighbours(T([[2.0, 0.0]]))
    order = torch.argsort(nb.s[0], descending=True)
    assert nb.s[0, order].tolist() == pytest.approx([1.0, r, 0.0], abs=1e-6)
    w = [math.exp(1 / 0.5), math.exp(r / 0.5), math.exp(0.0)]
    y_bar = (w[0] + w[1]) / sum(w)
    e, support = mem.estimate(T([[2.0, 0.0]]), f64(0.4))
    assert e.item() == pytest.approx(y_bar - 0.4, abs=1e-6)
    assert support.item() == 3


def test_exact_partially_filled_has_invalid_neighbours():
    mem = ExactMemory(6, size=10, top_k=4)
    e, support = mem.estimate(keys(2), f64(0.5, 0.5))
    assert support.tolist() == [0, 0] and e.tolist() == [0.0, 0.0]
    mem.write(keys(2), f64(1, 1), f64(0.5, 0.5))
    nb = mem.neighbours(keys(2, seed=1))
    assert nb.s.shape == (2, 4) and nb.valid.sum(1).tolist() == [2, 2]
    e, support = mem.estimate(keys(2, seed=1), f64(0.25, 0.5))
    assert support.tolist() == [2, 2] and e.tolist() == pytest.approx([0.75, 0.5])


def test_exact_top_k_larger_than_size_rejected():
    with pytest.raises(ValueError, match="top_k"):
        ExactMemory(4, size=3, top_k=4)


# ---------------------------------------------------------------- policies: errors, decay, reset
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: SketchMemory(6, arrays=4, bits=0, gamma=0.0, **kw),
        lambda **kw: ExactMemory(6, size=8, top_k=8, gamma=0.0, temperature=1e9, **kw),
    ],
)
def test_write_policy_errors_skips_small_errors(make):
    mem = make(write_policy="errors", error_threshold=0.3)
    mem.write(keys(4), Y4, YH4)  # |errors| 0.5, 0.25, 0.25, 0.5: only the two 0.5s are stored
    assert mem.n_written == 2
    e, _ = mem.estimate(keys(1, seed=1), f64(0.5))
    assert e.item() == pytest.approx(0.5, abs=1e-6)


def test_sketch_decay_fades_old_batches():
    mem = SketchMemory(6, arrays=2, bits=0, decay=0.5)
    mem.write(keys(1), f64(1), f64(0))
    mem.write(keys(1, seed=1), f64(0), f64(0))
    # Counts: 1·0.5 + 1 = 1.5, Σy = 1·0.5 = 0.5, so ȳ = 1/3 (not the undecayed 1/2).
    assert mem.acc[:, 0].tolist() == pytest.approx([1.5, 0.5, 0.0])
    e, _ = mem.estimate(keys(1, seed=2), f64(0))
    assert e.item() == pytest.approx(1 / 3)
    mem.write(keys(1, seed=3), f64(0), f64(0))  # older data fades further: ȳ = 0.25 / 1.75
    assert mem.estimate(keys(1, seed=2), f64(0))[0].item() == pytest.approx(0.25 / 1.75)


def test_exact_decay_weights_by_age_like_the_sketch():
    mem = ExactMemory(2, size=4, top_k=4, decay=0.5)
    mem.write(T([[1.0, 0.0]]), f64(1), f64(0))
    mem.write(T([[1.0, 0.0]]), f64(0), f64(0))
    e, _ = mem.estimate(T([[1.0, 0.0]]), f64(0))
    assert e.item() == pytest.approx(1 / 3, abs=1e-6)


@pytest.mark.parametrize(
    "mem",
    [
        SketchMemory(6, arrays=4, bits=3),
        ExactMemory(6, size=5, top_k=2),
        SketchMemory(6, arrays=4, bits=3, similarity="centroid"),
    ],
)
def test_reset_empties(mem):
    nbytes = mem.nbytes
    mem.write(keys(20), torch.ones(20), torch.full((20,), 0.5))
    assert mem.estimate(keys(3), torch.full((3,), 0.5))[1].sum() > 0
    mem.reset()
    e, support = mem.estimate(keys(3), torch.full((3,), 0.5))
    assert e.tolist() == [0.0, 0.0, 0.0] and support.tolist() == [0, 0, 0]
    assert mem.n_written == 0 and mem.nbytes == nbytes


# ---------------------------------------------------------------- state
@pytest.mark.parametrize(
    "make",
    [
        lambda: SketchMemory(6, arrays=8, bits=4, seed=1, decay=0.9),
        lambda: SketchMemory(6, arrays=8, bits=4, similarity="centroid"),
        lambda: ExactMemory(6, size=16, top_k=5, decay=0.8),
    ],
)
def test_state_dict_round_trip(make):
    src = make()
    for i in range(4):
        src.write(keys(10, seed=i), torch.bernoulli(torch.full((10,), 0.5)), torch.rand(10))
    state = src.state_dict()
    dst = make()
    dst.load_state_dict(state)
    q, yq = keys(7, seed=99), torch.rand(7)
    for a, b in zip(src.estimate(q, yq), dst.estimate(q, yq)):
        assert torch.equal(a, b)
    assert dst.n_written == src.n_written
    # Later writes stay in step (tick, ring pointer and mass were restored too).
    for m in (src, dst):
        m.write(keys(3, seed=50), f64(1, 0, 1), f64(0.5, 0.5, 0.5))
    assert torch.equal(src.estimate(q, yq)[0], dst.estimate(q, yq)[0])


def test_load_state_from_other_config_raises():
    state = SketchMemory(6, arrays=8, bits=4).state_dict()
    with pytest.raises(ValueError, match="bits: state has 4"):
        SketchMemory(6, arrays=8, bits=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        SketchMemory(6, arrays=8, bits=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        ExactMemory(6).load_state_dict({**ExactMemory(6).state_dict(), "kind": "sketch"})
    with pytest.raises(ValueError, match="missing keys"):
        ExactMemory(6).load_state_dict(state)
    with pytest.raises(ValueError, match="size: state has 10"):
        ExactMemory(6, size=11, top_k=3).load_state_dict(ExactMemory(6, size=10, top_k=3).state_dict())
    bad = dict(state, acc=torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="acc: expected"):
        SketchMemory(6, arrays=8, bits=4).load_state_dict(bad)
    with pytest.raises(ValueError, match="planes"):
        SketchMemory(6, arrays=8, bits=4).load_state_dict(dict(state, planes=-state["planes"]))


# ---------------------------------------------------------------- no leakage, compensator
def test_estimate_does_not_see_unwritten_labels():
    comp = Compensator(SketchMemory(6, arrays=8, bits=2), lam=0.7)
    comp.feedback(keys(30), torch.bernoulli(torch.full((30,), 0.5)), torch.rand(30))
    q, yq = keys(10, seed=1), torch.rand(10)
    before = comp.memory.state_dict()
    p1 = comp.predict(q, yq)
    p2 = comp.predict(q, yq)
    assert torch.equal(p1, p2)
    for k, v in comp.memory.state_dict().items():  # predicting wrote nothing
        assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k]
    comp.feedback(q, torch.ones(10), yq)  # labels enter only once written
    assert not torch.equal(comp.predict(q, yq), p1)


def test_compensator_gamma1_blends_base_and_neighbour_labels():
    comp = Compensator(SketchMemory(6, arrays=4, bits=0), lam=0.4)
    comp.feedback(keys(4), Y4, YH4)
    y_pred = comp.predict(keys(2, seed=1), f64(0.2, 0.9))
    assert torch.allclose(y_pred, 0.6 * f64(0.2, 0.9) + 0.4 * 0.75)  # (1-λ)ŷ + λȳ
    comp.on_model_update()
    assert comp.memory.n_written == 0
    assert torch.equal(comp.predict(keys(2), f64(0.0, 1.0)), f64(1e-6, 1 - 1e-6))


def test_compensate_clips_inside_open_interval():
    out = compensate(T([0.0, 1.0, 0.5, 0.5]), T([-1.0, 1.0, 0.25, -0.25]), 1.0)
    assert out.tolist() == pytest.approx([1e-6, 1 - 1e-6, 0.75, 0.25])
    assert float(out.max()) < 1.0 and float(out.min()) > 0.0
    half = compensate(T([1.0]).half(), T([1.0]).half(), 1.0)
    assert half.dtype == torch.float32 and half.item() < 1.0


def test_bad_inputs_raise():
    mem = SketchMemory(6, arrays=2, bits=2)
    with pytest.raises(ValueError, match=r"h: expected a tensor \[B, 6\]"):
        mem.write(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="y: values must lie"):
        mem.write(torch.zeros(3, 6), T([0.0, 2.0, 0.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="y_hat: expected shape"):
        mem.write(torch.zeros(3, 6), torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="bits"):
        SketchMemory(6, bits=25)


# ---------------------------------------------------------------- config
def test_config_parses_both_shapes():
    sk = MemoryConfig.parse(
        {
            "memory": {
                "sketch": {"arrays": 16, "bits": 4, "similarity": "centroid"},
                "lambda": 0.9,
                "gamma": 1.0,
                "temperature": 0.1,
                "write": "errors",
                "error_threshold": 0.2,
                "decay": 0.99,
                "reset_on_update": False,
            }
        }
    )
    assert sk.kind == "sketch" and sk.lam == 0.9 and sk.sketch.similarity == "centroid"
    comp = build_memory(sk, dim=6, seed=3)
    mem = comp.memory
    assert isinstance(mem, SketchMemory) and (mem.arrays, mem.bits, mem.seed) == (16, 4, 3)
    assert (mem.write_policy, mem.error_threshold, mem.decay) == ("errors", 0.2, 0.99)
    assert comp.lam == 0.9 and comp.reset_on_update is False
    ex = MemoryConfig.parse({"exact": {"size": 100, "top_k": 8}})
    assert ex.kind == "exact" and ex.lam == 0.5 and ex.to_dict()["exact"] == {"size": 100, "top_k": 8}
    comp = build_memory({"exact": {}}, dim=6, seed=0)
    assert isinstance(comp.memory, ExactMemory) and (comp.memory.size, comp.memory.top_k) == (10000, 64)
    d = MemoryConfig.parse({"sketch": {}}).sketch
    assert (d.arrays, d.bits, d.similarity) == (64, 8, "density")


@pytest.mark.parametrize(
    "data, key",
    [
        ({"sketch": {"bitz": 3}}, "memory.sketch.bitz"),
        ({"sketch": {}, "lamda": 0.5}, "memory.lamda"),
        ({"sketch": {"bits": -1}}, "memory.sketch.bits"),
        ({"exact": {"size": 4, "top_k": 5}}, "memory.exact.top_k"),
        ({"sketch": {}, "lambda": 1.5}, "memory.lambda"),
        ({"sketch": {}, "write": "some"}, "memory.write"),
        ({"sketch": {}, "exact": {}}, "memory: exactly one"),
        ({}, "memory: exactly one"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MemoryConfig.parse({"memory": data})
