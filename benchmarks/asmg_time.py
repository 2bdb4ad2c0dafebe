"""ASMG generator training time per period (Peng et al. 2021, Table 3): one JSON object per line.

    python benchmarks/asmg_time.py [--seeds 0] [--data ../shared/data/movielens-100k] [--threads 1]

The protocol of ``reloop bench paper`` (Embedding&MLP ``EMB_MLP``, batch 256, lr 1e-3, 1 epoch, Θ0
pretrained 5 epochs on periods 1..10, then warm-up 10 / valid 3 / test 7 periods, base update IU) on
MovieLens-100K when ``--data`` holds ``u.data``, else on the embedded synthetic stream (the ``dataset``
key says which). Runs: ASMG-GRU ``multi`` for k = 1..6 (hidden 4), ``full`` and ``single`` at k = 3.

Times come from the runner's per-period timing (``reloop.protocol.runner``): ``generator_fit_s`` is the
wall time of the generator's ``learn`` on D_{t+1} (meta training plus the hidden-state re-run; not the
base update, not serving). Medians are over the valid + test periods (every k ≤ 6 has its k models
there) pooled over seeds; ``gen_train_s_last_period`` is the last test period's (Table 3's figure), the
mean over seeds. ``window_models``: the models the GRU runs over (k; for ``full`` every model so far,
median over the same periods).

Also per line: ``n_coordinates`` (P summed over the base tensors: the GRU cells, one per embedding
dimension and per dense scalar), ``n_base_params`` (the values the cells run over: an embedding table's
cells are shared by its ids), ``n_meta_params`` (counted on a built generator; with gate biases it is
n_coordinates · (3d² + 7d + 1)). The last line: the least-squares fit of the multi variant's median time
against k (slope, intercept, R²).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from reloop.bench.paper import EMB_MLP, ML100K_DEFAULT, datasets
from reloop.config import RunSpec, parse_config
from reloop.data.encode import EncoderConfig
from reloop.data.prepare import prepare_stream
from reloop.protocol.runner import pretrain, run_one
from reloop.update.generators.asmg import ASMGGRU, n_coords, param_specs

MEASURED_PHASES = ("valid", "test")


def config(data_cfg: dict, seeds: list[int]):
    return parse_config(
        {
            "data": data_cfg,
            "model": EMB_MLP,
            "train": {"epochs": 1, "pretrain_epochs": 5, "batch_size": 256, "lr": 1e-3},
            "protocol": {"pretrain": 10, "warmup": 10, "valid": 3, "test": 7, "seeds": seeds},
            "runs": {"IU": {"update": "incremental"}},
        }
    )


def sizes(theta0, hidden: int) -> dict[str, int]:
    specs = param_specs(theta0)
    gen = ASMGGRU(k=1, hidden=hidden)
    gen.observe(0, theta0)
    return {
        "n_coordinates": sum(n_coords(s) for s in specs),
        "n_base_params": sum(p.numel() for p in theta0.parameters()),
        "n_meta_params": sum(p.numel() for p in gen.meta.parameters()),
    }


def least_squares(xs: list[float], ys: list[float]) -> dict[str, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope": slope, "intercept": intercept, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    ap.add_argument("--data", type=Path, default=ML100K_DEFAULT, help="MovieLens-100K folder (else synthetic)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    ap.add_argument("--ks", default="1,2,3,4,5,6", help="k of the multi variant (default: 1..6)")
    ap.add_argument("--hidden", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["RELOOP_THREADS"] = str(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = [int(k) for k in args.ks.split(",")]

    dataset = "movielens100k" if (args.data / "u.data").exists() else "synthetic"
    cfg = config(datasets(args.data)[dataset], seeds)
    stream = prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump())).stream
    P = cfg.protocol.pretrain
    runs = [("multi", k) for k in ks] + [("full", 3), ("single", 3)]
    timed: dict[tuple[str, int], list[dict]] = {run: [] for run in runs}
    last: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    size: dict[str, int] = {}
    for seed in seeds:
        started = time.perf_counter()
        theta0, optim0 = pretrain(cfg, stream, seed)
        print(f"seed {seed}: Θ0 pretrained in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        size = sizes(theta0, args.hidden)
        for variant, k in runs:
            spec = RunSpec(
                update="incremental", generator={"asmg_gru": {"k": k, "hidden": args.hidden, "variant": variant}}
            )
            started = time.perf_counter()
            rows = [
                r
                for r in run_one(cfg, stream, f"{variant}-k{k}", spec, seed, theta0, optim0)
                if r["phase"] in MEASURED_PHASES
            ]
            timed[(variant, k)] += rows
            last[(variant, k)].append(rows[-1]["generator_fit_s"])
            print(f"seed {seed} {variant} k={k}: {time.perf_counter() - started:.1f}s", file=sys.stderr)

    medians: dict[tuple[str, int], float] = {}
    for (variant, k), rows in timed.items():

        def med(key: str, rows: list = rows) -> float:
            return statistics.median(r[key] for r in rows)

        medians[(variant, k)] = med("generator_fit_s")
        window = statistics.median(r["period"] - 1 - P for r in rows) if variant == "full" else k
        print(
            json.dumps(
                {
                    "variant": variant,
                    "k": k,
                    "hidden": args.hidden,
                    "window_models": window,
                    "periods": len(rows) // len(seeds),
                    "seeds": seeds,
                    "gen_train_s_per_period": round(medians[(variant, k)], 4),
                    "gen_train_s_last_period": round(statistics.mean(last[(variant, k)]), 4),
                    "base_update_s_per_period": round(med("update_s"), 4),
                    "generate_s_per_period": round(med("generate_s"), 4),
                    "serve_s_per_period": round(med("serve_s"), 4),
                    **size,
                    "dataset": dataset,
                    "threads": args.threads,
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
            )
        )
    fit = least_squares([float(k) for k in ks], [medians[("multi", k)] for k in ks])
    print(
        json.dumps(
            {
                "fit": "gen_train_s_per_period ~ intercept + slope * k (multi)",
                "ks": ks,
                **{key: round(v, 5) for key, v in fit.items()},
                "dataset": dataset,
            }
        )
    )


if __name__ == "__main__":
    main()
