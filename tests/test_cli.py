"""End to end: the `reloop` command on the synthetic stream, a CSV log and MovieLens-100K."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import ML100K, needs_ml100k
from typer.testing import CliRunner

from reloop.cli import app
from reloop.config import load_config
from reloop.data.prepare import prepare_stream
from reloop.protocol.report import PERIOD_COLUMNS, SUMMARY_COLUMNS, read_periods
from reloop.protocol.runner import pretrain, run_one

runner = CliRunner()
SMALL_SYNTH = {"users": 300, "items": 200, "rows_per_period": 1500, "seed": 3}


def _write_config(tmp_path: Path, runs: dict, **over) -> Path:
    cfg = {
        "data": {
            "source": "synthetic",
            "synthetic": SMALL_SYNTH,
            "periods": {"count": 31, "by": "rows"},
            "cache": str(tmp_path / "cache"),
        },
        "model": {"name": "emb_mlp", "embedding_dim": 8, "hidden_units": [32, 16]},
        "train": {"epochs": 1, "pretrain_epochs": 3, "batch_size": 256, "lr": 0.005},
        "protocol": {"pretrain": 10, "warmup": 10, "valid": 3, "test": 7, "seeds": [0, 1]},
        "runs": runs,
    }
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
    df = pl.DataFrame(
        {
            "ts": 1_700_000_000 + np.arange(n) * 60,
            "label": label,
            "user_id": [f"u{u}" for u in rng.integers(0, 80, n)],
            "item_id": [f"i{i}" for i in items],
            "item_cat": [f"c{i % 5}" for i in items],
            "device": rng.choice(["ios", "android"], n),
            "hour": [str(h) for h in rng.integers(0, 24, n)],
        }
    )
    df = df.with_columns(pl.col("label").cast(pl.String))
    if bad:
        df = df.with_columns(
            pl.when(pl.int_range(pl.len()) < bad).then(pl.lit("x")).otherwise(pl.col("label")).alias("label")
        )
    df.write_csv(path)


@pytest.mark.slow
def test_csv_example_config_runs_as_shipped(tmp_path, monkeypatch):
    """From a clean clone and another directory: data.path resolves from the config's directory to the
    shipped configs/data/clicks.csv (only the model and seeds are made smaller here, for time)."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        [
            "--threads",
            "1",
            "run",
            str(repo / "configs" / "csv_example.yaml"),
            "--out",
            "out",
            "--no-progress",
            "--set",
            "model={name: fm, embedding_dim: 4}",
            "--set",
            "train.pretrain_epochs=1",
            "--set",
            "protocol.seeds=[0]",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output  # every run of the example can act
    assert set(_summary(tmp_path / "out")) == set(
        yaml.safe_load((repo / "configs" / "csv_example.yaml").read_text())["runs"]
    )


