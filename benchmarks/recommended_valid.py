"""How configs/recommended.yaml's free settings were chosen: on the ``valid`` periods of the robustness regimes only.

For each regime of ``benchmarks/robustness.py`` (its data, model and training as written), every candidate
run is served up to the last ``valid`` period (``reloop.protocol.tune.evaluate``: no test period is ever
trained on or served). The guard's defaults and the ``combined`` run's Hedge are chosen by
``benchmarks/combine_valid.py`` (5 seeds, from the recommended runs' served predictions). Prints one JSON line per (regime, candidate) with the
valid AUC and its imp% vs IU, then the mean imp% over regimes per candidate.

    python benchmarks/recommended_valid.py --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
from robustness import REGIMES, ROOT, regime_config

MEM = {"sketch": {"arrays": 64, "bits": 10}}
EXACT = {"exact": {"size": 10000, "top_k": 64}}
CANDIDATES: dict[str, Any] = {
    "IU": {"update": "incremental"},
    "ReLoop a=0.1": {"update": "incremental", "loss": {"self_correction": 0.1}},
    "ReLoop a=0.3": {"update": "incremental", "loss": {"self_correction": 0.3}},
    "ReLoop2 sketch auto-mix": {"update": "incremental", "memory": {**MEM, "lambda": "auto"}},
    "ReLoop2 sketch auto-auc": {
        "update": "incremental",
        "memory": {**MEM, "lambda": "auto", "adapt": {"select": "auc"}},
    },
    "ReLoop2 exact-kept auto-auc": {
        "update": "incremental",
        "memory": {**EXACT, "lambda": "auto", "adapt": {"select": "auc"}, "reset_on_update": False},
    },
    "ASMG k=3 multi": {"update": "incremental", "generator": {"asmg_gru": {"k": 3, "hidden": 4, "variant": "multi"}}},
}


def _one(job: tuple[str, str]) -> list[dict[str, Any]]:
    regime, out_s = job
    import torch

    torch.set_num_threads(1)
    from reloop.config import parse_config
    from reloop.data.encode import EncoderConfig
    from reloop.data.prepare import prepare_stream
    from reloop.protocol.runner import pretrain, run_one
    from reloop.protocol.tune import last_valid_step, valid_score

    out = Path(out_s)
    cfg = parse_config(regime_config(regime, CANDIDATES, [0], out / regime))
    stream = prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump())).stream
    theta0, optim0 = pretrain(cfg, stream, 0, out=out / regime / "pretrain")
    lines, scores = [], {}
    for name, spec in cfg.runs.items():
        rows = run_one(cfg, stream, name, spec, 0, theta0, optim0, stop_after=last_valid_step(cfg))
        assert not any(r["phase"] == "test" for r in rows)
        scores[name] = valid_score(rows)[0]
    for name, auc in scores.items():
        line = {
            "regime": regime,
            "candidate": name,
            "valid_auc": round(auc, 5),
            "imp_pct": round((auc - scores["IU"]) / scores["IU"] * 100, 3),
        }
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regimes", nargs="*", default=list(REGIMES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "recommended-valid")
    args = ap.parse_args()
    jobs = [(r, str(args.out)) for r in args.regimes]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = [line for lines in pool.imap_unordered(_one, jobs) for line in lines]
    by: dict[str, list[float]] = {}
    for line in results:
        by.setdefault(line["candidate"], []).append(line["imp_pct"])
    for name, vals in by.items():
        print(
            json.dumps(
                {
                    "candidate": name,
                    "regimes": len(vals),
                    "mean_imp_pct": round(float(np.mean(vals)), 3),
                    "worst_imp_pct": round(float(min(vals)), 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
