"""Training and inference throughput of every registered model on the Criteo-like reference table.

The table (``benchmarks/criteo_like.py``'s data, generated when absent) is encoded once with reloop's
pipeline and cached as ``encoded.pt`` beside the CSVs; then every model of ``reloop.models.MODELS`` runs
in its own subprocess (so that its peak RSS is its own): ``--warmup`` steps, then ``--steps`` timed
training steps of batch ``--batch-size`` (shuffled rows of the train part, Adam, ``train_rows``), then
``predict_rows`` over the test part. Sequence models (din, dien, bst) need a sequence field; the table
has none, so they are listed under ``skipped`` with the reason.

Options per model: ``embedding_dim`` 16 and the model's own defaults otherwise (``hidden_units``
[256, 128] unless the model says otherwise), so figures compare models, not tunings.

Prints one JSON document: ``{"table", "threads", "load_avg", "batch_size", "precision", "models":
{name: {train_samples_per_s, infer_samples_per_s, peak_rss_mb, params}}, "skipped": {name: reason}}``.

Usage::

    python benchmarks/throughput.py                    # 1M-row reference table, all cores
    python benchmarks/throughput.py --rows 200000 --steps 10 --threads 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import criteo_like  # noqa: E402  (the data set and its encoding)


def encoded_table(rows: int, seed: int, cache: Path | None, generator: Path | None) -> Path:
    data_dir = criteo_like.ensure_data(rows, seed, cache, generator)
    path = data_dir / "encoded.pt"
    if not path.exists():
        import torch

        columns, feature_map, sizes, _ = criteo_like.load_encode(data_dir)
        tmp = path.with_suffix(".tmp")
        torch.save({"columns": columns, "feature_map": feature_map.model_dump(), "sizes": sizes}, tmp)
        os.replace(tmp, path)
    return path


SEQUENCE_MODELS = {"din", "dien", "bst"}


def sequence_skip_reason(name: str, feature_map) -> str | None:
    """Why a sequence model cannot run on this table (None when it can)."""
    if name not in SEQUENCE_MODELS or feature_map.of_kind("sequence"):
        return None
    return "sequence model: needs a sequence (behaviour history) field; the table has none"


def run_model(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from reloop.data.schema import FeatureMap
    from reloop.data.tensors import PeriodTensors
    from reloop.models import build_model
    from reloop.update.losses import CrossEntropy
    from reloop.update.trainer import TrainConfig, make_optimizer, predict_rows, train_rows

    blob = torch.load(args.table, map_location="cpu", weights_only=False, mmap=True)
    feature_map = FeatureMap(**blob["feature_map"])
    rows = PeriodTensors(blob["columns"])
    n_train, n_valid = blob["sizes"]["train"], blob["sizes"]["valid"]
    torch.manual_seed(0)
    model = build_model({"name": args.model, "embedding_dim": 16}, feature_map)
    cfg = TrainConfig(batch_size=args.batch_size, precision=args.precision)
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    n_warm, n_steps = args.warmup * args.batch_size, args.steps * args.batch_size
    perm = torch.randperm(n_train, generator=gen)[: n_warm + n_steps]
    train_rows(model, optimizer, rows.take(perm[:n_warm]), CrossEntropy(), cfg, gen)
    timed = rows.take(perm[n_warm:])
    t = time.perf_counter()
    train_rows(model, optimizer, timed, CrossEntropy(), cfg, gen)
    train_s = time.perf_counter() - t
    test = rows.slice(n_train + n_valid, len(rows))
    predict_rows(model, test.slice(0, args.batch_size), args.batch_size, args.precision, hidden=False)  # warm-up
    t = time.perf_counter()
    predict_rows(model, test, args.batch_size, args.precision, hidden=False)
    infer_s = time.perf_counter() - t
    return {
        "train_samples_per_s": round(len(timed) / train_s),
        "infer_samples_per_s": round(len(test) / infer_s),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "params": sum(p.numel() for p in model.parameters()),
        "train_rows_timed": len(timed),
        "infer_rows": len(test),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default=None, help="comma-separated subset (default: every registered model)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--generator", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_model(args)), flush=True)
        return

    from reloop.models import MODELS

    load = os.getloadavg()[0]
    table = encoded_table(args.rows, args.seed, args.cache, args.generator)
    names = args.models.split(",") if args.models else sorted(MODELS)
    result: dict = {
        "table": f"criteo_like rows={args.rows} seed={args.seed} (26 categorical + 13 bucketised numeric, "
        "no sequence field)",
        "threads": args.threads,
        "load_avg_start": round(load, 2),
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
        "precision": args.precision,
        "timed_steps": args.steps,
        "options": {"embedding_dim": 16, "others": "model defaults"},
        "models": {},
        "skipped": {},
    }
    import torch

    from reloop.data.schema import FeatureMap

    feature_map = FeatureMap(**torch.load(table, map_location="cpu", weights_only=False, mmap=True)["feature_map"])
    for name in names:
        reason = sequence_skip_reason(name, feature_map)
        if reason:
            result["skipped"][name] = reason
            continue
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--model",
            name,
            "--table",
            str(table),
            "--threads",
            str(args.threads),
            "--batch-size",
            str(args.batch_size),
            "--precision",
            args.precision,
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            result["skipped"][name] = (
                f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}"
            )
        else:
            result["models"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            json.dumps({name: result["models"].get(name) or result["skipped"].get(name)}), file=sys.stderr, flush=True
        )
    result["load_avg_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
