"""Shared fixtures: a tiny drifting stream built in memory (no files, runs everywhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

# pytest -n 2 runs two workers on two cores: one intra-op thread each avoids oversubscription,
# which slows small-model training by an order of magnitude.
torch.set_num_threads(1)

from reloop.config import parse_config
from reloop.data.encode import FeatureEncoder
from reloop.data.periods import PeriodsConfig, period_bounds
from reloop.data.schema import FeatureSchema, FeatureSpec
from reloop.data.tensors import PeriodTensors, Stream

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ML100K = SHARED_DATA / "movielens-100k"
needs_ml100k = pytest.mark.skipif(
    not (ML100K / "u.data").exists(), reason="needs ../shared/data/movielens-100k (the shared real data)"
)


def tiny_frame(n: int = 3000, periods: int = 8, seed: int = 0) -> pl.DataFrame:
    """Users × items with a planted logistic click model whose item effects flip halfway."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, n)
    items = rng.integers(0, 40, n)
    w_item = rng.normal(0, 1.5, 40)
    w_user = rng.normal(0, 0.5, 60)
    half = np.arange(n) >= n // 2
    logit = w_user[users] + np.where(half, -w_item[items], w_item[items])
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    tags = [[f"t{(i + j) % 7}" for j in range(1 + i % 3)] for i in items]
    return pl.DataFrame(
        {
            "label": label,
            "time": np.arange(n, dtype=np.int64) * 10,
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{i}" for i in items],
            "price": rng.normal(10, 3, n),
            "tags": tags,
        }
    )


TINY_SCHEMA = FeatureSchema(
    features=[
        FeatureSpec(name="user_id"),
        FeatureSpec(name="item_id"),
        FeatureSpec(name="price", kind="numeric"),
        FeatureSpec(name="tags", kind="sequence", max_len=3),
    ],
    user="user_id",
)


def tiny_stream(n: int = 3000, periods: int = 8, pretrain: int = 3, seed: int = 0) -> Stream:
    import torch

    frame = tiny_frame(n, periods, seed)
    bounds = period_bounds(frame["time"].to_numpy(), PeriodsConfig(count=periods))
    enc = FeatureEncoder(TINY_SCHEMA)
    enc.fit_capacities(frame.slice(0, bounds[pretrain - 1][1]))
    cols = enc.transform(frame)
    cols["row"] = torch.arange(len(frame))
    return Stream(enc.feature_map(), PeriodTensors(cols), bounds)


def tiny_config(**runs):
    raw = {
        "data": {"source": "synthetic", "periods": {"count": 8}},
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 128, "lr": 0.01},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0], "serve_batch_size": 128},
        "runs": runs or {"IU": {"update": "incremental"}},
    }
    return parse_config(raw)


@pytest.fixture(scope="session")
def stream() -> Stream:
    return tiny_stream()
