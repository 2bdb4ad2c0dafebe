"""The error memory's key (which representation is stored) and key centring."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from reloop.components import memory_key
from reloop.memory import Compensator, ExactMemory, MemoryConfig, SketchMemory, build_memory
from reloop.models.base import build_model


def _batch(stream, n: int = 16):
    return next(iter(stream.periods(4, 4).batches(n)))


@pytest.mark.parametrize("name", ["emb_mlp", "deepfm", "lr", "dcn", "autoint"])
def test_forward_key_shapes_and_logits(stream, name):
    model = build_model({"name": name, "embedding_dim": 4, "hidden_units": [8]}, stream.feature_map).eval()
    batch = _batch(stream)
    with torch.no_grad():
        plain = model(batch)
        for key in ("hidden", "embeddings"):
            logits, h = model.forward_key(batch, key)
            assert torch.equal(logits, plain)
            assert h.shape == (16, model.key_dim(key))
    assert model.key_dim("embeddings") == stream.feature_map.num_fields * (1 if name == "lr" else 4)


def test_embeddings_key_is_the_field_embeddings(stream):
    model = build_model({"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]}, stream.feature_map).eval()
    batch = _batch(stream)
    with torch.no_grad():
        _, h = model.forward_key(batch, "embeddings")
        assert torch.equal(h, model.embedding(batch).flatten(1))
        _, hidden = model.forward_key(batch, "hidden")
        assert torch.equal(hidden, model.forward_hidden(batch)[1])


def test_unknown_key_names_the_field(stream):
    model = build_model({"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]}, stream.feature_map)
    with pytest.raises(ValueError, match="key: must be one of"):
        model.key_dim("last_layer")
    with pytest.raises(ValueError, match="memory.key"):
        MemoryConfig.parse({"sketch": {}, "key": "last_layer"})


def test_memory_key_defaults():
    assert memory_key(None) == "hidden"
    assert memory_key({"sketch": {}}) == "embeddings"
    assert memory_key({"exact": {}, "key": "hidden"}) == "hidden"
    assert build_memory({"sketch": {}, "key": "hidden"}, dim=4, seed=0).key == "hidden"


@pytest.mark.parametrize("kind", ["sketch", "exact"])
def test_centring_equals_writing_centred_keys(kind):
    """center=True subtracts the first written batch's mean from every later key and query."""
    g = torch.Generator().manual_seed(0)
    shift = torch.full((6,), 5.0)  # every key in one far-away orthant, as after a ReLU
    x1, x2, q = (torch.randn(n, 6, generator=g) + shift for n in (40, 30, 10))
    y1, y2 = (torch.randint(0, 2, (n,), generator=g).double() for n in (40, 30))
    p1, p2, pq = (torch.rand(n, generator=g).double() for n in (40, 30, 10))
    make = (
        (lambda **kw: SketchMemory(6, arrays=8, bits=3, **kw))
        if kind == "sketch"
        else (lambda **kw: ExactMemory(6, size=100, top_k=5, **kw))
    )
    centred, manual = make(center=True), make()
    mu = x1.mean(0)
    centred.write(x1, y1, p1)
    centred.write(x2, y2, p2)
    manual.write(x1 - mu, y1, p1)
    manual.write(x2 - mu, y2, p2)
    e_c, s_c = centred.estimate(q, pq)
    e_m, s_m = manual.estimate(q - mu, pq)
    assert torch.allclose(e_c, e_m) and torch.equal(s_c, s_m)


def test_centring_spreads_one_orthant_over_buckets():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2000, 16, generator=g) * 0.1 + 3.0  # high cosine between every pair
    plain, centred = SketchMemory(16, arrays=4, bits=8), SketchMemory(16, arrays=4, bits=8, center=True)
    y, p = torch.zeros(2000), torch.full((2000,), 0.5)
    plain.write(x, y, p)
    centred.write(x, y, p)
    used = lambda m: int((m.acc[0] > 0).sum())  # noqa: E731
    assert used(centred) > 10 * used(plain)


def test_centre_resets_and_round_trips():
    g = torch.Generator().manual_seed(2)
    mem = SketchMemory(4, arrays=2, bits=2, center=True)
    bytes_before = mem.nbytes
    mem.write(torch.randn(8, 4, generator=g) + 1, torch.ones(8), torch.full((8,), 0.5))
    state = mem.state_dict()
    other = SketchMemory(4, arrays=2, bits=2, center=True)
    other.load_state_dict(state)
    q = torch.randn(3, 4, generator=g)
    assert torch.equal(other.estimate(q, torch.full((3,), 0.5))[0], mem.estimate(q, torch.full((3,), 0.5))[0])
    mem.reset()
    assert mem.nbytes == bytes_before and not mem.state_dict()["mu_set"]
    mem.write(torch.zeros(2, 4), torch.ones(2), torch.full((2,), 0.5))  # μ is taken again after a reset
    assert torch.equal(mem.state_dict()["mu"], torch.zeros(4))


def test_compensator_refuses_state_with_another_key():
    a = Compensator(SketchMemory(4, arrays=2, bits=2), key="hidden")
    b = Compensator(SketchMemory(4, arrays=2, bits=2), key="embeddings")
    with pytest.raises(ValueError, match="key"):
        b.load_state_dict(a.state_dict())


@pytest.mark.slow
def test_run_with_embedding_keyed_memory(tmp_path):
    from reloop.protocol.experiment import run_experiment

    cfg = tiny_config(
        IU={"update": "incremental"},
        emb={"update": "incremental", "memory": {"sketch": {"arrays": 8, "bits": 4}}},
        hid={"update": "incremental", "memory": {"sketch": {"arrays": 8, "bits": 4}, "key": "hidden"}},
    )
    result = run_experiment(cfg, tmp_path, show_progress=False)
    runs = {r["run"] for r in result.summary}
    assert runs == {"IU", "emb", "hid"}


def test_projected_sketch_hashes_through_one_fixed_matrix():
    """project=m: SimHash of R·h, i.e. planes W·Rᵀ on the original key; bytes fixed; state round-trips."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(50, 40, generator=g)
    mem = SketchMemory(40, arrays=6, bits=5, project=8, seed=1)
    assert mem.planes.shape == (6, 5, 8) and mem.proj.shape == (40, 8)
    bits = ((h @ mem.proj) @ mem.planes.view(30, 8).T > 0).view(50, 6, 5).float()
    manual = (bits * 2.0 ** torch.arange(5)).sum(-1).long()
    assert torch.equal(mem.buckets(h), manual)
    nbytes = mem.nbytes
    mem.write(h, torch.ones(50), torch.full((50,), 0.5))
    assert mem.nbytes == nbytes
    other = SketchMemory(40, arrays=6, bits=5, project=8, seed=1)
    other.load_state_dict(mem.state_dict())
    q = torch.randn(5, 40, generator=g)
    assert torch.equal(other.estimate(q, torch.full((5,), 0.2))[0], mem.estimate(q, torch.full((5,), 0.2))[0])
    with pytest.raises(ValueError, match="configuration"):
        SketchMemory(40, arrays=6, bits=5, project=16, seed=1).load_state_dict(mem.state_dict())
    # No projection when the key is not wider: the plain sketch, same planes.
    assert SketchMemory(8, arrays=6, bits=5, project=8, seed=1).proj is None
    assert build_memory({"sketch": {"project": 8}}, dim=40, seed=0).memory.project == 8
