"""Where a training step's time goes (torch.profiler, self CPU time): one JSON object.

    python benchmarks/profile_step.py [--model deepfm] [--precision bf16] [--threads 2] [--steps 10] [--top 25]

Trains ``--model`` (embedding 16, MLP [400, 400, 400]) on the Criteo-like table for a few warm-up steps,
then profiles ``--steps`` shuffled batches of 4,096 and groups the operators' self CPU time into
matmuls, Adam, embedding forward/backward, copies/casts and the rest, in ms per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the encoded Criteo-like table)

# Operator name fragments -> group; the first match wins.
GROUPS = [
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "matmul", "linear")),
    ("adam", ("adam",)),
    ("embedding backward", ("_lookuprowsbackward", "index_add", "embedding_backward", "embeddingbackward")),
    ("embedding forward", ("index_select", "embedding")),
    ("copies, casts", ("copy_", "aten::to", "_to_copy", "aten::cat", "clone")),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepfm")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--top", type=int, default=0, help="also print the N operators with most self CPU time (to stderr)")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    from reloop.data.schema import FeatureMap
    from reloop.data.tensors import PeriodTensors
    from reloop.models import build_model
    from reloop.update.losses import CrossEntropy
    from reloop.update.trainer import TrainConfig, make_optimizer, train_rows

    blob = torch.load(
        throughput.encoded_table(args.rows, args.seed, None, None), map_location="cpu", weights_only=False, mmap=True
    )
    rows = PeriodTensors(blob["columns"])
    torch.manual_seed(0)
    model = build_model(
        {"name": args.model, "embedding_dim": 16, "hidden_units": [400, 400, 400]}, FeatureMap(**blob["feature_map"])
    )
    cfg = TrainConfig(batch_size=4096, precision=args.precision)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(blob["sizes"]["train"], generator=gen)
    train_rows(model, opt, rows.take(perm[: 3 * 4096]), CrossEntropy(), cfg, gen)  # warm-up
    timed = rows.take(perm[3 * 4096 : (3 + args.steps) * 4096])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.top > 0) as prof:
        train_rows(model, opt, timed, CrossEntropy(), cfg, gen)
    if args.top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), file=sys.stderr)
    per_group: dict[str, float] = {}
    for evt in prof.key_averages():
        per_group[group_of(evt.key)] = per_group.get(group_of(evt.key), 0.0) + evt.self_cpu_time_total
    ms = {g: round(us / 1000 / args.steps, 1) for g, us in sorted(per_group.items(), key=lambda kv: -kv[1])}
    print(
        json.dumps(
            {
                "model": args.model,
                "precision": args.precision,
                "threads": args.threads,
                "steps": args.steps,
                "ms_per_step": ms,
                "total_ms_per_step": round(sum(ms.values()), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
