"""``reloop tune``: settings chosen on the valid periods only, from search spaces the components declare."""

from __future__ import annotations

import pytest
import torch

from reloop.config import RunSpec, parse_config
from reloop.data.prepare import prepare_stream
from reloop.data.tensors import Stream
from reloop.memory.config import MemoryConfig, SketchConfig
from reloop.protocol import tune as T
from reloop.update.losses import SelfCorrection
from reloop.update.strategies import BatchWindow
from reloop.update.trainer import TrainConfig


def _cfg(tmp_path, runs):
    return parse_config(
        {
            "data": {
                "source": "synthetic",
                "synthetic": {"users": 50, "items": 30, "rows_per_period": 200, "periods": 9, "seed": 0},
                "periods": {"count": 9, "by": "rows"},
                "cache": str(tmp_path / "cache"),
            },
            "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
            "train": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 64, "lr": 0.01},
            "protocol": {"pretrain": 3, "warmup": 1, "valid": 2, "test": 2, "seeds": [0]},
            "runs": runs,
        }
    )


def test_search_space_comes_from_the_components():
    spec = RunSpec(
        update={"batch": 3}, loss={"self_correction": 0.5}, memory={"sketch": {"arrays": 8, "bits": 4}, "lambda": 0.3}
    )
    space = dict(T.run_search_space(spec))
    assert space["update.batch"] == BatchWindow.search_space["window"]
    assert space["loss.self_correction"] == SelfCorrection.search_space["weight"]
    assert space["memory.lambda"] == MemoryConfig.search_space["lambda"]
    assert space["memory.sketch.bits"] == SketchConfig.search_space["bits"]
    assert dict(T.run_search_space(RunSpec())) == {}  # IU has nothing to tune (base training aside)


@pytest.mark.parametrize(
    "spec, key, value, expect",
    [
        (RunSpec(loss="self_correction"), "loss.self_correction", 0.3, {"self_correction": 0.3}),
        (
            RunSpec(loss={"self_correction": 0.5, "scale": "normalized"}),
            "loss.self_correction",
            0.1,
            {"self_correction": 0.1, "scale": "normalized"},
        ),
        (RunSpec(update={"batch": 3}), "update.batch", 5, {"batch": 5}),
        (RunSpec(generator="sml"), "generator.sml.lr", 1e-4, {"sml": {"lr": 1e-4}}),
    ],
)
def test_apply_setting_writes_the_yaml_shape(spec, key, value, expect):
    slot = key.split(".")[0]
    out = T.apply_setting(spec, key, value)
    assert getattr(out, slot) == expect


def test_apply_setting_in_the_memory_block():
    spec = RunSpec(memory={"sketch": {"arrays": 8, "bits": 4}, "lambda": 0.3})
    out = T.apply_setting(T.apply_setting(spec, "memory.lambda", 0.8), "memory.sketch.bits", 6)
    assert out.memory == {"sketch": {"arrays": 8, "bits": 6}, "lambda": 0.8}


def test_tune_never_reads_a_test_period_and_keeps_the_best_valid_score(tmp_path, monkeypatch):
    """Every period any trial trains on or serves is at most the last valid one (fails if a trial runs into
    the test periods, e.g. without ``stop_after``), and the chosen setting has the best validation score."""
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, {"IU": {"update": "incremental"}, "SC": {"update": "incremental", "loss": "self_correction"}})
    stream = prepare_stream(cfg.data, cfg.protocol.pretrain).stream
    seen: list[int] = []
    real_period = Stream.period

    def spy(self, t):
        seen.append(t)
        return real_period(self, t)

    monkeypatch.setattr(Stream, "period", spy)
    monkeypatch.setattr(TrainConfig, "search_space", {"lr": [0.003]})
    result = T.tune(cfg, stream)
    p = cfg.protocol
    last_valid = p.pretrain + p.warmup + p.valid
    assert seen and max(seen) == last_valid
    sc = [t for t in result.trials if t.run == "SC"]
    assert len(sc) == 1 + len(SelfCorrection.search_space["weight"]) - 1  # as written (0.5) + the others
    best = max(sc, key=lambda t: t.score())
    assert best.chosen and sum(t.chosen for t in sc) == 1
    chosen_alpha = best.setting.get("loss.self_correction", 0.5)
    assert result.config.runs["SC"].loss == {"self_correction": chosen_alpha}
    train = [t for t in result.trials if t.run == "train"]
    assert len(train) == 2 and sum(t.chosen for t in train) == 1
    assert result.config.train.lr == (0.003 if train[1].chosen else cfg.train.lr)


