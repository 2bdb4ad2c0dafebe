"""FuxiCTR 2.3.10 reference run on the criteo-like CSVs, to measure it in the same window as reloop.

Each model runs in a fresh subprocess as a FuxiCTR user would run it: ``fuxictr.datasets.criteo.
CustomizedFeatureProcessor`` (I1..I13 filled with 0, ``convert_to_bucket`` = ``v > 2 -> floor(ln(v)^2)``
else ``int(v)``, then categorical; C1..C26 categorical; min_categr_count 1, fitted on train only) +
``build_dataset`` (polars + Ray Data -> parquet) + ``RankDataLoader`` (parquet, Ray Data) + the model's
own ``fit`` / ``evaluate``. The pip package has no model_zoo: DeepFM / DCN are ``BaseModel`` subclasses
built from fuxictr's layers as the model_zoo does. Embedding 16, DNN [400, 400, 400] ReLU, no dropout /
batch norm / regularisation, DCN 3 cross layers, batch 4096, Adam 1e-3, 1 epoch, BCE, seed 2024, fp32.
Ray's ``random_shuffle`` is unseeded, so test AUC moves by ~0.0005 between runs.

``preprocess_s`` is ``build_dataset`` (fitting included; Ray starts inside it, as for any user).
``train_s`` = ``fit`` minus the time in the instance's ``eval_step`` (end-of-epoch validation +
checkpoint save) and ``load_weights`` (best-checkpoint reload), both wrapped with timers. It keeps the
loader's per-epoch work, part of FuxiCTR's epoch (Ray materialise + global shuffle; ``first_batch_s`` is
fit start -> first batch; ``train_s - train_step_s`` is the wait on the loader). ``end_to_end_s`` runs
from subprocess start (before importing torch / fuxictr) to the test metrics.

``peak_rss_mb`` = max(RUSAGE_SELF, RUSAGE_CHILDREN) maxrss (both reported; CHILDREN is the largest
single reaped descendant, and Ray's workers are never reaped). RSS counts a file page once per mapping,
so a thread also samples the live tree every 0.5 s: summed RSS and PSS, and the driver's RssAnon.

Venv (not a reloop dependency; torch first so that fuxictr does not pull a CUDA build; fuxictr 2.3.10
passes ``dtypes=`` to ``pl.scan_csv``, which polars 2 removed)::

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch==2.13.0 \\
        && /tmp/fx/bin/pip install fuxictr==2.3.10 "polars<2"

Usage::

    /tmp/fx/bin/python benchmarks/fuxictr_reference.py                    # deepfm, dcn; 2 threads
    /tmp/fx/bin/python benchmarks/fuxictr_reference.py --models dcn --out runs/fuxictr.jsonl
    /tmp/fx/bin/python benchmarks/fuxictr_reference.py --models deepfm --rows-limit 50000   # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_DIR = Path.home() / ".cache" / "reloop" / "bench" / "criteo_like-1000000-2024"
WORK_ROOT = Path(tempfile.gettempdir()) / "fuxictr_ref"
SEED = 2024
PARAMS = dict(
    embedding_dim=16,
    hidden_units=[400, 400, 400],
    learning_rate=1e-3,
    batch_size=4096,
    epochs=1,
    optimizer="adam",
    loss="binary_crossentropy",
    metrics=["AUC", "logloss"],
    monitor="AUC",
    monitor_mode="max",
    net_dropout=0,
    batch_norm=False,
    embedding_regularizer=None,
    net_regularizer=None,
    gpu=-1,
    seed=SEED,
    verbose=0,
)  # verbose > 0 puts tqdm bars on stdout


def _kb(text: str, key: str) -> int:
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith(key)), 0)


class TreeSampler(threading.Thread):
    """Peak simultaneous RSS / PSS sums over this process and its live descendants."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.rss, self.pss, self.self_anon = interval, 0, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        kids: dict[int, list[int]] = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:  # the comm field may hold spaces and ')': ppid is the 2nd field after the last ')'
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
        rss, pss, stack = 0, 0, [os.getpid()]
        while stack:
            pid = stack.pop()
            stack.extend(kids.get(pid, []))
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            rss, pss = rss + _kb(text, "Rss:"), pss + _kb(text, "Pss:")
        anon = _kb(Path("/proc/self/status").read_text(), "RssAnon:")
        self.rss, self.pss, self.self_anon = max(self.rss, rss), max(self.pss, pss), max(self.self_anon, anon)


