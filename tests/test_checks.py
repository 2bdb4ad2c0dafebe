"""The pre-run check (reloop.preflight.preflight): every component that cannot act is named before the run.

Each rule is also checked against what the protocol really does: a run the check says cannot act gives
exactly the metrics of the same run without the component, and one it passes does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_config, tiny_stream
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from reloop.cli import app
from reloop.config import ConfigError, RunSpec, parse_config
from reloop.preflight import check_before_run, preflight
from reloop.protocol.runner import pretrain, run_one

EXACT = {"exact": {"size": 256, "top_k": 8}, "lambda": 0.5}
runner = CliRunner()


def _cfg(runs: dict, **protocol):
    raw = {
        "data": {"source": "synthetic", "periods": {"count": 8}},
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 128, "lr": 0.01},
        "protocol": {
            "pretrain": 3,
            "warmup": 1,
            "valid": 1,
            "test": 2,
            "seeds": [0],
            "serve_batch_size": 128,
            **protocol,
        },
        "runs": runs,
    }
    return parse_config(raw)


def _metrics(cfg, stream, spec: dict) -> list[tuple[int, float, float]]:
    theta0, optim0 = pretrain(cfg, stream, 0, device="cpu")
    rows = run_one(cfg, stream, "case", RunSpec(**spec), 0, theta0, optim0, device="cpu")
    return [(r["period"], r["auc"], r["logloss"]) for r in rows]


# ------------------------------------------------------------------------------------- the memory


def test_memory_that_is_never_read_is_named_with_the_settings_to_change():
    """ReLoop2 equal to IU (issue 17): periods of 375 rows served in one batch of 1024, memory reset per update."""
    cfg = _cfg(
        {"IU": {"update": "incremental"}, "ReLoop2": {"update": "incremental", "memory": EXACT}}, serve_batch_size=1024
    )
    found = preflight(cfg, [375] * 8)
    assert len(found) == 1
    f = found[0]
    assert f.level == "warning" and f.key == "runs.ReLoop2.memory"
    assert "any served period" in f.message
    assert "protocol.serve_batch_size <= 374" in f.message and "runs.ReLoop2.memory.reset_on_update: false" in f.message


@pytest.mark.parametrize(
    "fix",
    [{"serve_batch_size": 187}, {"memory": {**EXACT, "reset_on_update": False}}],
    ids=["smaller batches", "kept memory"],
)
def test_either_named_fix_clears_the_finding(fix):
    memory = fix.get("memory", EXACT)
    protocol = {"serve_batch_size": fix.get("serve_batch_size", 1024)}
    cfg = _cfg({"ReLoop2": {"update": "incremental", "memory": memory}}, **protocol)
    assert preflight(cfg, [375] * 8) == []


def test_feedback_delay_counts_batches_read_before_any_label_arrives():
    cfg = _cfg({"M": {"update": "incremental", "memory": EXACT}}, serve_batch_size=128, feedback_delay=2)
    # 375 rows = 3 batches of 128: labels arrive 2 batches late, the 3rd batch reads nothing yet
    found = preflight(cfg, [375] * 8)
    assert [f.key for f in found] == ["runs.M.memory"] and "protocol.feedback_delay" in found[0].message
    assert preflight(cfg, [385] * 8) == []  # 4 batches: the 4th reads the 1st batch's labels


def test_only_some_test_periods_too_small_is_a_warning_counting_them():
    cfg = _cfg({"M": {"update": "incremental", "memory": EXACT}}, serve_batch_size=128)
    sizes = [375] * 7 + [100]  # the last test period fits one batch
    (f,) = preflight(cfg, sizes)
    assert f.level == "warning" and "1 of the 2 test periods" in f.message


@pytest.mark.slow
def test_the_memory_rule_matches_the_protocol():
    """What the check says is what happens: blind config -> exactly IU; the suggested fix -> not IU."""
    stream = tiny_stream()
    sizes = [b - a for a, b in stream.bounds]
    blind = _cfg({"M": {"update": "incremental", "memory": EXACT}}, serve_batch_size=1024)
    assert preflight(blind, sizes), "the blind config must be reported"
    iu = _metrics(blind, stream, {"update": "incremental"})
    assert _metrics(blind, stream, {"update": "incremental", "memory": EXACT}) == iu
    fixed = _cfg({"M": {"update": "incremental", "memory": EXACT}}, serve_batch_size=min(sizes) // 2)
    assert preflight(fixed, sizes) == []
    compensated = _metrics(fixed, stream, {"update": "incremental", "memory": EXACT})
    assert [m[0] for m in compensated] == [m[0] for m in iu]
    assert all(a != b for a, b in zip(compensated, _metrics(fixed, stream, {"update": "incremental"})))


@given(
    rows=st.lists(st.integers(1, 3000), min_size=8, max_size=8),
    batch=st.integers(1, 2048),
    delay=st.integers(0, 4),
    reset=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_memory_finding_iff_a_served_period_has_too_few_batches(rows, batch, delay, reset):
    cfg = _cfg(
        {"M": {"update": "incremental", "memory": {**EXACT, "reset_on_update": reset}}},
        serve_batch_size=batch,
        feedback_delay=delay,
    )
    served = rows[3:]  # periods 4..8: Θ0's period and the 4 updates
    blind = reset and any(-(-r // batch) < delay + 2 for r in served)
    assert bool(preflight(cfg, rows)) == blind


def test_lambda_zero_and_unwritable_memory():
    cfg = _cfg(
        {
            "A": {"update": "incremental", "memory": {**EXACT, "lambda": 0.0}},
            "B": {"update": "incremental", "memory": {**EXACT, "write": "errors", "error_threshold": 1.0}},
        }
    )
    found = {f.key: f for f in preflight(cfg, [375] * 8)}
    assert found["runs.A.memory.lambda"].level == "warning"
    assert found["runs.B.memory.error_threshold"].level == "error"


def test_no_update_keeps_the_memory_so_it_can_act():
    cfg = _cfg({"M": {"update": "none", "memory": EXACT}}, serve_batch_size=1024)
    # the model never changes, so the memory is never emptied: it is read from the second served period on
    assert preflight(cfg, [375] * 8) == []


# ------------------------------------------------------------------------------------- generators


def test_generator_that_never_serves_is_an_error():
    cfg = _cfg({"G": {"update": "incremental", "generator": {"asmg_gru": {"k": 4, "warmup": 1}}}})
    (f,) = preflight(cfg, [375] * 8)
    assert f.level == "error" and f.key == "runs.G.generator.asmg_gru" and "never acts" in f.message
    with pytest.raises(ConfigError, match="runs.G.generator.asmg_gru"):
        check_before_run(cfg, [375] * 8)


def test_generator_late_in_the_test_periods_is_a_warning():
    gen = {"G": {"update": "incremental", "generator": {"asmg_linear": {"k": 3, "warmup": 1}}}}
    (f,) = preflight(_cfg(gen, guard_periods=0), [375] * 8)  # from the 4th update on: the 2nd of 2 test periods
    assert f.level == "warning" and "first 1 of the 2 test periods" in f.message and "protocol.warmup" in f.message
    # the guard's out-of-sample check scores a generated model on one unseen period before it may serve
    (f,) = preflight(_cfg(gen), [375] * 8)
    assert f.level == "error" and "update 5 on at the earliest" in f.message and "out-of-sample" in f.message


@pytest.mark.slow
@pytest.mark.parametrize(
    "gen",
    [
        {"asmg_linear": {"k": 2, "warmup": 0}},
        {"asmg_linear": {"k": 3, "warmup": 1}},
        {"sml": {"warmup": 0}},
        {"sml": {"warmup": 2}},
        {"sml": {"warmup": 0, "init": "glorot"}},
        {"asmg_gru": {"k": 2, "warmup": 0}},
    ],
    ids=str,
)
def test_the_generator_rule_matches_the_protocol(gen):
    """The first period the generated model is served (metrics differ from IU) is the one the rule predicts."""
    # guard_margin inf: a generated model that is worse on the latest period is still served
    cfg = _cfg(
        {"G": {"update": "incremental", "generator": gen}},
        warmup=1,
        valid=1,
        test=2,
        guard_margin=float("inf"),
        guard_periods=0,  # nor held back for lack of out-of-sample evidence
    )
    stream = tiny_stream()
    iu = _metrics(cfg, stream, {"update": "incremental"})
    generated = _metrics(cfg, stream, {"update": "incremental", "generator": gen})
    first_served = next((g[0] for g, b in zip(generated, iu) if g != b), None)
    options = next(iter(gen.values()))
    identity = "asmg_linear" not in gen and options.get("init", "identity") == "identity"  # serves Θ_t untrained
    first_update = options.get("k", 1) + max(options["warmup"], int(identity))  # the rule in reloop.checks
    assert first_served == cfg.protocol.pretrain + 1 + first_update
    assert any(f.level == "warning" for f in preflight(cfg, [b - a for a, b in stream.bounds])) == (
        first_update > cfg.protocol.warmup + cfg.protocol.valid + 1
    )


# ------------------------------------------------------------------------------------- losses, updates


def test_training_loss_without_training_is_an_error():
    cfg = _cfg({"X": {"update": "none", "loss": {"self_correction": 0.5}}})
    (f,) = preflight(cfg, [375] * 8)
    assert f.level == "error" and f.key == "runs.X.loss"


def test_zero_weights_and_no_op_options_are_warnings():
    cfg = _cfg(
        {
            "A": {"update": "incremental", "loss": {"self_correction": 0.0}},
            "B": {"update": "incremental", "loss": {"distill": 0.0}},
            "C": {"update": "incremental", "loss": {"self_correction": 0.5, "y_last": "compensated"}},
            "D": {"update": {"replay": {"reservoir": 0.3, "ratio": 0.0}}},
        }
    )
    keys = {f.key for f in preflight(cfg, [375] * 8) if f.level == "warning"}
    assert keys == {
        "runs.A.loss.self_correction",
        "runs.B.loss.distill",
        "runs.C.loss.y_last",
        "runs.D.update.replay.ratio",
    }


def test_default_and_demo_configs_pass():
    from reloop.config import demo_config_path, load_config

    cfg = load_config(demo_config_path())
    assert preflight(cfg, [4000] * 31) == []
    assert preflight(tiny_config(), [375] * 8) == []


# ------------------------------------------------------------------------------------- before the run


def _write(tmp_path: Path, runs: dict, **protocol) -> Path:
    cfg = {
        "data": {
            "source": "synthetic",
            "synthetic": {"users": 60, "items": 40, "rows_per_period": 120, "periods": 8, "seed": 1},
            "periods": {"count": 8, "by": "rows"},
            "cache": str(tmp_path / "cache"),
        },
        "model": {"name": "lr"},
        "train": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 64},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0], **protocol},
        "runs": runs,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_warns_before_training_and_refuses_errors(tmp_path):
    path = _write(tmp_path, {"IU": {"update": "incremental"}, "ReLoop2": {"update": "incremental", "memory": EXACT}})
    res = runner.invoke(app, ["--threads", "1", "run", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning runs.ReLoop2.memory: can never act in any served period" in text
    assert "protocol.serve_batch_size <= 119" in text
    assert text.index("warning runs.ReLoop2.memory") < text.index("seed 0 IU")  # before the run
    path = _write(tmp_path, {"X": {"update": "none", "loss": "self_correction"}})
    res = runner.invoke(app, ["--threads", "1", "run", str(path), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert res.exit_code == 2 and "runs.X.loss" in res.output
    assert not (tmp_path / "o2" / "periods.csv").exists()


def test_data_inspect_lists_the_findings(tmp_path):
    path = _write(tmp_path, {"ReLoop2": {"update": "incremental", "memory": EXACT}})
    res = runner.invoke(app, ["data", "inspect", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "warning runs.ReLoop2.memory" in res.output