def test_shipped_example_data_is_what_its_script_writes():
    """configs/data/clicks.csv is reproducible: configs/data/make_clicks.py writes the same rows."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_clicks", repo / "configs" / "data" / "make_clicks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = pl.read_csv(repo / "configs" / "data" / "clicks.csv", infer_schema=False)
    made = module.make_clicks().cast(pl.String)
    assert shipped.equals(made)
    assert (repo / "configs" / "data" / "clicks.csv").stat().st_size < 1_000_000


def test_bad_rows_fail_with_line_numbers(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    _write_clicks(tmp_path / "clicks.csv", bad=100)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        [
            "run",
            str(repo / "configs" / "csv_example.yaml"),
            "--out",
            "out",
            "--no-progress",
            "--set",
            "data.path=clicks.csv",
        ],
    )
    assert res.exit_code == 1
    assert "label" in res.output and "1, 2, 3" in res.output


@needs_ml100k
@pytest.mark.slow
def test_movielens100k_config_runs_and_iu_beats_no_update(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ml"
    res = runner.invoke(
        app,
        [
            "run",
            str(repo / "configs" / "movielens100k.yaml"),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            f"data.path={ML100K}",
            "--set",
            "protocol.seeds=[0]",
            "--set",
            "model.hidden_units=[64]",
            "--set",
            "runs={no-update: {update: none}, IU: {update: incremental}}",
        ],
    )
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


# --------------------------------------------------------------------------------------------------
# the command line itself: help, version, errors, log lines, progress


def _commands() -> list[tuple[list[str], object]]:
    import typer.main

    def walk(cmd, path):
        out = [(path, cmd)]
        for name, sub in getattr(cmd, "commands", {}).items():
            out += walk(sub, [*path, name])
        return out

    return walk(typer.main.get_command(app), [])


def test_help_shows_no_type_placeholders():
    """No `<bool>` next to flags and no `{config}` in usage lines (issue 17)."""
    for path, _ in _commands():
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (path, res.output)
        assert "<bool>" not in res.output, path
        usage = next(line for line in res.output.splitlines() if "Usage:" in line)
        assert "{" not in usage and "}" not in usage, usage
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "Usage: root run [OPTIONS] CONFIG" in res.output or "run [OPTIONS] CONFIG" in res.output


def test_every_option_and_argument_has_help_text():
    missing = [
        f"reloop {' '.join(path)} {getattr(p, 'opts', [p.name])[0]}"
        for path, cmd in _commands()
        for p in cmd.params
        if not (getattr(p, "help", None) or "").strip()
    ]
    assert not missing, f"options or arguments without help text: {missing}"


def test_version():
    from reloop import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"reloop {__version__}"


def test_a_typo_in_set_is_reported_against_the_flag(tmp_path):
    cfg = _write_config(tmp_path, {"IU": {"update": "incremental"}})
    res = runner.invoke(
        app, ["run", str(cfg), "--set", "protocol.seeds=[0]", "--set", "train.lrr=0.1", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert "config error --set train.lrr=0.1: train.lrr: Extra inputs are not permitted" in " ".join(res.output.split())
    assert str(cfg) not in res.output
    # a problem of the file itself is still the file's, whatever --set says
    bad = _write_config(tmp_path, {"IU": {"updat": "incremental"}})
    res = runner.invoke(app, ["run", str(bad), "--set", "train.lr=0.1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"config error {bad}: runs.IU.updat" in " ".join(res.output.split())
    # a --set that replaces a whole section owns the errors inside it
    res = runner.invoke(
        app, ["run", str(cfg), "--set", "runs={IU: {update: {batch: x}}}", "--out", str(tmp_path / "o")]
    )
    assert (
        res.exit_code == 2
        and "config error --set runs={IU: {update: {batch: x}}}: runs.IU.update.batch" in " ".join(res.output.split())
    )


def test_blame_override_matches_keys_not_substrings():
    from reloop.cli import blame_override

    assert blame_override("train.lr: Input should be greater than 0", ["train.lr=-1"]) == "train.lr=-1"
    assert blame_override("train.lrr: Extra inputs", ["train.lr=1"]) is None
    assert blame_override("runs.IU.update.batch: expected", ["runs.IU={update: {batch: x}}"]) is not None
    assert blame_override("a: x; train.lrr: y", ["protocol.seeds=[0]", "train.lrr=2"]) == "train.lrr=2"
    message = "data: periods.by: time needs a time column, but data.time is null"
    assert blame_override(message, ["data.path=x.csv", "data.periods={by: time}"]) == "data.periods={by: time}"


def test_results_line_log_lines_and_progress(tmp_path):
    """The final line lists oracle.json when it is written; log lines carry no file:line."""
    cfg = {
        "data": {
            "source": "synthetic",
            "synthetic": {"users": 40, "items": 30, "rows_per_period": 60, "periods": 8, "seed": 1},
            "periods": {"count": 8, "by": "rows"},
            "cache": str(tmp_path / "cache"),
        },
        "model": {"name": "lr"},
        "train": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 64},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0]},
        "runs": {"IU": {"update": "incremental"}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o"
    res = runner.invoke(
        app, ["--threads", "1", "run", str(tmp_path / "c.yaml"), "--out", str(out)], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 0, res.output
    assert (out / "oracle.json").exists()
    last = [line for line in res.output.splitlines() if "results in" in line][-1]
    assert last.endswith("config.yaml periods.csv summary.csv summary.md periods.png oracle.json"), last
    log_line = next(line for line in res.output.splitlines() if "seed 0 IU: test AUC" in line)
    assert ".py:" not in log_line, log_line
    assert "seed 0: IU" in res.output and "?" not in res.output.split("seed 0: IU")[1].splitlines()[0]


@pytest.mark.parametrize(
    "spec",
    [
        {"update": "incremental"},
        {"update": "none"},
        {"update": {"batch": 2}},
        {"update": "full"},
        {"update": {"full": {"start": "scratch"}}},
        {"update": "incremental", "generator": {"asmg_gru": {"k": 2, "variant": "multi"}}},
        {"update": "incremental", "generator": {"asmg_gru": {"k": 2, "variant": "full"}}},
        {"update": "incremental", "generator": {"asmg_gru": {"k": 3, "variant": "single"}}},
        {"update": "incremental", "generator": {"asmg_linear": {"k": 2}}},
        {"update": "incremental", "generator": "sml"},
    ],
    ids=str,
)
def test_progress_total_is_the_rows_a_run_trains_on(spec, stream):
    """The progress bar of a run has a known total (ASMG's had none): the rows its update and generator
    train on, equal to what the trainer reports."""
    from conftest import tiny_config

    from reloop.config import RunSpec
    from reloop.protocol.experiment import expected_rows

    cfg = tiny_config()
    theta0, optim0 = pretrain(cfg, stream, 0, device="cpu")
    counted = []
    run_one(
        cfg, stream, "x", RunSpec(**spec), 0, theta0, optim0, progress=lambda _run, n: counted.append(n), device="cpu"
    )
    assert expected_rows(cfg, RunSpec(**spec), [b - a for a, b in stream.bounds]) == sum(counted)


def test_csv_errors_name_the_fix(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    _write_clicks(tmp_path / "clicks.csv")
    pl.read_csv(tmp_path / "clicks.csv").write_csv(tmp_path / "semi.csv", separator=";")
    example = str(repo / "configs" / "csv_example.yaml")
    res = runner.invoke(app, ["run", example, "--out", "o", "--set", "data.path=semi.csv"])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "the file looks ';'-delimited: set data.delimiter: ';'" in text
    (tmp_path / "header.csv").write_text("ts,label,user_id,item_id,item_cat,device,hour\n")
    res = runner.invoke(app, ["run", example, "--out", "o", "--set", "data.path=header.csv"])
    assert res.exit_code == 1 and "no data rows" in res.output and "31 periods" not in res.output


@pytest.mark.slow
def test_csv_without_a_time_column_runs_in_file_order(tmp_path, monkeypatch):
    """periods: {by: rows} needs no time column (issue 18): time: null keeps the file's row order."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    _write_clicks(tmp_path / "clicks.csv")
    pl.read_csv(tmp_path / "clicks.csv").drop("ts").write_csv(tmp_path / "order.csv")

    def run(out: str, **sets: str):
        common = {
            "data.periods": "{count: 31, by: rows}",
            "model": "{name: lr}",
            "protocol.seeds": "[0]",
            "protocol.serve_batch_size": "16",
            "runs": "{IU: {update: incremental}}",
            "train.pretrain_epochs": "1",
            **sets,
        }
        args = ["--threads", "1", "run", str(repo / "configs" / "csv_example.yaml"), "--no-progress", "--out", out]
        for key, value in common.items():
            args += ["--set", f"{key}={value}"]
        return runner.invoke(app, args)

    res = run("a", **{"data.path": "order.csv", "data.time": "null"})
    assert res.exit_code == 0, res.output
    # the same rows with a time column that follows the file order give the same metrics
    res = run("b", **{"data.path": "clicks.csv"})
    assert res.exit_code == 0, res.output
    assert read_periods(tmp_path / "a" / "periods.csv") == read_periods(tmp_path / "b" / "periods.csv")
    res = run("c", **{"data.path": "order.csv", "data.time": "null", "data.periods": "{count: 31, by: time}"})
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "config error --set data.periods={count: 31, by: time}: data: periods.by" in text
    assert "data.time" in text and "by: rows" in text
