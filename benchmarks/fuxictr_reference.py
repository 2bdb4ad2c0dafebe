"""FuxiCTR 2.3.10 reference run on the criteo-like CSVs, the way a FuxiCTR user runs its model_zoo.

A FuxiCTR user trains DeepFM by ``cd model_zoo/DeepFM/DeepFM_torch && python run_expid.py --expid X``:
``load_config`` merges the ``Base`` section of ``config/model_config.yaml``, the experiment ``X`` and
its data set's section of ``config/dataset_config.yaml``; ``run_expid`` then sets up logging,
seeds, builds the data set (``FeatureProcessor`` + ``build_dataset``: polars + Ray Data -> parquet),
builds ``src.DeepFM(feature_map, **params)``, makes the loaders with
``RankDataLoader(feature_map, stage="train", **params)``, calls ``model.fit(train_gen,
validation_data=valid_gen, **params)``, evaluates on valid once more, then on test. The model_zoo
(``src/``, ``run_expid.py``, the configs) is in the repository, not in the wheel, so this script
writes the two config files itself (``config_files``), defines DeepFM and DCN as the model_zoo does
(``ModelZooDeepFM`` / ``ModelZooDCN``: the same fuxictr layers, arguments and forward pass) and runs
the same sequence (``run_one``). Differences from ``run_expid.py`` (reasons inline):
``CustomizedFeatureProcessor`` (fuxictr.datasets.criteo, the BARS Criteo ``convert_to_bucket``
numerics; the plain ``FeatureProcessor`` has no such method), ``min_categr_count: 1`` (the same
train-only vocabulary as reloop's benchmark; BARS uses 10 on the full Criteo), ``RankDataLoader``
without ``.make_iterator()`` (the repository's ``run_expid.py`` still calls it; 2.3.10's
``RankDataLoader`` is a function that returns the loaders), timers around ``fit``'s steps, and no
results CSV.

Configuration: the ``Base`` section of the model_zoo's ``model_config.yaml`` as shipped
(``num_workers: 3`` = Ray Data's ``prefetch_batches``, ``verbose: 1`` = tqdm bars, ``early_stop_patience:
2``, ``save_best_only: True``, ``eval_steps: null`` = validate once per epoch) and the
``DeepFM_default`` / ``DCN_default`` templates' keys with the reference workload's values: embedding
16, MLP [400, 400, 400] ReLU, no dropout / batch norm, ``embedding_regularizer: 0`` and
``net_regularizer: 0`` (as in the templates; 0 skips ``regularization_loss``; reloop has none either),
DCN 3 cross layers, batch 4096, Adam 1e-3, 1 epoch, shuffle, BCE, seed 2024, fp32, monitor AUC. Any
key can be changed with ``--set KEY=VALUE`` (a YAML value), as a user edits the config.
Ray's ``random_shuffle`` is unseeded, so test AUC moves by ~0.0005 between runs.

What is timed (``train_s``, ``train_samples_per_s`` = train rows / ``train_s``): ``fit`` minus the
time in ``eval_step`` (end-of-epoch validation + checkpoint save) and ``load_weights`` (best-checkpoint
reload). That is one epoch from its start to the last optimizer step, including the loader's
per-epoch work (Ray materialise + global shuffle of the train parquet, batches to tensors:
``first_batch_s`` is fit start -> first batch, ``train_s - train_step_s`` the whole wait on the
loader); reloop's ``train_s`` (``benchmarks/criteo_like.py``) is likewise one epoch including its
per-epoch shuffle and batch gathering. ``preprocess_s`` is ``build_dataset`` (Ray starts inside it).
``end_to_end_s`` runs from the start of the run's subprocess (before importing torch / fuxictr) to the
test metrics, including the post-fit validation pass that ``run_expid`` makes (``valid_eval_after_s``).

``peak_rss_mb`` = max(RUSAGE_SELF, RUSAGE_CHILDREN) maxrss (both reported; CHILDREN is the largest
single reaped descendant, and Ray's workers are never reaped). RSS counts a file page once per mapping,
so a thread also samples the live tree every 0.5 s: summed RSS and PSS, and the driver's RssAnon.

Threads: ``run_expid`` does not call ``torch.set_num_threads``; torch's default is the number of
cores (2 on the reference host). ``--threads`` sets it (``criteo_like.py`` passes its own value).

Venv (not a reloop dependency; torch first so that fuxictr does not pull a CUDA build; fuxictr 2.3.10
passes ``dtypes=`` to ``pl.scan_csv``, which polars 2 removed)::

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch==2.13.0 \\
        && /tmp/fx/bin/pip install fuxictr==2.3.10 "polars<2"

Usage::

    /tmp/fx/bin/python benchmarks/fuxictr_reference.py                    # deepfm, dcn; 2 threads
    /tmp/fx/bin/python benchmarks/fuxictr_reference.py --models dcn --out runs/fuxictr.jsonl
    /tmp/fx/bin/python benchmarks/fuxictr_reference.py --models deepfm --set num_workers=1  # a config edit
    /tmp/fx/bin/python benchmarks/fuxictr_reference.py --models deepfm --rows-limit 50000   # smoke
"""

