"""Automatic torch thread count (reloop.threads) and the --threads option."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from reloop import threads as rt
from reloop.cli import app
from reloop.threads import (
    SMALL_WORK,
    HostLoad,
    choose_threads,
    dense_work,
    parse_threads,
)

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("RELOOP_THREADS", raising=False)
    setting = rt._COMMAND_SETTING
    yield
    rt._COMMAND_SETTING = setting
    torch.set_num_threads(before)


def test_small_model_gets_one_thread_even_on_an_idle_host():
    load = HostLoad(cpus=16, host_cpus=16, busy=0.0)
    choice = choose_threads(SMALL_WORK / 10, load)
    assert choice.threads == 1 and "small model" in choice.reason


def test_busy_host_gets_one_thread_for_any_model():
    """Issue 17: a 2-core host with one core kept busy by another process."""
    load = HostLoad(cpus=2, host_cpus=2, busy=1.0)
    assert choose_threads(SMALL_WORK * 100, load).threads == 1
    assert choose_threads(None, load).threads == 1


def test_large_model_on_a_free_host_uses_the_free_cpus():
    assert choose_threads(SMALL_WORK * 10, HostLoad(cpus=8, host_cpus=8, busy=0.1)).threads == 8
    assert choose_threads(SMALL_WORK * 10, HostLoad(cpus=8, host_cpus=8, busy=3.0)).threads == 5
    # a container with 4 of a 64-CPU host's cores, the host half busy: 2 of ours are free
    assert choose_threads(SMALL_WORK * 10, HostLoad(cpus=4, host_cpus=64, busy=32.0)).threads == 2


@given(
    work=st.one_of(st.none(), st.floats(0, 1e12)),
    cpus=st.integers(1, 256),
    host_extra=st.integers(0, 256),
    busy=st.floats(0, 600),
    more_busy=st.floats(0, 100),
)
@settings(max_examples=300, deadline=None)
def test_choice_is_within_the_cpus_and_never_grows_with_load(work, cpus, host_extra, busy, more_busy):
    host = cpus + host_extra
    a = choose_threads(work, HostLoad(cpus, host, busy))
    b = choose_threads(work, HostLoad(cpus, host, busy + more_busy))
    assert a.threads in range(1, cpus + 1) and b.threads in range(1, cpus + 1)
    assert b.threads <= a.threads


def test_dense_work_leaves_embedding_tables_out():
    from conftest import tiny_stream

    from reloop.models.base import build_model

    fm = tiny_stream().feature_map
    small = build_model({"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]}, fm)
    big = build_model({"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [256, 256]}, fm)
    tables = sum(p.numel() for n, p in small.named_parameters() if "embed" in n)
    assert tables > 0
    assert dense_work(small, 100) < (sum(p.numel() for p in small.parameters()) - tables + 1) * 100
    assert dense_work(big, 100) > 100 * 256 * 256
    assert dense_work(big, 200) == 2 * dense_work(big, 100)


@pytest.mark.parametrize(
    "value, parsed", [("auto", "auto"), ("AUTO", "auto"), ("3", 3), (2, 2), (None, None), ("", None)]
)
def test_parse_threads(value, parsed):
    assert parse_threads(value) == parsed


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", True])
def test_parse_threads_refuses_nonsense(value):
    with pytest.raises(ValueError, match="auto"):
        parse_threads(value)


def test_cgroup_quota_caps_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(rt, "_cgroup_cpus", lambda: 1.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    assert rt.usable_cpus() == 2
    monkeypatch.setattr(rt, "_cgroup_cpus", lambda: None)
    assert rt.usable_cpus() == 4


def test_host_load_takes_the_larger_of_load_average_and_the_sample(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    monkeypatch.setattr(rt, "sampled_busy_cpus", lambda seconds: 1.7)
    assert rt.host_load().busy == pytest.approx(1.7)
    monkeypatch.setattr(rt, "sampled_busy_cpus", lambda seconds: None)  # not Linux
    assert rt.host_load().busy == pytest.approx(0.2)


def test_sampled_busy_cpus_sees_a_busy_loop():
    """A process spinning on one CPU shows up as about one busy CPU (more when the host is busier)."""
    if rt._cpu_times() is None:
        pytest.skip("no /proc/stat")
    import subprocess
    import sys

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = rt.sampled_busy_cpus(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and busy >= 0.7


def test_apply_threads_sets_torch_and_says_why(monkeypatch):
    torch.set_num_threads(2)
    choice = rt.apply_threads("auto", work=1.0, load=HostLoad(4, 4, 0.0))
    assert torch.get_num_threads() == 1 and choice.threads == 1 and "small model" in choice.describe()
    choice = rt.apply_threads(3, work=None)
    assert torch.get_num_threads() == 3 and "--threads" in choice.reason
    torch.set_num_threads(2)
    assert rt.apply_threads(None, work=None) is None and torch.get_num_threads() == 2


def test_cli_threads_option(tmp_path):
    res = runner.invoke(app, ["--threads", "0", "models"])
    assert res.exit_code == 2 and "auto" in res.output
    res = runner.invoke(app, ["--threads", "1", "models"])
    assert res.exit_code == 0 and rt.current_setting() == 1 and torch.get_num_threads() == 1
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and rt.current_setting() == "auto"
    res = runner.invoke(app, ["models"], env={"RELOOP_THREADS": "3"})
    assert res.exit_code == 0 and rt.current_setting() == 3 and torch.get_num_threads() == 3


def test_run_logs_the_automatic_choice(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setattr(rt, "host_load", lambda sample_seconds=rt.SAMPLE_SECONDS: HostLoad(8, 8, 0.0))
    torch.set_num_threads(4)
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
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "threads: 1 (auto: small model" in res.output and torch.get_num_threads() == 1


def test_large_model_rechecks_the_host_before_each_run(tmp_path, monkeypatch):
    """Above SMALL_WORK the choice follows the host: other work starting between runs drops the threads."""
    import yaml

    loads = iter([HostLoad(4, 4, 0.0), HostLoad(4, 4, 0.0), HostLoad(4, 4, 3.0)])
    monkeypatch.setattr(rt, "host_load", lambda sample_seconds=rt.SAMPLE_SECONDS: next(loads))
    monkeypatch.setattr(rt, "SMALL_WORK", 0)
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
        "runs": {"IU": {"update": "incremental"}, "none": {"update": "none"}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(
        app, ["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--no-progress"], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("threads:")]
    assert lines == [
        "threads: 4 (auto: 4 usable CPUs, 0.0 busy with other work)",
        "threads: 1 (auto: 4 usable CPUs, 3.0 busy with other work)",
    ], res.output
    assert torch.get_num_threads() == 1
