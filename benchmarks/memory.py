"""Throughput and size of the error memories (ReLoop2): one JSON object per line.

    python benchmarks/memory.py [--threads 2] [--batch 4096] [--dim 64] [--total 1000000]

For each memory: ``writes_per_s`` (``write``), ``reads_per_s`` (``estimate``), both in samples per
second over batches of ``--batch``; ``nbytes`` after construction and ``nbytes_after`` once
``--total`` samples have been written (they must be equal: the memory has a fixed size).
``*_per_cpu_s`` divide by this process's CPU time instead of the wall clock (robust to other
processes on a shared machine); ``loadavg_1m`` tells how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from reloop.memory import ErrorMemory, ExactMemory, SketchMemory


def _rate(fn, batch: int, min_time: float, max_iters: int) -> tuple[float, float]:
    """Samples/s of ``fn(i)``: (wall clock, CPU time of this process), medians after a warm-up.

    The CPU-time figure is per core-second summed over threads; unlike the wall clock it is not
    inflated by other processes competing for the cores (shared CI machines).
    """
    fn(0)
    walls: list[float] = []
    cpus: list[float] = []
    start = time.perf_counter()
    i = 1
    while (time.perf_counter() - start < min_time or len(walls) < 5) and i <= max_iters:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        i += 1
    walls.sort()
    cpus.sort()
    return batch / walls[len(walls) // 2], batch / max(cpus[len(cpus) // 2], 1e-9)


def bench(name: str, mem: ErrorMemory, batch: int, dim: int, total: int, min_time: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    pool = 8
    hs = torch.randn((pool, batch, dim), generator=gen)
    ys = torch.bernoulli(torch.full((pool, batch), 0.3), generator=gen)
    yhs = torch.rand((pool, batch), generator=gen)
    nbytes = mem.nbytes
    shapes = {k: tuple(v.shape) for k, v in mem.state_dict().items() if isinstance(v, torch.Tensor)}

    writes, writes_cpu = _rate(lambda i: mem.write(hs[i % pool], ys[i % pool], yhs[i % pool]), batch, min_time, 10_000)
    reads, reads_cpu = _rate(lambda i: mem.estimate(hs[i % pool], yhs[i % pool]), batch, min_time, 10_000)

    t0 = time.perf_counter()
    i = 0
    while mem.n_written < total:
        mem.write(hs[i % pool], ys[i % pool], yhs[i % pool])
        i += 1
    fill_s = time.perf_counter() - t0
    after = {k: tuple(v.shape) for k, v in mem.state_dict().items() if isinstance(v, torch.Tensor)}
    return {
        "memory": name,
        "dim": dim,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "writes_per_s": round(writes),
        "reads_per_s": round(reads),
        "writes_per_cpu_s": round(writes_cpu),
        "reads_per_cpu_s": round(reads_cpu),
        "nbytes": nbytes,
        "n_written": mem.n_written,
        "nbytes_after": mem.nbytes,
        "nbytes_constant": mem.nbytes == nbytes and after == shapes,
        "fill_s": round(fill_s, 2),
        "loadavg_1m": os.getloadavg()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--total", type=int, default=1_000_000)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds timed per figure")
    p.add_argument("--only", choices=["sketch", "exact"], default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = args.dim
    bf16 = torch.bfloat16
    cases = [
        ("sketch K=64 L=8 density", lambda: SketchMemory(d, arrays=64, bits=8)),
        ("sketch K=64 L=8 density bf16-hash", lambda: SketchMemory(d, arrays=64, bits=8, hash_dtype=bf16)),
        ("sketch K=180 L=12 density", lambda: SketchMemory(d, arrays=180, bits=12)),
        ("sketch K=180 L=12 density bf16-hash", lambda: SketchMemory(d, arrays=180, bits=12, hash_dtype=bf16)),
        ("sketch K=64 L=8 centroid", lambda: SketchMemory(d, arrays=64, bits=8, similarity="centroid")),
        ("exact M=10000 k=64", lambda: ExactMemory(d, size=10_000, top_k=64)),
    ]
    for name, make in cases:
        if args.only and not name.startswith(args.only):
            continue
        print(json.dumps(bench(name, make(), args.batch, d, args.total, args.min_time)), flush=True)


if __name__ == "__main__":
    main()
