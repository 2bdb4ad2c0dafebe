"""Θ0: shared by parallel processes (trained once, never a torn file); never silently constant."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from conftest import ML100K, needs_ml100k, tiny_config, tiny_stream


def _pretrain_in_child(out: str, index: int, queue) -> None:
    import time

    import torch

    from reloop.protocol import runner

    torch.set_num_threads(1)
    calls = []
    real = runner._pretrain_fresh

    def counted(*a, **k):
        calls.append(1)
        time.sleep(0.5)  # widen the window in which the other process could start its own
        return real(*a, **k)

    runner._pretrain_fresh = counted
    model, _ = runner.pretrain(tiny_config(), tiny_stream(), seed=0, out=Path(out))
    torch.save(model.state_dict(), Path(out) / f"child{index}.pt")  # tensors through a Queue need shared memory
    queue.put(len(calls))


def test_two_processes_share_one_pretrained_model(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pretrain_in_child, args=(str(tmp_path), i, queue)) for i in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(results) == [0, 1]  # one trained, the other waited and loaded
    a, b = (torch.load(tmp_path / f"child{i}.pt") for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (tmp_path / "pretrain").iterdir() if p.suffix == ".pt"] == ["seed0.pt"]
    assert not list((tmp_path / "pretrain").glob("*.tmp"))


def test_a_constant_pretrained_model_is_reported(stream):
    from reloop.models.base import build_model
    from reloop.protocol.runner import _warn_if_constant

    model = build_model({"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]}, stream.feature_map)
    _warn_if_constant(model, stream.periods(1, 3), seed=0)  # a live model: silent
    with torch.no_grad():
        model.head.weight.zero_()
    with pytest.warns(RuntimeWarning, match="seed 0: the pretrained model gives every row the same score"):
        _warn_if_constant(model, stream.periods(1, 3), seed=0)


def test_mlp_biases_start_at_zero():
    from reloop.models.layers import MLP

    mlp = MLP(12, [8, 4])
    assert all(not m.bias.detach().any() for m in mlp.net if isinstance(m, torch.nn.Linear))


@needs_ml100k
def test_narrow_mlp_pretrains_alive_on_movielens():
    """emb_mlp [40, 20, 10] seed 3 used to end pretraining with all ten last ReLUs dead (AUC 0.5)."""
    import warnings

    from reloop.bench.paper import SECTIONS, section_config
    from reloop.data.encode import EncoderConfig
    from reloop.data.prepare import prepare_stream
    from reloop.protocol.runner import pretrain

    cfg = section_config(next(s for s in SECTIONS if s.name == "asmg"), "movielens100k", [3], ML100K)
    stream = prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump())).stream
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, _ = pretrain(cfg, stream, seed=3)
    with torch.no_grad():
        _, h = model.forward_hidden(next(stream.periods(11, 11).batches(2048)))
    assert int((h > 0).any(0).sum()) >= 3
