"""End to end: the `reloop` command on the synthetic stream, a CSV log and MovieLens-100K."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from reloop.cli import app
from reloop.config import load_config
from reloop.data.prepare import prepare_stream
from reloop.protocol.report import SUMMARY_COLUMNS, PERIOD_COLUMNS, read_periods
from reloop.protocol.runner import pretrain, run_one

from conftest import ML100K, needs_ml100k

runner = CliRunner()
SMALL_SYNTH = {"users": 300, "items": 200, "rows_per_period": 1500, "seed": 3}


def _write_config(tmp_path: Path, runs: dict, **over) -> Path:
    cfg = {"data": {"source": "synthetic", "synthetic": SMALL_SYNTH, "periods": {"count": 31, "by": "rows"},
                    "cache": str(tmp_path / "cache")},
           "model": {"name": "emb_mlp", "embedding_dim": 8, "hidden_units": [32, 16]},
           "train": {"epochs": 1, "pretrain_epochs": 3, "batch_size": 256, "lr": 0.005},
           "protocol": {"pretrain": 10, "warmup": 10, "valid": 3, "test": 7, "seeds": [0, 1]},
           "runs": runs}
    cfg.update(over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _summary(out: Path) -> dict[str, dict[str, float]]:
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == SUMMARY_COLUMNS
    return {r["run"]: {k: float(v) for k, v in r.items() if k != "run"} for r in rows}


@pytest.mark.slow
def test_run_on_synthetic_drift_iu_beats_no_update(tmp_path):
    cfg = _write_config(tmp_path, {"no-update": {"update": "none"}, "IU": {"update": "incremental"}})
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    for name in ("config.yaml", "periods.csv", "summary.csv", "summary.md", "periods.png", "oracle.json"):
        assert (out / name).exists(), name
    with (out / "periods.csv").open() as fh:
        assert next(csv.reader(fh)) == PERIOD_COLUMNS
    s = _summary(out)
    # The stream drifts: a model frozen after pretraining falls well behind one retrained each period.
    assert s["IU"]["auc_mean"] - s["no-update"]["auc_mean"] > 0.02, s
    assert s["IU"]["auc_imp_pct"] == 0.0 and s["no-update"]["auc_imp_pct"] < -2.0


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_metrics(tmp_path):
    runs = {"IU": {"update": "incremental", "loss": {"self_correction": 0.5}}}
    path = _write_config(tmp_path, runs, protocol={"pretrain": 10, "warmup": 2, "valid": 1, "test": 2, "seeds": [0]})
    cfg = load_config(path)
    stream = prepare_stream(cfg.data, 10).stream
    out = tmp_path / "killed"
    theta0, opt0 = pretrain(cfg, stream, 0, out)
    # "kill" after period 12: the checkpoint of period 12 is the last thing on disk
    run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0, out=out, stop_after=12)
    res = runner.invoke(app, ["run", str(path), "--out", str(out), "--resume", "--no-progress"])
    assert res.exit_code == 0, res.output
    straight = tmp_path / "straight"
    res = runner.invoke(app, ["run", str(path), "--out", str(straight), "--no-progress"])
    assert res.exit_code == 0, res.output
    a, b = read_periods(out / "periods.csv"), read_periods(straight / "periods.csv")
    assert [r["period"] for r in a] == [r["period"] for r in b]
    for x, y in zip(a, b):
        assert x["auc"] == pytest.approx(y["auc"], abs=1e-6) and x["logloss"] == pytest.approx(y["logloss"], abs=1e-6)


def test_bad_config_names_the_key(tmp_path):
    cfg = _write_config(tmp_path, {"IU": {"updat": "incremental"}})
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "runs.IU.updat" in res.output
    cfg = _write_config(tmp_path, {"IU": {"update": {"batch": "three"}}})
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "runs.IU.update.batch" in res.output
    res = runner.invoke(app, ["run", str(cfg), "--set", "train.lrr=0.1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "train.lrr" in res.output


def _write_clicks(path: Path, n: int = 3100, bad: int = 0) -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(0, 50, n)
    w = rng.normal(0, 1.5, 50)
    label = (rng.random(n) < 1 / (1 + np.exp(-w[items]))).astype(int)
    df = pl.DataFrame({"ts": 1_700_000_000 + np.arange(n) * 60, "label": label,
                       "user_id": [f"u{u}" for u in rng.integers(0, 80, n)], "item_id": [f"i{i}" for i in items],
                       "item_cat": [f"c{i % 5}" for i in items], "device": rng.choice(["ios", "android"], n),
                       "hour": [str(h) for h in rng.integers(0, 24, n)]})
    df = df.with_columns(pl.col("label").cast(pl.String))
    if bad:
        df = df.with_columns(pl.when(pl.int_range(pl.len()) < bad).then(pl.lit("x")).otherwise(pl.col("label")).alias("label"))
    df.write_csv(path)


@pytest.mark.slow
def test_csv_example_config_runs_as_written(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    _write_clicks(tmp_path / "clicks.csv")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", str(repo / "configs" / "csv_example.yaml"), "--out", "out", "--no-progress",
                              "--set", "model={name: fm, embedding_dim: 4}", "--set", "train.pretrain_epochs=1"])
    assert res.exit_code == 0, res.output
    assert len(_summary(tmp_path / "out")) == 1


def test_bad_rows_fail_with_line_numbers(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    _write_clicks(tmp_path / "clicks.csv", bad=100)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", str(repo / "configs" / "csv_example.yaml"), "--out", "out", "--no-progress"])
    assert res.exit_code == 1
    assert "label" in res.output and "1, 2, 3" in res.output


@needs_ml100k
@pytest.mark.slow
def test_movielens100k_config_runs_and_iu_beats_no_update(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ml"
    res = runner.invoke(app, ["run", str(repo / "configs" / "movielens100k.yaml"), "--out", str(out), "--no-progress",
                              "--set", f"data.path={ML100K}", "--set", "protocol.seeds=[0]",
                              "--set", "model.hidden_units=[64]",
                              "--set", "runs={no-update: {update: none}, IU: {update: incremental}}"])
    assert res.exit_code == 0, res.output
    s = _summary(out)
    assert s["IU"]["auc_mean"] > s["no-update"]["auc_mean"] + 0.005, s


def test_data_inspect_and_models_list(tmp_path):
    cfg = _write_config(tmp_path, {"IU": {"update": "incremental"}})
    res = runner.invoke(app, ["data", "inspect", str(cfg)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "label_rate" in res.output and "new item_id" in res.output
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "deepfm" in res.output and "emb_mlp" in res.output
