"""When ``run_one`` writes its checkpoint (``runner._Checkpoints``), and that resuming from any of them is exact."""

from __future__ import annotations

import copy

import pytest
from conftest import tiny_config

from reloop.protocol import runner
from reloop.protocol.runner import load_checkpoint, pretrain, run_one

SKETCH = {"sketch": {"arrays": 4, "bits": 4}, "lambda": 0.3}
RUNS = {
    "IU": {"update": "incremental"},
    "SC": {"update": "incremental", "loss": {"self_correction": 0.5}},
    "sketch": {"update": "incremental", "memory": SKETCH},
    "gru": {"update": "incremental", "generator": {"asmg_gru": {"k": 2, "hidden": 2}}},
}


class Killed(Exception):
    pass


def _metrics(rows):
    return [(r["period"], r["auc"], r["logloss"], r["rows"]) for r in rows]


def _spy(monkeypatch) -> list[int]:
    """The period of every checkpoint written."""
    written: list[int] = []
    save = runner._atomic_save

    def spy(obj, path):
        written.append(obj["t"])
        save(obj, path)

    monkeypatch.setattr(runner, "_atomic_save", spy)
    return written


def test_writes_wait_for_enough_work_but_never_skip_the_first_last_or_stop_period(stream, tmp_path, monkeypatch):
    cfg = tiny_config()
    P, last = cfg.protocol.pretrain, cfg.protocol.pretrain + cfg.protocol.served_periods
    theta0, opt0 = pretrain(cfg, stream, 0)
    written = _spy(monkeypatch)
    monkeypatch.setattr(runner, "CHECKPOINT_WORK_RATIO", 1e9)  # a write "costs" more than any run
    run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0, out=tmp_path / "a")
    assert written == [P + 1, last]
    written.clear()
    run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0, out=tmp_path / "b", stop_after=P + 2)
    assert written == [P + 1, P + 2]
    written.clear()
    monkeypatch.setattr(runner, "CHECKPOINT_WORK_RATIO", 0.0)  # writes are free: every period
    run_one(cfg, stream, "IU", cfg.runs["IU"], 0, theta0, opt0, out=tmp_path / "c")
    assert written == list(range(P + 1, last + 1))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_killed_after_unwritten_periods_resumes_to_the_same_metrics(stream, tmp_path, monkeypatch, name):
    """Killed two periods after its last checkpoint, the run redoes them from it and ends as if never killed."""
    cfg = tiny_config(**{name: RUNS[name]})
    P = cfg.protocol.pretrain
    theta0, opt0 = pretrain(cfg, stream, 0)
    straight = run_one(cfg, stream, name, cfg.runs[name], 0, copy.deepcopy(theta0), opt0)

    monkeypatch.setattr(runner, "CHECKPOINT_WORK_RATIO", 1e9)

    def kill(t: int) -> None:
        if t == P + 3:
            raise Killed

    with pytest.raises(Killed):
        run_one(cfg, stream, name, cfg.runs[name], 0, copy.deepcopy(theta0), opt0, out=tmp_path, on_period=kill)
    assert load_checkpoint(runner._checkpoint_path(tmp_path, name, 0))["t"] == P + 1  # P+2, P+3 were lost
    resumed = run_one(cfg, stream, name, cfg.runs[name], 0, copy.deepcopy(theta0), opt0, out=tmp_path, resume=True)
    assert _metrics(resumed) == _metrics(straight)
