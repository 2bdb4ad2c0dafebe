"""Bad configs, overrides and resumes fail with one clear line naming the dotted key, before any work."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

from reloop.cli import app
from reloop.components import build_loss
from reloop.config import ConfigError, parse_config
from reloop.protocol.runner import pretrain, run_one

runner = CliRunner()

BASE = {
    "data": {"source": "synthetic", "periods": {"count": 8}},
    "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2},
}


def _raw(**sections) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(copy.deepcopy(sections))
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return str(e.value)


def _run(**spec) -> dict:
    return _raw(runs={"IU": spec})


# --------------------------------------------------------------------------------------------------
# 1, 2: `data` and `model` are checked when the config loads


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"source": "synthetic", "synthetic": {"rows": 3}, "periods": {"count": 8}},
            "data.synthetic.rows: Extra inputs are not permitted",
        ),
        ({"source": "synthetic", "periods": {"cnt": 8}}, "data.periods.cnt: Extra inputs are not permitted"),
        (
            {"source": "synthetic", "periods": {"count": 8, "by": "day"}},
            "data.periods.by: Input should be 'rows' or 'time'",
        ),
        (
            {"source": "cvs", "periods": {"count": 8}},
            "data.source: unknown source 'cvs'; choose one of ['csv', 'movielens', 'parquet', 'synthetic']",
        ),
        (
            {"periods": {"count": 8}},
            "data.source: required; choose one of ['csv', 'movielens', 'parquet', 'synthetic']",
        ),
        (
            {
                "source": "csv",
                "path": "x.csv",
                "features": {"a": "categorical"},
                "delimter": ";",
                "periods": {"count": 8},
            },
            "data.delimter: Extra inputs are not permitted",
        ),
    ],
)
def test_data_keys_are_checked_when_the_config_loads(data, message):
    assert _error(_raw(data=data)) == message


@pytest.mark.parametrize(
    "model, message",
    [
        ({"name": "x"}, "model.name: unknown model 'x'; choose one of ["),
        ({"name": "emb_mlp", "hidden": [8]}, "model.hidden: Extra inputs are not permitted"),
        ({"name": "emb_mlp", "hidden_units": ["a"]}, "model.hidden_units.0: Input should be a valid integer"),
        ({"name": "dcnv2", "num_experts": 2}, "model: num_experts > 1 (DCN-Mix) needs low_rank"),
    ],
)
def test_model_name_and_options_are_checked_when_the_config_loads(model, message):
    assert _error(_raw(model=model)).startswith(message)


def test_model_section_without_name_is_deepfm():
    assert parse_config(_raw(model={"embedding_dim": 8})).model == {"name": "deepfm", "embedding_dim": 8}
    assert parse_config(_raw()).model == {"name": "deepfm"}
    assert _error(_raw(model={"embedding_dim": 0})).startswith("model.embedding_dim: Input should be greater")


# --------------------------------------------------------------------------------------------------
# 3, 4: loss, update and generator values


def test_bare_loss_names_take_the_documented_weights():
    sc, kd = build_loss("self_correction"), build_loss("distill")
    assert sc.loss.alpha == 0.5 and sc.loss.scale == "plain" and sc.y_last == "served"
    assert kd.loss.beta == 0.3 and kd.loss.temperature == 1.0
    assert build_loss({"self_correction": None, "scale": "normalized"}).loss.alpha == 0.5
    assert parse_config(_run(loss="distill")).runs["IU"].loss == "distill"


def test_generator_null_is_identity():
    assert parse_config(_run(generator=None)).runs["IU"].generator == "identity"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"loss": {"self_correction": True}}, "runs.IU.loss.self_correction: expected a number in [0, 1], got True"),
        ({"loss": {"self_correction": 1.5}}, "runs.IU.loss.self_correction: expected a number in [0, 1], got 1.5"),
        ({"loss": {"distill": "high"}}, "runs.IU.loss.distill: expected a number in [0, 1], got 'high'"),
        ({"loss": {"distill": 0.3, "temperature": 0}}, "runs.IU.loss.temperature: expected a number > 0, got 0"),
        ({"update": {"incremental": 5}}, "runs.IU.update.incremental: takes no options, got 5"),
        ({"update": {"none": True}}, "runs.IU.update.none: takes no options, got True"),
        ({"update": {"batch": True}}, "runs.IU.update.batch: expected the window size (an integer ≥ 1), got True"),
        ({"update": {"full": 5}}, "runs.IU.update.full: expected a mapping of options (start), got 5"),
        ({"update": {"replay": {"ratio": -1}}}, "runs.IU.update.replay.ratio: expected a number ≥ 0, got -1"),
        ({"update": None}, "runs.IU.update: expected a name or a one-key mapping, got None"),
        ({"loss": 3}, "runs.IU.loss: expected a name or a one-key mapping, got 3"),
    ],
)
def test_bad_choice_values_are_refused(spec, message):
    assert _error(_run(**spec)) == message


# --------------------------------------------------------------------------------------------------
# 9: one dotted path per problem


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"loss": {"self_correction": 0.5, "scale": "x"}},
            "runs.IU.loss.scale: expected 'plain' or 'normalized', got 'x'",
        ),
        (
            {"loss": {"self_correction": 0.5, "y_last": "x"}},
            "runs.IU.loss.y_last: expected 'served', 'previous_model' or 'compensated', got 'x'",
        ),
        ({"update": {"full": {"start": "x"}}}, "runs.IU.update.full.start: expected 'previous' or 'scratch', got 'x'"),
        ({"generator": {"asmg_gru": {"kk": 3}}}, "runs.IU.generator.asmg_gru.kk: Extra inputs are not permitted"),
        (
            {"generator": {"asmg_gru": {"kk": 3, "k": 0}}},
            "runs.IU.generator.asmg_gru.k: Input should be greater than or equal to 1; "
            "runs.IU.generator.asmg_gru.kk: Extra inputs are not permitted",
        ),
        (
            {"generator": "asmg"},
            "runs.IU.generator: unknown generator 'asmg'; choose one of ['asmg_gru', 'asmg_linear', 'identity', 'sml']",
        ),
        ({"memory": {"sketch": {"bitz": 3}}}, "runs.IU.memory.sketch.bitz: Extra inputs are not permitted"),
        (
            {"update": "bogus"},
            "runs.IU.update: unknown update 'bogus'; choose one of ['batch', 'full', 'incremental', 'none', 'replay']",
        ),
    ],
)
def test_errors_are_one_dotted_path(spec, message):
    assert _error(_run(**spec)) == message


# --------------------------------------------------------------------------------------------------
# 6: resume compares the checkpoints with the config


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path, stream):
    cfg = tiny_config(IU={"loss": {"self_correction": 0.5}})
    theta0, opt0 = pretrain(cfg, stream, 0)
    run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0, out=tmp_path, stop_after=4)
    changed = tiny_config(IU={"loss": {"self_correction": 0.3}})
    changed.train.lr = 0.002
    with pytest.raises(ConfigError) as e:
        run_one(changed, stream, "IU", changed.runs["IU"], 0, theta0, opt0, out=tmp_path, resume=True)
    assert str(e.value) == (
        "resume: runs.IU: checkpoint was made with runs.IU.loss.self_correction=0.5, config has "
        "0.3; train.lr=0.01, config has 0.002; use a new --out or drop --resume"
    )


def test_resume_of_a_checkpoint_without_fingerprint_warns_and_continues(tmp_path, stream):
    cfg = tiny_config()
    theta0, opt0 = pretrain(cfg, stream, 0)
    straight = run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0)
    run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0, out=tmp_path, stop_after=4)
    path = tmp_path / "checkpoints" / "IU" / "seed0.pt"
    blob = torch.load(path, weights_only=False)
    del blob["fingerprint"]  # as written before checkpoints recorded their settings
    torch.save(blob, path)
    with pytest.warns(UserWarning, match="resume: runs.IU: .* has no record of its settings"):
        resumed = run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0, out=tmp_path, resume=True)
    assert [r["auc"] for r in resumed] == pytest.approx([r["auc"] for r in straight], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# CLI: one-line errors, exit codes, nothing written


def _tiny_yaml(tmp_path: Path, **over) -> Path:
    raw = {
        "data": {
            "source": "synthetic",
            "cache": str(tmp_path / "cache"),
            "periods": {"count": 8},
            "synthetic": {"users": 30, "items": 20, "rows_per_period": 40, "periods": 8},
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"pretrain_epochs": 1, "batch_size": 64, "lr": 0.001},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "serve_batch_size": 64},
        "runs": {"IU": {"update": "incremental"}},
    }
    raw.update(over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_line_error(res, code: int, message: str) -> None:
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # no traceback
    assert message in " ".join(res.output.split()), res.output


def test_run_stops_on_a_bad_model_before_any_work(tmp_path):
    cfg = _tiny_yaml(tmp_path, model={"name": "emb_mlp", "hidden": [8]})
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    _one_line_error(res, 2, "model.hidden: Extra inputs are not permitted")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_run_with_a_model_the_data_cannot_feed_is_a_config_error(tmp_path):
    cfg = _tiny_yaml(tmp_path, model={"name": "din", "embedding_dim": 4, "hidden_units": [8]})
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    _one_line_error(res, 2, "model: din needs a behaviour sequence field")


def test_resume_with_changed_settings_fails_and_keeps_config_yaml(tmp_path):
    cfg, out = _tiny_yaml(tmp_path), tmp_path / "out"
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    before = (out / "config.yaml").read_text()
    res = runner.invoke(
        app, ["run", str(cfg), "--out", str(out), "--no-progress", "--resume", "--set", "train.lr=0.002"]
    )
    _one_line_error(
        res,
        2,
        "resume: runs.IU: checkpoint was made with train.lr=0.001, config has 0.002; use a new --out or drop --resume",
    )
    assert (out / "config.yaml").read_text() == before
    res = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--no-progress", "--resume"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("command", [["run"], ["data", "inspect"]])
def test_period_split_errors_are_one_line(tmp_path, command):
    # 8 periods of 1 row each: 8 rows for 12 periods
    cfg = _tiny_yaml(
        tmp_path,
        data={
            "source": "synthetic",
            "cache": str(tmp_path / "cache"),
            "periods": {"count": 12},
            "synthetic": {"users": 5, "items": 5, "rows_per_period": 1, "periods": 8},
        },
    )
    res = runner.invoke(app, [*command, str(cfg), *(["--no-progress"] if command == ["run"] else [])])
    _one_line_error(res, 1, "error: data.periods.count: 12 periods need at least as many rows, got 8")


def test_data_inspect_missing_file_is_one_line(tmp_path):
    cfg = _tiny_yaml(
        tmp_path,
        data={
            "source": "csv",
            "path": str(tmp_path / "nope.csv"),
            "periods": {"count": 8},
            "features": {"item_id": "categorical"},
        },
    )
    res = runner.invoke(app, ["data", "inspect", str(cfg)])
    _one_line_error(res, 1, "error: CSV file not found")


@pytest.mark.parametrize(
    "item, message",
    [
        ("protocol.seeds", "--set 'protocol.seeds': expected key=value"),
        ("=3", "--set '=3': expected key=value"),
    ],
)
def test_bench_paper_set_uses_the_run_parser(tmp_path, item, message):
    res = runner.invoke(app, ["bench", "paper", "--data", "synthetic", "--out", str(tmp_path / "p"), "--set", item])
    _one_line_error(res, 2, message)
    assert not (tmp_path / "p").exists()
    res = runner.invoke(app, ["run", str(_tiny_yaml(tmp_path)), "--set", item])
    _one_line_error(res, 2, message)


def test_set_value_that_is_not_yaml_names_the_key(tmp_path):
    res = runner.invoke(app, ["run", str(_tiny_yaml(tmp_path)), "--set", "train.lr=[0.1"])
    _one_line_error(res, 2, "--set train.lr: the value is not valid YAML")
