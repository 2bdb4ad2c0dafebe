"""The protocol on a stream kept on disk as Parquet shards (``ShardedStream``) gives the in-memory results."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

from reloop.data.shards import ShardedStream, period_dir, write_tensors
from reloop.protocol.runner import pretrain, run_one

RUNS = {
    "IU": {"update": "incremental"},
    "BU": {"update": {"batch": 2}},
    "sketch": {"update": "incremental", "memory": {"sketch": {"arrays": 4, "bits": 4}, "lambda": 0.3}},
}


def _sharded(stream, root, **reader) -> ShardedStream:
    for i in range(1, stream.n_periods + 1):
        write_tensors(stream.period(i), period_dir(root, i), rows_per_file=150, row_group_rows=64)
    return ShardedStream(root, stream.feature_map, meta=stream.meta, **reader)


def _metrics(rows):
    return [(r["period"], r["auc"], r["gauc"], r["logloss"], r["rows"]) for r in rows]


def test_periods_bounds_and_slices_match_the_in_memory_stream(stream, tmp_path):
    sharded = _sharded(stream, tmp_path, read_rows=100)
    assert sharded.bounds == stream.bounds and len(sharded.rows) == len(stream.rows)
    assert len(sharded.periods(2, 4)) == len(stream.periods(2, 4))
    got = sharded.periods(2, 4).slice(100, 700).data  # across chunks and period directories
    want = stream.periods(2, 4).slice(100, 700).data
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with pytest.raises(IndexError):
        sharded.period(stream.n_periods + 1)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_on_shards_gives_the_in_memory_metrics(stream, tmp_path, name):
    """A shuffle window that holds a whole period shuffles as in memory, so every metric is equal."""
    cfg = tiny_config(**{name: RUNS[name]})
    sharded = _sharded(stream, tmp_path / "shards", read_rows=100, shuffle_rows=10**6)
    theta0, opt0 = pretrain(cfg, stream, 0)
    theta0_s, opt0_s = pretrain(cfg, sharded, 0)
    for a, b in zip(theta0.state_dict().values(), theta0_s.state_dict().values()):
        assert torch.equal(a, b)
    want = run_one(cfg, stream, name, cfg.runs[name], 0, copy.deepcopy(theta0), opt0)
    got = run_one(cfg, sharded, name, cfg.runs[name], 0, theta0_s, opt0_s, out=tmp_path / "out")
    assert _metrics(got) == _metrics(want)
