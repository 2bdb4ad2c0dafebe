"""One training step (forward, backward, Adam) of an MLP at several sizes with 1 and with N torch threads.

Prints one JSON line per size: ``work_m`` (dense multiply-adds per step in millions, as
``reloop.threads.dense_work`` counts them), ``t1_ms`` / ``tn_ms`` (median step time over ``--steps``),
``speedup`` (= t1 / tN), and the host's state (usable CPUs, load average, sampled busy CPUs) at the start.
The measurement behind ``reloop.threads.SMALL_WORK`` (docs/guide/quickstart.md#threads):

    python benchmarks/threads.py            # N = the usable CPUs
    python benchmarks/threads.py --threads 4 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from reloop.threads import host_load, usable_cpus

SIZES = [(96, 64, 1024), (160, 256, 1024), (256, 400, 1024), (624, 400, 1024), (624, 400, 4096), (624, 1024, 4096)]


def step_ms(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, threads: int, steps: int
) -> float:
    torch.set_num_threads(threads)
    loss = nn.BCEWithLogitsLoss()
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        opt.zero_grad()
        loss(model(x).squeeze(-1), y).backward()
        opt.step()
        if i >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=usable_cpus(), help="N (default: the usable CPUs)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    load = host_load()
    host = {"cpus": load.cpus, "loadavg1": round(os.getloadavg()[0], 2), "busy_cpus": round(load.busy, 2)}
    torch.manual_seed(0)
    for d_in, hidden, batch in SIZES:
        model = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        opt = torch.optim.Adam(model.parameters())
        x, y = torch.randn(batch, d_in), torch.randint(0, 2, (batch,)).float()
        dense = sum(p.numel() for p in model.parameters())
        t1 = step_ms(model, opt, x, y, 1, args.steps)
        tn = step_ms(model, opt, x, y, args.threads, args.steps)
        print(
            json.dumps(
                {
                    "d_in": d_in,
                    "hidden": hidden,
                    "batch": batch,
                    "work_m": round(dense * batch / 1e6, 1),
                    "threads": args.threads,
                    "t1_ms": round(t1, 2),
                    "tn_ms": round(tn, 2),
                    "speedup": round(t1 / tn, 2),
                    **host,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
