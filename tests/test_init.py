"""`reloop init DATA` -> `reloop run reloop.yaml`: the quickstart on a generated file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from reloop.cli import app
from reloop.config import load_config
from reloop.init_config import (
    MIN_PERIOD_ROWS,
    MIN_PERIODS,
    InitError,
    profile_file,
    render_config,
    size_protocol,
    write_config,
)
from reloop.preflight import preflight

runner = CliRunner()
FAST = ["--set", "model={name: lr}", "--set", "protocol.seeds=[0]", "--set", "train.pretrain_epochs=1"]


def clicks(n: int = 2400, seed: int = 0, time: str = "unix") -> pl.DataFrame:
    """A click log with drift-free planted effects, the column kinds init must tell apart, and noise columns."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 60, n)
    users = rng.integers(0, 90, n)
    w = rng.normal(0, 1.5, 60)
    price = rng.gamma(2.0, 5.0, n).round(2)
    label = (rng.random(n) < 1 / (1 + np.exp(-(w[items] - 0.05 * price)))).astype(int)
    ts = 1_700_000_000 + np.sort(rng.integers(0, 30 * 86_400, n))
    frame = {
        "event_time": ts if time == "unix" else [f"{np.datetime64(int(t), 's')}Z" for t in ts],
        "clicked": label,
        "uid": [f"u{u}" for u in users],
        "item_id": [f"i{i}" for i in items],
        "category": [f"c{i % 7}" for i in items],
        "price": price,
        "tags": ["|".join(f"t{(i + j) % 9}" for j in range(1 + i % 3)) for i in items],
        "impression_id": [f"imp{k}" for k in range(n)],
        "site": ["main"] * n,
    }
    return pl.DataFrame(frame)


def test_profile_finds_every_role(tmp_path):
    path = tmp_path / "my.csv"
    clicks().write_csv(path, separator=";")
    profile = profile_file(path)
    assert profile.delimiter == ";" and profile.rows == 2400
    assert (profile.label, profile.time, profile.user) == ("clicked", "event_time", "uid")
    kinds = {c.name: (c.role, c.kind) for c in profile.columns}
    assert kinds["item_id"] == ("feature", "categorical")
    assert kinds["category"] == ("feature", "categorical")
    assert kinds["price"] == ("feature", "numeric")
    assert kinds["tags"] == ("feature", "sequence")
    assert kinds["uid"] == ("user", "categorical")
    assert kinds["impression_id"][0] == "skipped" and kinds["site"][0] == "skipped"
    assert profile.column("item_id").distinct == 60