def test_tune_refuses_a_protocol_without_valid_periods(tmp_path):
    cfg = _cfg(tmp_path, {"IU": {"update": "incremental"}})
    cfg = cfg.model_copy(update={"protocol": cfg.protocol.model_copy(update={"valid": 0})})
    with pytest.raises(ValueError, match="protocol.valid"):
        T.tune(cfg, None)  # type: ignore[arg-type]


def test_combine_run_mixes_its_experts_online(tmp_path):
    """A ``combine:`` run serves the Hedge mixture: the first batch with the prior's (uniform) weights —
    its own labels have not arrived — and over the served rows a log loss within the stated bound of the
    best expert's (fails if the weights move before a batch is served, or the mixture is mis-aligned)."""
    import math

    import numpy as np

    from reloop.protocol.runner import pretrain, run_seed

    torch.set_num_threads(1)
    cfg = _cfg(
        tmp_path,
        {
            "IU": {"update": "incremental"},
            "frozen": {"update": "none"},
            "mix": {
                "update": "incremental",
                "loss": {"self_correction": 0.3},
                "combine": {"experts": ["IU", "frozen"], "hedge": {"eta": 0.05}},
            },
        },
    )
    stream = prepare_stream(cfg.data, cfg.protocol.pretrain).stream
    theta0, optim0 = pretrain(cfg, stream, 0)
    served: dict = {}
    from reloop.protocol import runner

    real = runner.run_one

    def keep(*a, **k):
        rows = real(*a, **k)
        served[a[2]] = k["served_out"]["final"].clone()
        return rows

    runner.run_one = keep
    try:
        rows = run_seed(cfg, stream, 0, theta0, optim0)
    finally:
        runner.run_one = real
    mix = [r for r in rows if r["run"] == "mix"]
    assert len(mix) == cfg.protocol.served_periods + 1 and all("weights" in r for r in mix)
    assert set(mix[-1]["weights"]) == {"mix", "IU", "frozen"}
    # Replay the first batch by hand: uniform weights over the three experts.
    start, end = stream.bounds[cfg.protocol.pretrain]
    first = torch.stack([served[n][start : start + 10] for n in ("mix", "IU", "frozen")]).clamp(1e-6, 1 - 1e-6)
    labels = stream.period(cfg.protocol.pretrain + 1).data["label"].numpy()
    from reloop.combine import CombineOptions, log_loss
    from reloop.protocol.combined import combine_served

    mixed_rows, hedge, mixed = combine_served(
        cfg,
        stream,
        "mix",
        {n: served[n] for n in ("mix", "IU", "frozen")},
        0,
        CombineOptions(experts=["IU", "frozen"], hedge={"eta": 0.05}),
    )
    assert [r["auc"] for r in mixed_rows] == [r["auc"] for r in mix]
    assert hedge.mixture_loss <= min(hedge.losses.values()) + hedge.guarantee() + 1e-9
    # the bound is not vacuous here: the mixture is close to the best expert
    assert hedge.mixture_loss / hedge.rows <= min(hedge.losses.values()) / hedge.rows + 0.05
    assert torch.allclose(mixed[start : start + 10], first.mean(0).float(), atol=1e-6)  # prior weights
    assert math.isfinite(float(log_loss(first.mean(0), torch.as_tensor(labels[:10])).mean()))
    assert np.isfinite([r["logloss"] for r in mix]).all()


def test_cli_tune_writes_the_trials_the_chosen_config_and_results(tmp_path):
    """``reloop tune`` end to end on a tiny stream: tune.csv has one chosen trial per tuned run, tuned.yaml
    loads and holds the chosen α, and the chosen config's summary is written."""
    import csv

    import yaml
    from typer.testing import CliRunner

    from reloop.cli import app
    from reloop.config import load_config

    cfg = _cfg(tmp_path, {"IU": {"update": "incremental"}, "SC": {"update": "incremental", "loss": "self_correction"}})
    raw = yaml.safe_load(cfg.model_dump_json())
    raw["runs"] = {"IU": {"update": "incremental"}, "SC": {"update": "incremental", "loss": "self_correction"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["--threads", "1", "tune", str(path), "--out", str(out), "--no-train", "--run", "SC", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    trials = list(csv.DictReader((out / "tune.csv").open()))
    assert {t["run"] for t in trials} == {"SC"} and sum(int(t["chosen"]) for t in trials) == 1
    best = max(trials, key=lambda t: float(t["valid_auc"]))
    tuned = load_config(out / "tuned.yaml")
    expect = float(best["setting"].split("=")[1]) if "=" in best["setting"] else 0.5
    assert tuned.runs["SC"].loss == {"self_correction": expect}
    assert (out / "summary.md").exists() and (out / "periods.csv").exists()
    assert "tune.csv" in r.output and "tuned.yaml" in r.output
