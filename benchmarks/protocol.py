"""The prequential protocol (``reloop run``) against the bare train + predict loop, on the same rows.

Data: ``criteo_like.py``'s Criteo-shaped table (the shared generator, seed 2024: ``label``, ``I1..I13``,
``C1..C26``), its train, valid and test files concatenated in order into one time-ordered log with a
``time`` column (= the row number), written once as ``stream.csv`` (or ``.parquet``) beside the
generated files (default cache: ``runs/bench-data``; ``--cache`` to move it) and reused by later runs.

The protocol: 31 periods by rows, ``pretrain`` 10 (``pretrain_epochs`` 1, so every row is trained
once, as in the bare loop), warm-up 10, valid 3, test 7, one seed; DeepFM (embedding 16, MLP
[400, 400, 400]), batch 4096, Adam 1e-3, the encoder's defaults. Runs (``--runs``):

- ``IU``: incremental update;
- ``ReLoop2-sketch``: IU + the sketch error memory (64 arrays, 10 bits, λ 0.3, τ 0.1);
- ``ASMG-GRU``: IU + the ASMG-GRU generator (k 3, hidden 4, multi);
- ``all-three``: IU + self-correction loss 0.5 + ASMG-GRU + the sketch memory.

Each configuration runs in its own process (its own peak RSS), back to back in one invocation:

1. ``prepare``: the stream encoded from the file on a cold cache (``prepare_stream``; reported as
   ``encode_cold_s`` on every line: the protocol and the bare loop both need it once);
2. ``raw``: the bare loop: the encoded rows from that cache, a fresh model trained by one
   ``train_rows`` pass over every row the protocol trains (periods 1..30: pretraining and the
   incremental updates; shuffled as one table), then one ``predict_rows`` over the served periods
   (11..31); ``raw_s`` = train + predict seconds;
3. one process per run: ``run_experiment`` (what ``reloop run`` calls) with that run alone and a fresh
   ``--out``: the stream from the cache, Θ0 pretrained, the run, the result files;
   ``protocol_s`` = its wall seconds.

Prints one JSON line per run: ``run``, ``rows`` (of the stream), ``protocol_s``, ``raw_s``,
``ratio_to_raw`` (= protocol_s / raw_s), ``peak_rss_mb`` (of the run's process; ``raw_peak_rss_mb``
of the bare loop's), ``stages`` (seconds: ``encode`` = the stream read from the cache, ``pretrain``,
``train`` = the base updates, ``serve`` = predicting the served periods without the memory's part,
``memory`` = the error memory's reads, writes and resets, ``generator`` = observing, forming and
training the generator, ``guard``, ``metrics``, ``checkpoint``, ``progress`` = the progress bar,
``report`` = the result files, ``other`` = the rest of the wall time), the bare loop's ``raw_stages``,
``threads`` and ``load_avg`` (the 1-minute load average when each process started: a shared machine
slows everything; compare ratios taken in one invocation).

Usage::

    python benchmarks/protocol.py                          # 2M rows, IU, 2 threads (≈ 4-6 min on 2 cores)
    python benchmarks/protocol.py --runs all               # IU, ReLoop2-sketch, ASMG-GRU, all-three
    python benchmarks/protocol.py --rows 500000 --runs IU --threads 1   # a quick look
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import criteo_like  # noqa: E402  (the data generator, its column names and the model settings)

REPO = Path(__file__).resolve().parents[1]
SKETCH = {"sketch": {"arrays": 64, "bits": 10}, "lambda": 0.3, "temperature": 0.1}
GRU = {"asmg_gru": {"k": 3, "hidden": 4, "variant": "multi"}}
RUNS: dict[str, dict[str, Any]] = {
    "IU": {"update": "incremental"},
    "ReLoop2-sketch": {"update": "incremental", "memory": SKETCH},
    "ASMG-GRU": {"update": "incremental", "generator": GRU},
    "all-three": {"update": "incremental", "loss": {"self_correction": 0.5}, "generator": GRU, "memory": SKETCH},
}
PROTOCOL = {"pretrain": 10, "warmup": 10, "valid": 3, "test": 7, "seeds": [0]}
PERIODS = 31


# --- data -------------------------------------------------------------------------------------------


def stream_file(rows: int, seed: int, cache: Path, fmt: str) -> Path:
    """The time-ordered log (train, valid, test files in order, ``time`` = row number); made once."""
    data_dir = criteo_like.ensure_data(rows, seed, cache)
    path = data_dir / f"stream.{fmt}"
    if path.exists():
        return path
    import polars as pl

    dtypes = {
        "label": pl.Int8,
        **{c: pl.Float64 for c in criteo_like.NUMERIC},
        **{c: pl.String for c in criteo_like.CATEGORICAL},
    }
    frame = pl.concat([pl.scan_csv(data_dir / f"{s}.csv", schema=dtypes) for s in criteo_like.SPLITS])
    frame = frame.with_row_index("time")
    tmp = path.with_name(path.name + ".tmp")
    (frame.sink_parquet if fmt == "parquet" else frame.sink_csv)(tmp)
    os.replace(tmp, path)
    return path


def experiment_config(path: Path, runs: dict[str, Any], cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    features: dict[str, Any] = {c: {"kind": "numeric", "numeric": "bucketize"} for c in criteo_like.NUMERIC}
    features.update({c: "categorical" for c in criteo_like.CATEGORICAL})
    return {
        "data": {
            "source": path.suffix.lstrip("."),
            "path": str(path),
            "label": "label",
            "time": "time",
            "features": features,
            "periods": {"count": PERIODS, "by": "rows"},
            "cache": str(cache),
        },
        "model": criteo_like.model_config("deepfm"),
        "train": {"epochs": 1, "pretrain_epochs": args.pretrain_epochs, "batch_size": args.batch_size, "lr": 1e-3},
        "protocol": PROTOCOL,
        "runs": runs,
    }


# --- timing of the protocol's stages ----------------------------------------------------------------


class Stages:
    """Exclusive wall seconds per stage, collected by wrapping the functions the protocol calls: a call
    nested in another wrapped call counts for its own stage only (the outer one's clock pauses)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [stage, started, seconds of nested calls]
        self.rss: dict[str, int] = {}  # the highest RSS (MB) sampled while each stage was the innermost one

    def sample_rss(self, every_s: float = 0.005) -> None:
        """Sample this process's RSS every ``every_s`` seconds in a daemon thread, each sample counted for
        the stage running then (``rss_by_stage``: where the peak is reached)."""
        import threading

        def loop() -> None:
            while True:
                stage = self._stack[-1][0] if self._stack else "other"
                mb = _rss_mb()
                if mb > self.rss.get(stage, 0):
                    self.rss[stage] = mb
                time.sleep(every_s)

        threading.Thread(target=loop, daemon=True).start()

    def wrap(self, owner: Any, attr: str, stage: str) -> None:
        inner = getattr(owner, attr, None)
        if inner is None:  # not called from there in this version of reloop
            return

        def timed(*a: Any, **kw: Any) -> Any:
            frame = [stage, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return inner(*a, **kw)
            finally:
                self._stack.pop()
                took = time.perf_counter() - frame[1]
                self.s[stage] = self.s.get(stage, 0.0) + took - frame[2]
                if self._stack:
                    self._stack[-1][2] += took

        setattr(owner, attr, timed)


def instrument() -> Stages:
    import rich.progress

    from reloop import engine
    from reloop.memory.compensate import Compensator
    from reloop.protocol import experiment, runner

    st = Stages()
    st.wrap(experiment, "prepare_stream", "encode")
    st.wrap(experiment, "pretrain", "pretrain")
    st.wrap(runner, "run_one", "run")  # called by runner.run_seed
    st.wrap(experiment, "run_one", "run")  # or directly by run_experiment (older versions)
    st.wrap(experiment, "write_results", "report")
    st.wrap(runner, "serve_period", "serve")  # the memory's calls inside count as memory
    st.wrap(runner, "period_metrics", "metrics")
    st.wrap(runner, "_atomic_save", "checkpoint")
    st.wrap(runner, "_write_checkpoint", "checkpoint")  # the blob's making included, where there is one
    st.wrap(engine.RunEngine, "guard", "guard")
    st.wrap(engine.RunEngine, "step", "train")  # the base update (its guard counts as guard)
    st.wrap(engine.RunEngine, "learn", "generator")
    for name in ("predict", "predict_with_support", "feedback", "on_model_update"):
        st.wrap(Compensator, name, f"memory.{name}")
    for name in ("update", "advance", "add_task"):
        st.wrap(rich.progress.Progress, name, "progress")
    return st


def child_run(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch
    from rich.console import Console

    from reloop.config import parse_config
    from reloop.protocol.experiment import run_experiment

    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    st = instrument()
    st.sample_rss()
    spec = json.loads(args.spec)
    cfg = parse_config(experiment_config(Path(args.data), {args.name: spec}, Path(args.stream_cache), args))
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        t, cpu = time.perf_counter(), time.process_time()
        result = run_experiment(
            cfg, out, show_progress=True, console=Console(file=log, width=120), threads=args.threads
        )
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    rows = result.rows
    s = st.s
    memory = sum(v for k, v in s.items() if k.startswith("memory."))
    sums = {k: sum(r.get(k) or 0.0 for r in rows) for k in ("update_s", "generate_s", "generator_fit_s")}
    stages = {
        "encode": s.get("encode", 0.0),
        "pretrain": s.get("pretrain", 0.0),  # its progress ticks and Θ0's file excluded
        # the base updates (the engine's update_s), less the progress bar's ticks made while training
        "train": sums["update_s"] - s.get("progress", 0.0),
        "serve": s.get("serve", 0.0),
        "memory": memory,
        # observing, forming (the engine's generate_s holds the guard too) and training the generator
        "generator": sums["generate_s"] - s.get("guard", 0.0) + sums["generator_fit_s"],
        "guard": s.get("guard", 0.0),
        "metrics": s.get("metrics", 0.0),
        "checkpoint": s.get("checkpoint", 0.0),
        "progress": s.get("progress", 0.0),
        "report": s.get("report", 0.0),
    }
    stages["other"] = wall - sum(stages.values())
    served = [r for r in rows if r.get("rows")]
    return {
        "run": args.name,
        "protocol_s": round(wall, 2),
        "protocol_cpu_s": round(cpu, 2),
        "served_rows": sum(int(r["rows"]) for r in served),
        "test_auc": round(
            sum(r["auc"] for r in rows if r["phase"] == "test") / max(sum(r["phase"] == "test" for r in rows), 1), 5
        ),
        "stages": {k: round(v, 2) for k, v in stages.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_by_stage_mb": dict(sorted(st.rss.items())),
        "threads": torch.get_num_threads(),
        "load_avg": round(load, 2),
    }


def _cached_stream(args: argparse.Namespace):
    """The encoded stream as ``run_experiment`` reads it (``prepare_stream``, warm cache)."""
    from reloop.config import parse_config
    from reloop.data.encode import EncoderConfig
    from reloop.data.prepare import prepare_stream

    cfg = parse_config(experiment_config(Path(args.data), {"IU": RUNS["IU"]}, Path(args.stream_cache), args))
    return cfg, prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump())).stream


def child_prepare(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    shutil.rmtree(args.stream_cache, ignore_errors=True)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    _, stream = _cached_stream(args)
    cold = time.perf_counter() - t
    return {
        "encode_cold_s": round(cold, 2),
        "rows": len(stream.rows),
        "prepare_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_avg": round(load, 2),
    }


def child_raw(args: argparse.Namespace) -> dict[str, Any]:
    """The bare loop: one ``train_rows`` over the rows the protocol trains, one ``predict_rows`` over
    the rows it serves; same model, optimiser, batch and seed as the protocol's Θ0."""
    import resource

    import torch

    from reloop.models import build_model
    from reloop.protocol.metrics import auc
    from reloop.update.losses import CrossEntropy
    from reloop.update.trainer import make_optimizer, predict_rows, train_rows

    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    cfg, stream = _cached_stream(args)
    load_s = time.perf_counter() - t
    P = cfg.protocol.pretrain
    last_t = P + cfg.protocol.served_periods
    # pretraining periods (pretrain_epochs passes) + the periods the updates train on (one pass)
    train = stream.periods(1, last_t)
    served = stream.periods(P + 1, last_t + 1)
    torch.manual_seed(0)
    model = build_model(cfg.model, stream.feature_map)
    optimizer = make_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(0)
    t, cpu = time.perf_counter(), time.process_time()
    if args.pretrain_epochs == 1:  # one shuffled pass over every trained row
        train_rows(model, optimizer, train, CrossEntropy(), cfg.train, gen, epochs=1)
    else:
        train_rows(model, optimizer, stream.periods(1, P), CrossEntropy(), cfg.train, gen, epochs=args.pretrain_epochs)
        train_rows(model, optimizer, stream.periods(P + 1, last_t), CrossEntropy(), cfg.train, gen, epochs=1)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    logits, _ = predict_rows(model, served, cfg.train.eval_batch_size, hidden=False)
    predict_s = time.perf_counter() - t
    cpu = time.process_time() - cpu
    return {
        "raw_s": round(train_s + predict_s, 2),
        "raw_cpu_s": round(cpu, 2),
        "raw_stages": {"load": round(load_s, 2), "train": round(train_s, 2), "predict": round(predict_s, 2)},
        "raw_train_rows": len(train) + (args.pretrain_epochs - 1) * stream.bounds[P - 1][1],
        "raw_served_rows": len(served),
        "raw_auc": round(auc(served.data["label"].numpy(), torch.sigmoid(logits).numpy()), 5),
        "raw_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "raw_load_avg": round(load, 2),
    }


# --- streams larger than memory: the protocol on Parquet shards ------------------------------------


def shards_root(args: argparse.Namespace) -> Path:
    return args.work / f"shards-{args.rows}"


def child_write_shards(args: argparse.Namespace) -> dict[str, Any]:
    """``args.rows`` encoded rows as 31 period directories of Parquet shards: the cached 2M-row stream's
    rows repeated in order (row ``i`` is base row ``i mod n``; ``row`` = ``i``), period by period."""
    import torch

    from reloop.data.periods import PeriodsConfig, period_bounds
    from reloop.data.shards import period_dir, write_tensors

    _, base = _cached_stream(args)
    cols, n = base.rows.data, len(base.rows)
    root = shards_root(args)
    bounds = period_bounds(np.arange(args.rows), PeriodsConfig(count=PERIODS, by="rows"))
    t = time.perf_counter()
    for i, (start, end) in enumerate(bounds, start=1):
        index = torch.arange(start, end) % n
        period = {k: v[index] for k, v in cols.items()}
        period["row"] = torch.arange(start, end)
        write_tensors(period, period_dir(root, i))
        del period
    (root / "feature_map.json").write_text(base.feature_map.model_dump_json())
    return {
        "rows": args.rows,
        "write_s": round(time.perf_counter() - t, 2),
        "disk_mb": round(sum(f.stat().st_size for f in root.rglob("*.parquet")) / 2**20),
    }


def _rss_mb() -> int:
    """This process's resident set now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return round(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
    except OSError:
        return 0


def child_shards_run(args: argparse.Namespace) -> dict[str, Any]:
    """Θ0 and one run of the protocol (``pretrain`` + ``run_one``, checkpoints included) on the
    ``ShardedStream``; peak RSS against ``--rss-cap-mb``."""
    import resource

    import torch

    from reloop.config import parse_config
    from reloop.data.schema import FeatureMap
    from reloop.data.shards import ShardedStream
    from reloop.protocol.runner import pretrain, run_one

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    root = shards_root(args)
    feature_map = FeatureMap.model_validate_json((root / "feature_map.json").read_text())
    stream = ShardedStream(root, feature_map, read_rows=65_536, shuffle_rows=262_144)
    raw = experiment_config(Path(args.data), {args.name: json.loads(args.spec)}, Path(args.stream_cache), args)
    raw["model"]["hidden_units"] = [int(h) for h in args.hidden.split(",")]
    cfg = parse_config(raw)
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    theta0, optim0 = pretrain(cfg, stream, 0, out)
    pretrain_s = time.perf_counter() - t
    after_pretrain = _rss_mb()
    by_period: list[int] = []  # after each period's update, serving and checkpoint
    # as reloop run's last run of a seed: Θ0 trained in place (where this version of reloop can)
    owned = {"own_theta0": True} if "own_theta0" in inspect.signature(run_one).parameters else {}
    rows = run_one(
        cfg,
        stream,
        args.name,
        cfg.runs[args.name],
        0,
        theta0,
        optim0,
        out=out,
        on_period=lambda _t: by_period.append(_rss_mb()),
        **owned,
    )
    wall = time.perf_counter() - t
    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "run": args.name,
        "rows": len(stream.rows),
        "shards": True,
        "hidden_units": cfg.model["hidden_units"],
        "protocol_s": round(wall, 2),
        "pretrain_s": round(pretrain_s, 2),
        "rows_per_s": round(len(stream.rows) / wall),
        "peak_rss_mb": peak,
        "rss_after_pretrain_mb": after_pretrain,
        "rss_by_period_mb": by_period,
        "rss_cap_mb": args.rss_cap_mb,
        "within_cap": peak <= args.rss_cap_mb,
        "served_rows": sum(int(r["rows"]) for r in rows),
        "test_auc": round(float(np.mean([r["auc"] for r in rows if r["phase"] == "test"])), 5),
        "threads": torch.get_num_threads(),
        "load_avg": round(load, 2),
    }


# --- driver -----------------------------------------------------------------------------------------


def _child(
    args: argparse.Namespace, kind: str, src: Path | None = None, cache: Path | None = None, **extra: str
) -> dict[str, Any]:
    """One configuration in a fresh process; ``src``: import reloop from there (a baseline checkout);
    ``cache``: its stream cache (default ``args.stream_cache``)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--data",
        str(args.data),
        "--stream-cache",
        str(cache or args.stream_cache),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--pretrain-epochs",
        str(args.pretrain_epochs),
        "--work",
        str(args.work),
        "--rows",
        str(args.rows),
    ]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", v]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows of the stream (default 2M)")
    ap.add_argument("--runs", default="IU", help=f"comma-separated runs of {', '.join(RUNS)}, or 'all' (default IU)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2024, help="the data generator's seed")
    ap.add_argument("--format", choices=("csv", "parquet"), default="csv", help="the log's file format")
    ap.add_argument(
        "--cache",
        type=Path,
        default=REPO / "runs" / "bench-data",
        help="where the generated data is kept (default runs/bench-data)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=REPO / "runs" / "bench-protocol",
        help="the runs' --out folders and the stream cache (rewritten each time)",
    )
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    ap.add_argument(
        "--keep-cache", action="store_true", help="reuse the encoded stream of an earlier invocation (no encode_cold_s)"
    )
    ap.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also run each run with reloop imported from this src/ (e.g. `git archive` of an older "
        "commit), just before this checkout's: before/after in one invocation",
    )
    ap.add_argument(
        "--shards",
        default=None,
        help="comma-separated row counts (e.g. 2000000,8000000,20000000): instead of the comparison, write each "
        "as Parquet shards (the --rows stream's rows repeated) and run the protocol streaming from them",
    )
    ap.add_argument("--hidden", default="400,400,400", help="--shards: the MLP's hidden units (default 400,400,400)")
    ap.add_argument("--rss-cap-mb", type=int, default=2048, help="--shards: the peak RSS each run must stay under")
    # internal: one configuration in a child process
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stream-cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        fn = {
            "prepare": child_prepare,
            "raw": child_raw,
            "run": child_run,
            "write-shards": child_write_shards,
            "shards-run": child_shards_run,
        }[args.child]
        print(json.dumps(fn(args)), flush=True)
        return
    names = list(RUNS) if args.runs == "all" else args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {list(RUNS)} or 'all'")
    args.data = stream_file(args.rows, args.seed, args.cache, args.format)
    args.work.mkdir(parents=True, exist_ok=True)
    args.stream_cache = args.work / "stream-cache"
    if args.shards:
        return shards_main(args, names)
    codes: list[tuple[str, Path | None, Path]] = [("current", None, args.stream_cache)]
    if args.baseline_src is not None:  # its own cache: the two versions may write different files
        codes.insert(0, ("baseline", args.baseline_src, args.work / "stream-cache-baseline"))
    prepared: dict[str, dict[str, Any]] = {}
    for code, src, cache in codes:
        if args.keep_cache and cache.exists():
            prepared[code] = {"encode_cold_s": None, "rows": args.rows}
        else:
            prepared[code] = _child(args, "prepare", src, cache)
        print(json.dumps({"code": code, **prepared[code]}), file=sys.stderr, flush=True)
    raw = _child(args, "raw")
    print(json.dumps(raw), file=sys.stderr, flush=True)
    for name in names:
        for code, src, cache in codes:  # back to back: the baseline's run, then this checkout's
            result = _child(
                args,
                "run",
                src,
                cache,
                name=name,
                spec=json.dumps(RUNS[name]),
                out_dir=str(args.work / f"{name}-{code}"),
            )
            line = {
                "run": name,
                "rows": prepared[code]["rows"],
                "protocol_s": result["protocol_s"],
                "raw_s": raw["raw_s"],
                "ratio_to_raw": round(result["protocol_s"] / raw["raw_s"], 2),
                "peak_rss_mb": result["peak_rss_mb"],
                **({"code": code, "src": str(src) if src else None} if args.baseline_src is not None else {}),
                **{k: v for k, v in result.items() if k != "run"},
                "ratio_cpu_to_raw": round(result["protocol_cpu_s"] / raw["raw_cpu_s"], 2),
                **raw,
                "encode_cold_s": prepared[code]["encode_cold_s"],
                "batch_size": args.batch_size,
                "pretrain_epochs": args.pretrain_epochs,
                "format": args.format,
            }
            text = json.dumps(line)
            print(text, flush=True)
            if args.out is not None:
                with args.out.open("a") as fh:
                    fh.write(text + "\n")


def shards_main(args: argparse.Namespace, names: list[str]) -> None:
    """``--shards``: the protocol streaming from Parquet shards at each row count; one JSON line each."""
    if not (args.keep_cache and args.stream_cache.exists()):
        _child(args, "prepare")
    base_rows = args.rows
    for rows in [int(r) for r in args.shards.split(",")]:
        args.rows = rows
        if not (shards_root(args) / "feature_map.json").exists():
            print(json.dumps(_child(args, "write-shards")), file=sys.stderr, flush=True)
        codes: list[tuple[str, Path | None]] = [("current", None)]
        if args.baseline_src is not None:  # the same shards, read by the older reloop just before
            codes.insert(0, ("baseline", args.baseline_src))
        for name, (code, src) in ((n, c) for n in names for c in codes):
            result = _child(
                args,
                "shards-run",
                src,
                name=name,
                spec=json.dumps(RUNS[name]),
                out_dir=str(args.work / f"shards-{rows}-{name}-{code}"),
                hidden=args.hidden,
                rss_cap_mb=str(args.rss_cap_mb),
            )
            line = {**result, "base_rows": base_rows, "batch_size": args.batch_size}
            if args.baseline_src is not None:
                line.update(code=code, src=str(src) if src else None)
            print(json.dumps(line), flush=True)
            if args.out is not None:
                with args.out.open("a") as fh:
                    fh.write(json.dumps(line) + "\n")
    args.rows = base_rows


if __name__ == "__main__":
    main()
