"""Every registered model on MovieLens-100K: parameter count and IU test AUC (3 seeds).

    python benchmarks/zoo.py [--models a,b,...] [--seeds 3] [--data ../shared/data/movielens-100k]

Prints one JSON object per model: name, parameters, auc_mean/std, gauc_mean, logloss_mean, seconds.
Sequence models (din, dien, bst) get the MovieLens `history` feature (last 30 positives).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from reloop.config import parse_config
from reloop.models import MODELS
from reloop.protocol.experiment import run_experiment

SEQUENCE_MODELS = {"din", "dien", "bst"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(sorted(MODELS)))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/movielens-100k")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        data = {
            "source": "movielens",
            "path": args.data,
            "label": {"rating_at_least": 4},
            "periods": {"count": 31, "by": "rows"},
        }
        if name in SEQUENCE_MODELS:
            data["history"] = 30
        cfg = parse_config(
            {
                "data": data,
                "model": {"name": name, "embedding_dim": 16},
                "train": {"epochs": 1, "batch_size": 1024, "lr": 1e-3},
                "protocol": {"seeds": list(range(args.seeds))},
                "runs": {"IU": {"update": "incremental"}},
            }
        )
        started = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            res = run_experiment(cfg, Path(tmp), show_progress=False)
            from reloop.data.prepare import prepare_stream
            from reloop.models import build_model

            fmap = prepare_stream(cfg.data, cfg.protocol.pretrain).stream.feature_map
            params = sum(p.numel() for p in build_model(cfg.model, fmap).parameters())
        s = res.summary[0]
        print(
            json.dumps(
                {
                    "model": name,
                    "parameters": params,
                    "auc_mean": round(s["auc_mean"], 4),
                    "auc_std": round(s["auc_std"], 4),
                    "gauc_mean": round(s["gauc_mean"], 4),
                    "logloss_mean": round(s["logloss_mean"], 4),
                    "seeds": args.seeds,
                    "seconds": round(time.time() - started, 1),
                    "threads": args.threads,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