@pytest.mark.slow
def test_init_then_run_is_the_quickstart(tmp_path, monkeypatch):
    """Exactly the quickstart: `reloop init my.csv` then `reloop run reloop.yaml` (smaller model and one seed)."""
    monkeypatch.chdir(tmp_path)
    clicks().write_csv("my.csv")
    res = runner.invoke(app, ["init", "my.csv"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "wrote reloop.yaml; next: reloop run reloop.yaml" in " ".join(res.output.split())
    text = Path("reloop.yaml").read_text()
    assert text.count("#") > 10  # commented
    res = runner.invoke(app, ["--threads", "1", "run", "reloop.yaml", "--out", "out", "--no-progress", *FAST])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output  # every generated run can act
    with open("out/summary.csv") as fh:
        runs = {r["run"] for r in csv.DictReader(fh)}
    assert runs == {"no-update", "IU", "ReLoop", "ASMG-GRU", "ReLoop2"}


def test_generated_config_keys_exist_and_validate(tmp_path):
    path = tmp_path / "log.csv"
    clicks(time="iso").write_csv(path)
    _, text = write_config(path, tmp_path / "cfg" / "reloop.yaml")
    cfg = load_config(tmp_path / "cfg" / "reloop.yaml")  # unknown keys would fail here
    assert cfg.data["time"] == "event_time" and cfg.data["features"]["tags"] == {"kind": "sequence", "separator": "|"}
    assert Path(cfg.data["path"]).resolve() == path.resolve()
    assert "delimiter" in yaml.safe_load(text)["data"]


def test_refuses_to_overwrite_and_explains(tmp_path):
    path = tmp_path / "log.csv"
    clicks().write_csv(path)
    (tmp_path / "reloop.yaml").write_text("mine\n")
    with pytest.raises(InitError, match="--force"):
        write_config(path, tmp_path / "reloop.yaml")
    write_config(path, tmp_path / "reloop.yaml", force=True)
    assert (tmp_path / "reloop.yaml").read_text() != "mine\n"


def test_no_time_column_uses_file_order_and_rows(tmp_path):
    path = tmp_path / "log.csv"
    clicks().drop("event_time").write_csv(path)
    _, text = write_config(path, tmp_path / "reloop.yaml")
    data = yaml.safe_load(text)["data"]
    assert data["time"] is None and data["periods"]["by"] == "rows"
    assert "no time column" in text


def test_time_with_gaps_falls_back_to_rows(tmp_path):
    frame = clicks()
    gap = frame.with_columns(
        pl.when(pl.int_range(pl.len()) >= 1200)
        .then(pl.col("event_time") + 90 * 86_400)
        .otherwise(pl.col("event_time"))
        .alias("event_time")
    )
    gap.write_csv(tmp_path / "log.csv")
    _, text = write_config(tmp_path / "log.csv", tmp_path / "reloop.yaml")
    assert yaml.safe_load(text)["data"]["periods"]["by"] == "rows"


def test_label_must_be_found_or_named(tmp_path):
    frame = (
        clicks().rename({"clicked": "outcome"}).with_columns(is_ad=pl.col("outcome") * 0 + (pl.int_range(pl.len()) % 2))
    )
    frame.write_csv(tmp_path / "two.csv")
    with pytest.raises(InitError, match="--label"):
        profile_file(tmp_path / "two.csv")
    assert profile_file(tmp_path / "two.csv", label="outcome").label == "outcome"
    with pytest.raises(InitError, match="0/1"):
        profile_file(tmp_path / "two.csv", label="price")


def test_wrong_delimiter_says_so(tmp_path):
    clicks().write_csv(tmp_path / "semi.csv", separator=";")
    res = runner.invoke(
        app, ["init", str(tmp_path / "semi.csv"), "--delimiter", ",", "--out", str(tmp_path / "r.yaml")]
    )
    assert res.exit_code == 1 and "--delimiter" in res.output


def test_tab_separated(tmp_path):
    clicks().write_csv(tmp_path / "t.tsv", separator="\t")
    assert profile_file(tmp_path / "t.tsv").delimiter == "\t"
    assert profile_file(tmp_path / "t.tsv", delimiter="\\t").label == "clicked"  # `--delimiter '\t'`
    _, text = write_config(tmp_path / "t.tsv", tmp_path / "r.yaml")
    assert yaml.safe_load(text)["data"]["delimiter"] == "\t"


def test_header_only_file(tmp_path):
    (tmp_path / "h.csv").write_text("event_time,clicked,uid\n")
    res = runner.invoke(app, ["init", str(tmp_path / "h.csv"), "--out", str(tmp_path / "r.yaml")])
    assert res.exit_code == 1 and "no data rows" in res.output


def test_parquet(tmp_path):
    clicks().write_parquet(tmp_path / "log.parquet")
    profile, text = write_config(tmp_path / "log.parquet", tmp_path / "reloop.yaml")
    assert profile.source == "parquet" and "delimiter" not in text
    assert profile.column("price").dtype == "float" and profile.column("clicked").role == "label"


@given(rows=st.integers(MIN_PERIODS * MIN_PERIOD_ROWS, 200_000))
@settings(max_examples=200, deadline=None)
def test_protocol_sizing_fits_the_rows(rows):
    p = size_protocol(rows)
    assert p.pretrain + 1 + p.warmup + p.valid + p.test == p.count <= 31
    assert rows // p.count >= MIN_PERIOD_ROWS
    assert p.warmup >= 3 and p.valid >= 1 and p.test >= 2
    # ASMG-GRU (k 3, warm-up 1) serves a generated model in every test period
    assert 3 + 1 <= p.warmup + p.valid + 1


@pytest.mark.parametrize("rows", [1000, 1700, 3100, 20_000])
def test_every_generated_run_can_act(tmp_path, rows):
    clicks(rows).write_csv(tmp_path / "log.csv")
    profile = profile_file(tmp_path / "log.csv")
    text = render_config(profile, tmp_path / "reloop.yaml")
    from reloop.config import parse_config

    cfg = parse_config(yaml.safe_load(text), base_dir=tmp_path)
    assert preflight(cfg, profile.period_rows) == []


def test_too_few_rows(tmp_path):
    clicks(300).write_csv(tmp_path / "small.csv")
    with pytest.raises(InitError, match="too few"):
        write_config(tmp_path / "small.csv", tmp_path / "r.yaml")
