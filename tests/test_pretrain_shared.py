"""Θ0 shared by parallel processes (``bench paper --jobs``): trained once, never a torn file."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch

from conftest import tiny_config, tiny_stream


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
