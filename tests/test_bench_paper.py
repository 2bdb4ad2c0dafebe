"""`reloop bench paper`: section selection, config validation and the report, on a tiny synthetic stream."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from reloop.bench.paper import SECTIONS, section_config, select_sections
from reloop.cli import app
from reloop.config import ConfigError

runner = CliRunner()
TINY = [
    "--set",
    "data.synthetic.rows_per_period=300",
    "--set",
    "data.synthetic.users=200",
    "--set",
    "data.synthetic.items=100",
    "--set",
    "train.pretrain_epochs=1",
]


def test_select_sections_by_name_and_group():
    assert [s.name for s in select_sections(["asmg"])] == ["asmg"]
    zoo = select_sections(["zoo"])
    assert len(zoo) > 10 and all(s.name.startswith("zoo-") for s in zoo)
    assert len(select_sections(None)) == len(SECTIONS)
    with pytest.raises(ValueError, match="unknown \\['nope'\\]"):
        select_sections(["nope"])


def test_every_section_config_is_valid():
    for section in SECTIONS:
        cfg = section_config(section, "synthetic", [0])
        assert "IU" in cfg.runs, section.name  # every table is read against IU
        assert (cfg.data["synthetic"].get("history") == 30) == section.history, section.name


def test_bad_set_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="synthetic.rows"):
        section_config(SECTIONS[0], "synthetic", [0], overrides={"data.synthetic.rows": 5})
    res = runner.invoke(
        app,
        [
            "--threads",
            "1",
            "bench",
            "paper",
            "--data",
            "synthetic",
            "--seeds",
            "1",
            "--section",
            "asmg",
            "--out",
            str(tmp_path),
            "--set",
            "data.synthetic.rows=5",
        ],
    )
    assert res.exit_code == 2 and "config error" in res.output
    assert not (tmp_path / "asmg").exists()


@pytest.mark.slow
def test_report_with_two_workers(tmp_path):
    res = runner.invoke(
        app,
        [
            "--threads",
            "1",
            "bench",
            "paper",
            "--data",
            "synthetic",
            "--seeds",
            "1",
            "--section",
            "zoo-lr",
            "--section",
            "zoo-din",
            "--section",
            "reloop2-delay1",
            "--jobs",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
            *TINY,
        ],
    )
    assert res.exit_code == 0, res.output
    report = (tmp_path / "report.md").read_text()
    assert "## ReLoop2 with labels one serving batch late" in report
    assert "| IU+sketch |" in report
    # The zoo group is one table; sequence models get the data's history feature.
    assert "| lr | " in report and "| din | " in report and "skipped" not in report
    assert (tmp_path / "reloop2-delay1" / "periods.png").exists()
    assert (tmp_path / "zoo-lr" / "summary.csv").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc (Linux)")
def test_sigterm_takes_the_workers_down(tmp_path):
    """A report killed with SIGTERM leaves no worker processes behind (they would keep writing)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reloop.cli",
            "--threads",
            "1",
            "bench",
            "paper",
            "--data",
            "synthetic",
            "--seeds",
            "3",
            "--section",
            "asmg",
            "--section",
            "combos",
            "--jobs",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
            *TINY,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def children() -> list[int]:
        kids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):  # the process ended meanwhile
                continue
            if int(fields[1]) == proc.pid:  # fields[1] is the parent pid
                kids.append(int(entry))
        return kids

    deadline = time.time() + 60
    while len(children()) < 2 and time.time() < deadline:  # the two workers (and a resource tracker)
        time.sleep(0.2)
    kids = children()
    assert len(kids) >= 2, "workers never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(1.0)
    alive = []
    for pid in kids:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/status") as fh:
                if "zombie" not in fh.read():
                    alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    assert not alive, f"workers still running after SIGTERM: {alive}"