from __future__ import annotations

import argparse
import json
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
DATASET_ID = "criteo_like"
# model_zoo/*/config/model_config.yaml, section Base, as shipped
BASE = {
    "model_root": "./checkpoints/",
    "num_workers": 3,
    "verbose": 1,
    "early_stop_patience": 2,
    "pickle_feature_encoder": True,
    "save_best_only": True,
    "eval_steps": None,
    "debug_mode": False,
    "group_id": None,
    "use_features": None,
    "feature_specs": None,
    "feature_config": None,
}
# the DeepFM_default / DCN_default templates' keys, with the reference workload's values
COMMON = {
    "dataset_id": DATASET_ID,
    "loss": "binary_crossentropy",
    "metrics": ["logloss", "AUC"],
    "task": "binary_classification",
    "optimizer": "adam",
    "net_regularizer": 0,
    "embedding_regularizer": 0,
    "learning_rate": 1.0e-3,
    "batch_norm": False,
    "net_dropout": 0,
    "batch_size": 4096,
    "embedding_dim": 16,
    "epochs": 1,
    "shuffle": True,
    "seed": SEED,
    "monitor": "AUC",
    "monitor_mode": "max",
}
EXPERIMENTS = {
    "deepfm": {"model": "DeepFM", "hidden_units": [400, 400, 400], "hidden_activations": "relu", **COMMON},
    "dcn": {
        "model": "DCN",
        "dnn_hidden_units": [400, 400, 400],
        "dnn_activations": "relu",
        "num_cross_layers": 3,
        **COMMON,
    },
}


def dataset_section(src: dict[str, Path], work: Path) -> dict:
    """``dataset_config.yaml``'s section: the BARS Criteo columns (numerics filled with 0, then
    ``convert_to_bucket`` = ``v > 2 -> floor(ln(v)^2)`` else ``int(v)``, as categorical ids)."""
    return {
        "data_root": str(work / "data"),
        "data_format": "csv",
        "train_data": str(src["train"]),
        "valid_data": str(src["valid"]),
        "test_data": str(src["test"]),
        "min_categr_count": 1,
        "feature_cols": [
            {
                "name": [f"I{i}" for i in range(1, 14)],
                "active": True,
                "dtype": "float",
                "type": "categorical",
                "preprocess": "convert_to_bucket",
                "fill_na": 0,
            },
            {"name": [f"C{i}" for i in range(1, 27)], "active": True, "dtype": "str", "type": "categorical"},
        ],
        "label_col": {"name": "label", "dtype": "float"},
    }


def config_files(config_dir: Path, expid: str, model: str, src: dict[str, Path], work: Path, edits: dict) -> None:
    """Write ``model_config.yaml`` (Base + the experiment) and ``dataset_config.yaml`` as a model_zoo
    user keeps them. Each edit goes to the section that has its key (else the experiment). PyYAML's own
    dump: it writes 1e-5 as ``1.0e-05``, which ``load_config`` reads back as a float (JSON's ``1e-05``
    would come back as a string)."""
    import yaml  # PyYAML, a fuxictr dependency

    config_dir.mkdir(parents=True)
    sections = [dict(EXPERIMENTS[model]), dict(BASE, model_root=str(work / "checkpoints")), dataset_section(src, work)]
    for key, value in edits.items():
        next((s for s in sections if key in s), sections[0])[key] = value
    experiment, base, dataset = sections
    (config_dir / "model_config.yaml").write_text(yaml.safe_dump({"Base": base, expid: experiment}, sort_keys=False))
    (config_dir / "dataset_config.yaml").write_text(yaml.safe_dump({DATASET_ID: dataset}, sort_keys=False))


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