def timed(fn: Callable, acc: dict[str, float], key: str) -> Callable:
    """``fn`` with its wall time accumulated into ``acc[key]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def build_model(name: str, feature_map: Any, params: dict) -> Any:
    import torch  # the parent process never loads torch / Ray
    from fuxictr.pytorch.layers import CrossNet, FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class Net(BaseModel):
        """model_zoo DeepFM (FM: LR + pairwise products, + MLP logit) or DCN (CrossNet || MLP -> linear)."""

        def __init__(
            self,
            feature_map: Any,
            embedding_dim: int,
            hidden_units: list[int],
            learning_rate: float,
            net_dropout: float,
            batch_norm: bool,
            **kwargs: Any,
        ) -> None:
            super().__init__(feature_map, model_id={"deepfm": "DeepFM", "dcn": "DCN"}[name], **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            in_dim = feature_map.sum_emb_out_dim()
            mlp = dict(
                input_dim=in_dim,
                hidden_units=hidden_units,
                hidden_activations="ReLU",
                dropout_rates=net_dropout,
                batch_norm=batch_norm,
            )
            if name == "deepfm":
                self.fm = FactorizationMachine(feature_map)
                self.mlp = MLP_Block(output_dim=1, **mlp)
            else:
                self.dnn = MLP_Block(output_dim=None, **mlp)
                self.crossnet = CrossNet(in_dim, kwargs["num_cross_layers"])
                self.fc = torch.nn.Linear(in_dim + hidden_units[-1], 1)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs: dict) -> dict:
            X = self.get_inputs(inputs)
            if name == "deepfm":
                emb = self.embedding_layer(X)
                logit = self.fm(X, emb) + self.mlp(emb.flatten(start_dim=1))
            else:
                emb = self.embedding_layer(X, flatten_emb=True)
                logit = self.fc(torch.cat([self.crossnet(emb), self.dnn(emb)], dim=-1))
            return {"y_pred": self.output_activation(logit)}

    return Net(feature_map, **params)


def run_one(name: str, data_dir: Path, threads: int, rows_limit: int | None) -> dict:
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    sampler = TreeSampler()
    sampler.start()
    import fuxictr
    import polars as pl
    import ray
    import torch
    from fuxictr.datasets.criteo import CustomizedFeatureProcessor
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything

    torch.set_num_threads(threads)
    seed_everything(SEED)
    work = WORK_ROOT / name
    shutil.rmtree(work, ignore_errors=True)  # an existing feature_map.json makes FuxiCTR skip preprocessing
    (work / "raw").mkdir(parents=True)
    src = {s: data_dir / f"{s}.csv" for s in ("train", "valid", "test")}
    if rows_limit:  # smoke runs: first N train rows, valid/test whole; written before the clock starts
        pl.read_csv(src["train"], n_rows=rows_limit, infer_schema=False).write_csv(work / "raw/train.csv")
        src["train"] = work / "raw/train.csv"

    t = time.perf_counter()  # BARS Criteo dataset config: numerics filled with 0, log-squared buckets
    processor = CustomizedFeatureProcessor(
        feature_cols=[
            {
                "name": [f"I{i}" for i in range(1, 14)],
                "active": True,
                "dtype": "float",
                "type": "categorical",
                "preprocess": "convert_to_bucket",
                "fill_na": 0,
            },
            {
                "name": [f"C{i}" for i in range(1, 27)],
                "active": True,
                "dtype": "str",
                "type": "categorical",
                "fill_na": "",
            },
        ],
        label_col={"name": "label", "dtype": "float"},
        dataset_id="criteo_like",
        data_root=str(work / "data"),
    )
    train_data, valid_data, test_data = build_dataset(
        processor,
        train_data=str(src["train"]),
        valid_data=str(src["valid"]),
        test_data=str(src["test"]),
        data_format="csv",
        min_categr_count=1,
    )
    preprocess_s = time.perf_counter() - t

    params = dict(PARAMS, model_root=str(work / "ckpt"), **({"num_cross_layers": 3} if name == "dcn" else {}))
    feature_map = FeatureMap("criteo_like", processor.data_dir)
    feature_map.load(processor.json_file, params)
    seed_everything(SEED)
    model = build_model(name, feature_map, params)
    os.makedirs(model.model_dir, exist_ok=True)  # run_expid's set_logger would have made it
    loader = dict(batch_size=params["batch_size"], data_format="parquet")
    train_gen, valid_gen = RankDataLoader(
        feature_map, stage="train", train_data=train_data, valid_data=valid_data, shuffle=True, **loader
    )
    acc: dict[str, float] = {}
    train_step, first = timed(model.train_step, acc, "train_step"), []

    def first_step(batch: dict) -> Any:  # notes when the loader delivered its first batch
        if not first:
            first.append(time.perf_counter())
        return train_step(batch)

    # instance attributes shadow the methods that fit() calls through self
    model.train_step = first_step
    model.eval_step = timed(model.eval_step, acc, "eval_step")
    model.load_weights = timed(model.load_weights, acc, "load_weights")
    fit_start = time.perf_counter()
    model.fit(train_gen, epochs=params["epochs"], validation_data=valid_gen)
    fit_s = time.perf_counter() - fit_start
    train_s = fit_s - acc.get("eval_step", 0.0) - acc.get("load_weights", 0.0)

    t = time.perf_counter()
    test_logs = model.evaluate(RankDataLoader(feature_map, stage="test", test_data=test_data, shuffle=False, **loader))
    test_eval_s, end_to_end_s = time.perf_counter() - t, time.perf_counter() - t0
    n_train = train_gen.num_samples
    ray.shutdown()  # reaps Ray's direct children so that RUSAGE_CHILDREN covers them
    sampler.done.set()
    sampler.join()
    self_mb, kids_mb = (
        resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return {
        "library": "fuxictr",
        "fuxictr_version": fuxictr.__version__,
        "model": name,
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "train_rows": n_train,
        "preprocess_s": round(preprocess_s, 2),
        "train_s": round(train_s, 2),
        "train_samples_per_s": round(n_train / train_s),
        "first_batch_s": round(first[0] - fit_start, 2),
        "train_step_s": round(acc["train_step"], 2),
        "fit_s": round(fit_s, 2),
        "valid_eval_s": round(acc.get("eval_step", 0.0), 2),
        "test_auc": round(test_logs["AUC"], 4),
        "test_logloss": round(test_logs["logloss"], 4),
        "test_eval_s": round(test_eval_s, 2),
        "end_to_end_s": round(end_to_end_s, 2),
        "peak_rss_mb": round(max(self_mb, kids_mb)),
        "rss_self_mb": round(self_mb),
        "rss_children_mb": round(kids_mb),
        "peak_tree_rss_mb": round(sampler.rss / 1024),
        "peak_tree_pss_mb": round(sampler.pss / 1024),
        "peak_self_anon_mb": round(sampler.self_anon / 1024),
        "load_avg": round(load_start, 2),
        "load_avg_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "polars": pl.__version__,
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--models", default="deepfm,dcn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--rows-limit", type=int, help="only the first N train rows (smoke run)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: MODEL:RESULT_FILE, one run
    args = ap.parse_args()
    if args.child:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
        )  # FuxiCTR's own timeline
        name, result_file = args.child.split(":", 1)
        Path(result_file).write_text(json.dumps(run_one(name, args.data_dir, args.threads, args.rows_limit)))
        return
    for name in [m.strip().lower() for m in args.models.split(",") if m.strip()]:
        if name not in ("deepfm", "dcn"):
            raise SystemExit(f"unknown model {name!r} (deepfm, dcn)")
        fd, result_file = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            f"{name}:{result_file}",
            "--data-dir",
            str(args.data_dir),
            "--threads",
            str(args.threads),
            *(["--rows-limit", str(args.rows_limit)] * bool(args.rows_limit)),
        ]
        # the child's stdout (Ray's echo of worker output) goes to stderr: stdout stays JSON only
        rc = subprocess.run(cmd, stdout=sys.stderr).returncode
        text = Path(result_file).read_text().strip()
        os.unlink(result_file)
        if rc != 0 or not text:
            raise SystemExit(f"{name}: FuxiCTR run failed (exit {rc})")
        print(text, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                fh.write(text + "\n")


if __name__ == "__main__":
    main()
