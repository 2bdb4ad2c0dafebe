"""Criteo-like reference benchmark: CSV -> encoded -> trained -> test AUC, with reloop's own pipeline.

The reference data set is ``../shared/bench/criteo_like.py --rows 1000000 --seed 2024`` (800k train /
100k valid / 100k test rows; ``label``, ``I1..I13`` integer counts with missing values, ``C1..C26`` hex
ids). It is generated into a cache directory when absent (``<repo>/data/bench`` if the repository has a
``data/`` folder, else ``~/.cache/reloop/bench``; never committed).

For every model x precision a fresh subprocess (so that peak RSS and the end-to-end time are those of
one configuration) runs:

1. read ``train.csv``, ``valid.csv``, ``test.csv`` in order into one canonical frame (a small adapter:
   explicit column types, read in 16 MB line chunks; a ``time`` column = row number, since the files
   have none), checked by reloop's ``clean_frame``;
2. ``FeatureEncoder``: capacities and quantile buckets fitted on the train part only (26 categorical +
   13 numeric ``bucketize`` fields), then every row encoded in order (ids stored as int32);
3. ``build_model`` (embedding 16, MLP [400, 400, 400]; DCN: 3 cross layers) and ``train_rows`` for one
   epoch over the train part (batch 4096, Adam 1e-3, precision fp32 or bf16 autocast);
4. ``predict_rows`` on the test part: AUC and LogLoss.

Prints one JSON object per line. ``threads`` is ``torch.get_num_threads()``; ``load_avg`` is the
1-minute load average when the run started (figures taken on a busy machine are not comparable).

Usage::

    python benchmarks/criteo_like.py                       # deepfm, dcn x fp32, bf16, all cores
    python benchmarks/criteo_like.py --threads 1 --models deepfm --precisions bf16
    python benchmarks/criteo_like.py --rows 200000         # a quick run on a smaller table
    python benchmarks/criteo_like.py --fuxictr-python /tmp/fx/bin/python   # FuxiCTR in the same run

Machines of the same kind differ by tens of percent from day to day, so the ratios to FuxiCTR's
published figures (``vs_fuxictr_speed``) only hold on a host like theirs. ``--fuxictr-python`` (a venv
with FuxiCTR 2.3.10, see ``benchmarks/fuxictr_reference.py``) also trains FuxiCTR's model_zoo DeepFM/DCN
on the same CSVs in this run, as its ``run_expid.py`` does, just before reloop's runs of the same model
(``--fuxictr-set KEY=VALUE`` edits its config), and adds ``fuxictr`` (its figures) and
``vs_fuxictr_same_run_speed`` / ``vs_fuxictr_same_run_e2e`` (reloop's samples/s over FuxiCTR's;
FuxiCTR's end-to-end time over reloop's) to each line.

Timed regions: ``train_s`` is the ``train_rows`` call, one epoch over the encoded train rows in memory
(its per-epoch shuffle, batch gathering, forward, backward, optimizer step); FuxiCTR's is ``fit``
without validation / checkpointing, i.e. one epoch including its loader's per-epoch shuffle.
``end_to_end_s`` starts before ``import torch`` in the run's fresh process, as FuxiCTR's does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# polars' allocator (jemalloc) keeps freed pages for 10 s by default; return them at once, so that the
# memory of the raw frames is free for training (a deployment setting; it must precede importing polars).
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO.parent / "shared" / "bench" / "criteo_like.py"
NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
SPLITS = ("train", "valid", "test")
CATEGORICAL_READ = os.environ.get("RELOOP_BENCH_STRINGS") != "1"

# FuxiCTR's figures for the same data on these machines (the targets are relative to them).
FUXICTR = {
    "deepfm": {"train_samples_per_s": 26_900, "test_auc": 0.7764, "preprocess_s": 32.7},
    "dcn": {"train_samples_per_s": 25_800, "test_auc": 0.7760, "preprocess_s": 32.7},
}


def default_cache() -> Path:
    if (REPO / "data").is_dir():
        return REPO / "data" / "bench"
    return Path.home() / ".cache" / "reloop" / "bench"


def ensure_data(rows: int, seed: int, cache: Path | None = None, generator: Path | None = None) -> Path:
    """The directory holding train/valid/test CSVs of ``rows`` rows and ``seed``; generated if absent."""
    out = (cache or default_cache()) / f"criteo_like-{rows}-{seed}"
    if all((out / f"{s}.csv").exists() for s in SPLITS) and (out / "meta.json").exists():
        return out
    gen = Path(generator or os.environ.get("RELOOP_BENCH_GENERATOR", GENERATOR))
    if not gen.exists():
        raise SystemExit(f"data generator not found: {gen} (pass --generator)")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"generating {rows:,} rows (seed {seed}) into {out} ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, str(gen), "--rows", str(rows), "--seed", str(seed), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def source_config(data_dir: Path) -> dict:
    """The ``data:`` section describing these CSVs (26 categorical + 13 bucketised numeric fields)."""
    features: dict = {c: {"kind": "numeric", "numeric": "bucketize"} for c in NUMERIC}
    features.update({c: "categorical" for c in CATEGORICAL})
    return {
        "source": "csv",
        "path": str(data_dir / "train.csv"),
        "label": "label",
        "time": "time",
        "features": features,
        "max_bad_share": 0.01,
    }


def read_split(path: Path, chunk_bytes: int = 16 << 20, categorical: bool = CATEGORICAL_READ):
    """One CSV file with explicit column types, parsed in line chunks (polars would otherwise map the
    whole file, which counts towards peak RSS). Id columns are kept as polars Categorical (about half
    the memory of String; the encoder casts them back to String, so the ids are the same).
    Returns an unrechunked polars frame."""
    import io

    import polars as pl

    dtypes = {"label": pl.Int8, **{c: pl.Float64 for c in NUMERIC}, **{c: pl.String for c in CATEGORICAL}}
    parts = []
    with open(path, "rb") as fh:
        header = fh.readline()
        while lines := fh.readlines(chunk_bytes):
            part = pl.read_csv(io.BytesIO(header + b"".join(lines)), schema=dtypes)
            if categorical:
                part = part.with_columns(pl.col(CATEGORICAL).cast(pl.Categorical))
            parts.append(part)
    return pl.concat(parts, rechunk=False)


def load_encode(data_dir: Path, int32: bool = True, headroom: float = 1.0):
    """CSV files -> (encoded columns, feature map, split sizes, stage timings). Train-only fitting.

    ``headroom`` 1.0: table capacity = the distinct ids of the train part (no later training period
    will bring new ids to learn; unseen valid/test ids fall into the hashed overflow rows), as
    FuxiCTR's train-only vocabulary. The protocol's default (2.0) leaves room for ids of later periods.
    """
    import polars as pl
    import torch

    from reloop.data.encode import EncoderConfig, FeatureEncoder
    from reloop.data.schema import FeatureSchema
    from reloop.data.sources import parse_source_config
    from reloop.data.validate import clean_frame

    cfg = parse_source_config(source_config(data_dir))
    schema = FeatureSchema(features=[f.to_spec(n) for n, f in cfg.features.items()], label="label", time="time")
    encoder = FeatureEncoder(schema, EncoderConfig(headroom=headroom))
    timings: dict[str, float] = {"read_s": 0.0, "clean_s": 0.0, "fit_s": 0.0, "encode_s": 0.0}
    columns: dict[str, list] = {}
    sizes = {}
    offset = 0
    for split in SPLITS:
        t = time.perf_counter()
        raw = read_split(data_dir / f"{split}.csv")
        raw = raw.with_columns(pl.int_range(offset, offset + raw.height, dtype=pl.Int64).alias("time"))
        timings["read_s"] += time.perf_counter() - t
        t = time.perf_counter()
        # reloop's checks and canonical types for label, time and the numeric columns; the id columns
        # are already strings (Categorical: clean_frame would cast them to String, doubling their memory)
        checked = {n: f for n, f in cfg.features.items() if f.kind != "categorical"}
        frame, report = clean_frame(
            raw.drop(CATEGORICAL),
            time="time",
            label="label",
            user=None,
            features=checked,
            max_bad_share=cfg.max_bad_share,
            source=f"{split}.csv",
        )
        if report.rows_bad:  # the reference data has none; the id columns below could not be filtered to match
            raise SystemExit(f"unexpected bad rows in the benchmark data: {report.summary()}")
        frame = frame.with_columns(raw.select(CATEGORICAL))
        del raw
        timings["clean_s"] += time.perf_counter() - t
        if split == "train":
            t = time.perf_counter()
            encoder.fit_capacities(frame)
            timings["fit_s"] += time.perf_counter() - t
        t = time.perf_counter()
        step = 200_000  # encode in row chunks (same ids as one pass: arrival order is row order)
        for start in range(0, frame.height, step):
            for name, col in encoder.transform(frame.slice(start, step), grow=True).items():
                if int32 and col.dtype == torch.int64:
                    col = col.to(torch.int32)
                columns.setdefault(name, []).append(col)
        timings["encode_s"] += time.perf_counter() - t
        sizes[split] = frame.height
        offset += frame.height
        del frame
    encoded = {k: torch.cat(columns.pop(k)) for k in list(columns)}  # one column's copy at a time
    return encoded, encoder.feature_map(), sizes, timings


def _trim_heap() -> None:
    """Give the C heap's free pages (left by the raw frames and the encoder) back to the OS (glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def model_config(name: str) -> dict:
    cfg = {"name": name, "embedding_dim": 16, "hidden_units": [400, 400, 400]}
    if name == "dcn":
        cfg["cross_layers"] = 3
    return cfg


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    t_start = time.perf_counter()  # before importing torch: FuxiCTR's end-to-end clock starts there too
    import resource

    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    from reloop.data.tensors import PeriodTensors
    from reloop.models import build_model
    from reloop.protocol.metrics import auc, logloss
    from reloop.update.losses import CrossEntropy
    from reloop.update.trainer import TrainConfig, make_optimizer, predict_rows, train_rows

    data_dir = Path(args.data_dir)
    columns, feature_map, sizes, timings = load_encode(data_dir, headroom=args.headroom)
    gc.collect()  # the encoder's vocabularies (only the feature map is needed from here on)
    _trim_heap()
    preprocess_s = time.perf_counter() - t_start
    rows = PeriodTensors(columns)
    n_train, n_valid = sizes["train"], sizes["valid"]
    train = rows.slice(0, n_train)
    test = rows.slice(n_train + n_valid, len(rows))

    torch.manual_seed(args.seed)
    model = build_model(model_config(args.model), feature_map)
    cfg = TrainConfig(batch_size=args.batch_size, lr=args.lr, precision=args.precision, epochs=args.epochs)
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    t = time.perf_counter()
    train_loss = train_rows(model, optimizer, train, CrossEntropy(), cfg, gen)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    try:
        logits, _ = predict_rows(model, test, batch_size=args.eval_batch_size, precision=args.precision, hidden=False)
    except TypeError:  # reloop before predict_rows(hidden=...): to measure the unoptimised code
        logits, _ = predict_rows(model, test, batch_size=args.eval_batch_size, precision=args.precision)
    predict_s = time.perf_counter() - t
    p = torch.sigmoid(logits).numpy()
    y = test.data["label"].numpy()
    result = {
        "model": args.model,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "train_samples_per_s": round(n_train * args.epochs / train_s),
        "predict_samples_per_s": round(len(test) / predict_s),
        "end_to_end_s": round(time.perf_counter() - t_start, 2),
        "preprocess_s": round(preprocess_s, 2),
        **{k: round(v, 2) for k, v in timings.items()},
        "train_s": round(train_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "test_auc": round(float(auc(y, p)), 4),
        "test_logloss": round(float(logloss(y, p)), 4),
        "train_loss": round(train_loss, 4),
        "rows": len(rows),
        "train_rows": n_train,
        "embedding_rows": sum(feature_map.tables.values()),
        "headroom": args.headroom,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "load_avg": round(load, 2),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    ref = FUXICTR.get(args.model)
    if ref and args.rows == 1_000_000 and args.seed == 2024:
        result["vs_fuxictr_speed"] = round(result["train_samples_per_s"] / ref["train_samples_per_s"], 2)
    return result


def fuxictr_reference(python: Path, model: str, data_dir: Path, threads: int, edits: list[str] | None = None) -> dict:
    """FuxiCTR's run of ``model`` on the same CSVs (``benchmarks/fuxictr_reference.py`` under ``python``;
    ``edits``: its ``--set KEY=VALUE`` config edits)."""
    script = Path(__file__).resolve().parent / "fuxictr_reference.py"
    cmd = [str(python), str(script), "--models", model, "--data-dir", str(data_dir), "--threads", str(threads)]
    cmd += [f"--set={item}" for item in edits or []]
    print(f"FuxiCTR reference run: {model} ...", file=sys.stderr)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"FuxiCTR reference run of {model} failed (exit {done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_run_ratios(result: dict, reference: dict) -> dict:
    """FuxiCTR's key figures and reloop's ratios to them (> 1: reloop is faster)."""
    keep = (
        "train_samples_per_s",
        "train_s",
        "first_batch_s",
        "end_to_end_s",
        "preprocess_s",
        "test_auc",
        "test_logloss",
        "peak_rss_mb",
        "peak_tree_pss_mb",
        "load_avg",
        "edits",
    )
    return {
        "fuxictr": {k: reference[k] for k in keep if k in reference},
        "vs_fuxictr_same_run_speed": round(result["train_samples_per_s"] / reference["train_samples_per_s"], 2),
        "vs_fuxictr_same_run_e2e": round(reference["end_to_end_s"] / result["end_to_end_s"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--models", default="deepfm,dcn")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)"
    )
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--eval-batch-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument(
        "--headroom",
        type=float,
        default=1.0,
        help="encoder capacity = distinct train ids x headroom (protocol default: 2.0)",
    )
    ap.add_argument("--cache", type=Path, default=None, help="where generated data sets are kept")
    ap.add_argument("--generator", type=Path, default=None, help="path of shared/bench/criteo_like.py")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    ap.add_argument("--in-process", action="store_true", help="run the configurations in this process")
    ap.add_argument(
        "--fuxictr-python",
        type=Path,
        default=None,
        help="python of a venv with fuxictr 2.3.10: run FuxiCTR on the same data in this run",
    )
    ap.add_argument(
        "--fuxictr-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an edit of FuxiCTR's config (fuxictr_reference.py --set)",
    )
    # internal: one configuration in a child process
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="deepfm", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return
    data_dir = ensure_data(args.rows, args.seed, args.cache, args.generator)
    for model in args.models.split(","):
        reference = (
            fuxictr_reference(args.fuxictr_python, model, data_dir, args.threads, args.fuxictr_set)
            if args.fuxictr_python
            else None
        )
        for precision in args.precisions.split(","):
            if args.in_process:
                one = argparse.Namespace(
                    **{**vars(args), "model": model, "precision": precision, "data_dir": str(data_dir)}
                )
                result = run_one(one)
            else:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    "--model",
                    model,
                    "--precision",
                    precision,
                    "--data-dir",
                    str(data_dir),
                    "--rows",
                    str(args.rows),
                    "--seed",
                    str(args.seed),
                    "--threads",
                    str(args.threads),
                    "--batch-size",
                    str(args.batch_size),
                    "--eval-batch-size",
                    str(args.eval_batch_size),
                    "--lr",
                    str(args.lr),
                    "--epochs",
                    str(args.epochs),
                    "--headroom",
                    str(args.headroom),
                ]
                done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
            if reference is not None:
                result.update(same_run_ratios(result, reference))
            line = json.dumps(result)
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as fh:
                    fh.write(line + "\n")


if __name__ == "__main__":
    main()