def model_zoo() -> dict[str, type]:
    """DeepFM and DCN as ``model_zoo/{DeepFM,DCN}/*_torch/src`` define them: the same fuxictr layers,
    constructor arguments (regularisers handed to ``BaseModel``), initialisation and forward pass."""
    import torch  # the parent process never loads torch / Ray
    from fuxictr.pytorch.layers import CrossNet, FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class ModelZooDeepFM(BaseModel):
        """logit = FM(x) + MLP(flattened embeddings); FM = LR (per-id weights + bias) + pairwise
        inner products of the embeddings (Guo et al. 2017, eq. 1)."""

        def __init__(
            self,
            feature_map: Any,
            model_id: str = "DeepFM",
            gpu: int = -1,
            learning_rate: float = 1e-3,
            embedding_dim: int = 10,
            hidden_units: tuple[int, ...] = (64, 64, 64),
            hidden_activations: str = "ReLU",
            net_dropout: float = 0,
            batch_norm: bool = False,
            embedding_regularizer: Any = None,
            net_regularizer: Any = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                feature_map,
                model_id=model_id,
                gpu=gpu,
                embedding_regularizer=embedding_regularizer,
                net_regularizer=net_regularizer,
                **kwargs,
            )
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(),
                output_dim=1,
                hidden_units=list(hidden_units),
                hidden_activations=hidden_activations,
                output_activation=None,
                dropout_rates=net_dropout,
                batch_norm=batch_norm,
            )
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs: dict) -> dict:
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X)
            logit = self.fm(X, emb) + self.mlp(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(logit)}

    class ModelZooDCN(BaseModel):
        """logit = W [CrossNet(e); MLP(e)] + b on the flattened embeddings e (Wang et al. 2017, sec. 2)."""

        def __init__(
            self,
            feature_map: Any,
            model_id: str = "DCN",
            gpu: int = -1,
            learning_rate: float = 1e-3,
            embedding_dim: int = 10,
            dnn_hidden_units: tuple[int, ...] = (),
            dnn_activations: str = "ReLU",
            num_cross_layers: int = 3,
            net_dropout: float = 0,
            batch_norm: bool = False,
            embedding_regularizer: Any = None,
            net_regularizer: Any = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                feature_map,
                model_id=model_id,
                gpu=gpu,
                embedding_regularizer=embedding_regularizer,
                net_regularizer=net_regularizer,
                **kwargs,
            )
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            in_dim = feature_map.sum_emb_out_dim()
            self.dnn = (
                MLP_Block(
                    input_dim=in_dim,
                    output_dim=None,
                    hidden_units=list(dnn_hidden_units),
                    hidden_activations=dnn_activations,
                    output_activation=None,
                    dropout_rates=net_dropout,
                    batch_norm=batch_norm,
                )
                if dnn_hidden_units
                else None
            )
            self.crossnet = CrossNet(in_dim, num_cross_layers)
            self.fc = torch.nn.Linear(in_dim + (dnn_hidden_units[-1] if dnn_hidden_units else 0), 1)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs: dict) -> dict:
            emb = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)
            parts = [self.crossnet(emb)] + ([self.dnn(emb)] if self.dnn is not None else [])
            return {"y_pred": self.output_activation(self.fc(torch.cat(parts, dim=-1)))}

    return {"DeepFM": ModelZooDeepFM, "DCN": ModelZooDCN}


def run_one(name: str, data_dir: Path, threads: int | None, rows_limit: int | None, edits: dict) -> dict:
    """One ``run_expid``-style run of ``name`` in this process; its figures."""
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
    from fuxictr.utils import load_config, set_logger

    if threads:
        torch.set_num_threads(threads)
    work = WORK_ROOT / name
    shutil.rmtree(work, ignore_errors=True)  # an existing feature_map.json makes FuxiCTR skip preprocessing
    (work / "raw").mkdir(parents=True)
    src = {s: data_dir / f"{s}.csv" for s in ("train", "valid", "test")}
    if rows_limit:  # smoke runs: first N train rows, valid/test whole; written before the clock starts
        pl.read_csv(src["train"], n_rows=rows_limit, infer_schema=False).write_csv(work / "raw/train.csv")
        src["train"] = work / "raw/train.csv"
    expid = f"{EXPERIMENTS[name]['model']}_{DATASET_ID}"
    config_files(work / "config", expid, name, src, work, edits)

    # run_expid.py's sequence
    params = load_config(str(work / "config"), expid)
    params["gpu"] = -1
    set_logger(params)  # <model_root>/<dataset_id>/<expid>.log and stderr
    seed_everything(seed=params["seed"])
    t = time.perf_counter()
    processor = CustomizedFeatureProcessor(**params)
    params["train_data"], params["valid_data"], params["test_data"] = build_dataset(processor, **params)
    preprocess_s = time.perf_counter() - t
    feature_map = FeatureMap(params["dataset_id"], processor.data_dir)
    feature_map.load(processor.json_file, params)
    model = model_zoo()[params["model"]](feature_map, **params)
    model.count_parameters()
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **params)

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
    model.fit(train_gen, validation_data=valid_gen, **params)
    fit_s = time.perf_counter() - fit_start
    train_s = fit_s - acc.get("eval_step", 0.0) - acc.get("load_weights", 0.0)

    t = time.perf_counter()
    valid_logs = model.evaluate(valid_gen)  # run_expid's "Validation evaluation" after fit
    valid_after_s = time.perf_counter() - t
    t = time.perf_counter()
    test_logs = model.evaluate(RankDataLoader(feature_map, stage="test", **params))
    test_eval_s, end_to_end_s = time.perf_counter() - t, time.perf_counter() - t0
    n_train, epochs_run = train_gen.num_samples, model._epoch_index + 1  # early stopping may end fit early
    ray.shutdown()  # reaps Ray's direct children so that RUSAGE_CHILDREN covers them
    sampler.done.set()
    sampler.join()
    self_mb, kids_mb = (
        resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    keys = ("num_workers", "verbose", "shuffle", "batch_size", "embedding_regularizer", "net_regularizer")
    return {
        "library": "fuxictr",
        "fuxictr_version": fuxictr.__version__,
        "runner": "model_zoo run_expid sequence",
        "model": name,
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "edits": edits,
        **{k: params[k] for k in keys},
        "train_rows": n_train,
        "epochs": epochs_run,
        "preprocess_s": round(preprocess_s, 2),
        "train_s": round(train_s, 2),
        "train_samples_per_s": round(n_train * epochs_run / train_s),
        "first_batch_s": round(first[0] - fit_start, 2),
        "train_step_s": round(acc["train_step"], 2),
        "fit_s": round(fit_s, 2),
        "valid_eval_s": round(acc.get("eval_step", 0.0), 2),
        "valid_eval_after_s": round(valid_after_s, 2),
        "valid_auc": round(valid_logs["AUC"], 4),
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


def parse_edits(items: list[str]) -> dict:
    """``KEY=VALUE`` config edits; VALUE is read as YAML (``1``, ``1.e-5``, ``null``, ``[400, 400]``)."""
    import yaml  # PyYAML, a fuxictr dependency

    edits = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        edits[key.strip()] = yaml.safe_load(value)
    return edits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--models", default="deepfm,dcn")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--set", dest="edits", action="append", default=[], metavar="KEY=VALUE", help="config edit")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--rows-limit", type=int, help="only the first N train rows (smoke run)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: MODEL:RESULT_FILE, one run
    args = ap.parse_args()
    edits = parse_edits(args.edits)
    if args.child:
        name, result_file = args.child.split(":", 1)
        result = run_one(name, args.data_dir, args.threads, args.rows_limit, edits)
        Path(result_file).write_text(json.dumps(result))
        return
    for name in [m.strip().lower() for m in args.models.split(",") if m.strip()]:
        if name not in EXPERIMENTS:
            raise SystemExit(f"unknown model {name!r} ({', '.join(EXPERIMENTS)})")
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
            *[f"--set={item}" for item in args.edits],
        ]
        # the child's stdout (tqdm bars, Ray's echo of worker output) goes to stderr: stdout stays JSON only
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
