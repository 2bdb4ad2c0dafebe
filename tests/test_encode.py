"""Encoders never see the future; tables have fixed capacity with hashed overflow; OOV path."""

import numpy as np
import polars as pl
import pytest
import torch
from conftest import TINY_SCHEMA, tiny_frame
from hypothesis import given, settings
from hypothesis import strategies as st

from reloop.data.encode import EncoderConfig, FeatureEncoder
from reloop.data.periods import PeriodsConfig, period_bounds, phase_of
from reloop.data.schema import N_RESERVED, OOV, PAD, FeatureSchema, FeatureSpec

SCHEMA = FeatureSchema(
    features=[FeatureSpec(name="item"), FeatureSpec(name="hist", kind="sequence", vocab="item", max_len=4)]
)

ids = st.lists(st.sampled_from([f"x{i}" for i in range(30)]), min_size=1, max_size=120)


def _frame(items, seed=0):
    rng = np.random.default_rng(seed)
    hist = [list(rng.choice(items, size=rng.integers(0, 4))) for _ in items]
    return pl.DataFrame(
        {"item": items, "hist": hist, "label": [0] * len(items)},
        schema={"item": pl.String, "hist": pl.List(pl.String), "label": pl.Int8},
    )


@settings(max_examples=40, deadline=None)
@given(ids, st.integers(1, 119), st.integers(1, 40))
def test_encoding_a_prefix_equals_the_prefix_of_the_encoding(items, cut, capacity):
    """Whatever comes later never changes the ids given to earlier rows (no look-ahead)."""
    cut = min(cut, len(items))
    frame = _frame(items)
    schema = FeatureSchema(
        features=[
            FeatureSpec(name="item", capacity=capacity),
            FeatureSpec(name="hist", kind="sequence", vocab="item", max_len=4),
        ]
    )
    full, part = FeatureEncoder(schema), FeatureEncoder(schema)
    full.fit_capacities(frame.head(1))
    part.fit_capacities(frame.head(1))
    a = full.transform(frame)
    b = part.transform(frame.head(cut))
    for k in ("item", "hist"):
        assert (a[k][:cut] == b[k]).all()


def test_ids_in_arrival_order_then_hashed_overflow_and_padding():
    frame = _frame(["b", "a", "b", "c", "d", "e"])
    enc = FeatureEncoder(FeatureSchema(features=[FeatureSpec(name="item", capacity=2)]))
    enc.fit_capacities(frame)
    out = enc.transform(frame)["item"].tolist()
    assert out[:3] == [N_RESERVED, N_RESERVED + 1, N_RESERVED]  # b, a, b
    size = enc.vocabs["item"].size
    assert all(N_RESERVED + 2 <= i < size for i in out[3:])  # past capacity: overflow buckets
    # a frozen encoder sends unseen ids to OOV
    frozen = enc.transform(pl.DataFrame({"item": ["zzz", "a"], "label": [0, 1]}), grow=False)["item"].tolist()
    assert frozen == [OOV, N_RESERVED + 1]
    nulls = enc.transform(
        pl.DataFrame({"item": [None, "a"], "label": [0, 1]}, schema={"item": pl.String, "label": pl.Int8})
    )
    assert nulls["item"][0].item() == PAD


def test_capacity_from_pretraining_rows_only_and_state_round_trip():
    frame = tiny_frame(600)
    enc = FeatureEncoder(TINY_SCHEMA, EncoderConfig(headroom=2.0, min_capacity=1))
    enc.fit_capacities(frame.head(100))
    distinct = frame.head(100)["item_id"].n_unique()
    assert enc.vocabs["item_id"].capacity == 2 * distinct
    a = enc.transform(frame)
    clone = FeatureEncoder.from_state(enc.state_dict())
    b = clone.transform(frame)
    for k in a:
        assert (a[k] == b[k]).all(), k
    fmap = enc.feature_map()
    assert fmap.tables["item_id"] == enc.vocabs["item_id"].size


def test_sequences_are_padded_and_truncated():
    frame = pl.DataFrame({"item": ["a", "b"], "hist": [["a", "b", "a", "b", "a", "b"], []], "label": [1, 0]})
    enc = FeatureEncoder(SCHEMA)
    enc.fit_capacities(frame)
    h = enc.transform(frame)["hist"]
    assert h.shape == (2, 4)
    assert (h[1] == PAD).all() and (h[0] != PAD).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(31, 2000), st.integers(2, 31), st.sampled_from(["rows", "time"]), st.integers(0, 99))
def test_periods_cover_every_row_exactly_once(n, count, by, seed):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(0, 10 * n, n)) if by == "rows" else np.arange(n) * 3
    bounds = period_bounds(times, PeriodsConfig(count=count, by=by))
    assert len(bounds) == count and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(e > s for s, e in bounds)


def test_unsorted_times_and_empty_windows_are_errors():
    with pytest.raises(ValueError, match="sorted"):
        period_bounds(np.array([3, 1, 2]), PeriodsConfig(count=2))
    with pytest.raises(ValueError, match="hold no rows"):
        period_bounds(np.array([0, 1, 2, 100]), PeriodsConfig(count=4, by="time"))


def test_phases_follow_asmg_split():
    phases = [phase_of(p, 10, 10, 3) for p in range(1, 32)]
    assert phases[:11] == ["pretrain"] * 11
    assert phases[11:21] == ["warmup"] * 10 and phases[21:24] == ["valid"] * 3 and phases[24:] == ["test"] * 7


FAST_SCHEMA = FeatureSchema(
    features=[
        FeatureSpec(name="item"),
        FeatureSpec(name="hist", kind="sequence", vocab="item", max_len=3),
        FeatureSpec(name="price", kind="numeric"),
        FeatureSpec(name="age", kind="numeric", numeric="bucketize", buckets=4),
    ],
    user="user",
)


def _slow_transform(enc, frame, grow):
    import reloop.data.encode as E

    saved, E.SMALL_BATCH = E.SMALL_BATCH, 0
    try:
        return enc.transform(frame, grow=grow)
    finally:
        E.SMALL_BATCH = saved


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 59), min_size=1, max_size=30), st.booleans(), st.integers(0, 9))
def test_fast_path_equals_the_polars_path(rows, grow, seed):
    """Small batches of known ids take dict look-ups; the result must be transform's, bit for bit."""
    rng = np.random.default_rng(seed)
    n = 60
    items = [None if rng.random() < 0.1 else f"i{rng.integers(0, 25)}" for _ in range(n)]
    frame = pl.DataFrame(
        {
            "item": items,
            "hist": [
                None if rng.random() < 0.1 else [f"i{j}" for j in rng.integers(0, 25, rng.integers(0, 5))]
                for _ in range(n)
            ],
            "price": [None if rng.random() < 0.1 else float(rng.normal(3, 2)) for _ in range(n)],
            "age": [None if rng.random() < 0.1 else int(rng.integers(0, 90)) for _ in range(n)],
            "user": [f"u{rng.integers(0, 8)}" for _ in range(n)],
            "label": rng.integers(0, 2, n).tolist(),
        },
        schema={
            "item": pl.String,
            "hist": pl.List(pl.String),
            "price": pl.Float64,
            "age": pl.Int64,
            "user": pl.String,
            "label": pl.Int8,
        },
    )
    enc = FeatureEncoder(FAST_SCHEMA)
    enc.fit_capacities(frame)
    _slow_transform(enc, frame, True)  # every id now known
    batch = frame[rows]
    sizes = {t: len(v.index) for t, v in enc.vocabs.items()}
    fast = enc.encode_known(batch.to_dict(as_series=False), len(batch))
    assert fast is not None
    slow = _slow_transform(enc, batch, grow)
    assert set(fast) == set(slow)
    for k in slow:
        assert fast[k].dtype == slow[k].dtype and torch.equal(fast[k], slow[k]), k
    assert {t: len(v.index) for t, v in enc.vocabs.items()} == sizes  # nothing grew
    assert torch.equal(enc.transform(batch, grow=grow)["item"], slow["item"])  # transform uses it


def test_fast_path_declines_unseen_ids_and_odd_values():
    frame = pl.DataFrame({"item": ["a", "b"], "hist": [["a"], []], "label": [1, 0]})
    enc = FeatureEncoder(SCHEMA)
    enc.fit_capacities(frame)
    enc.transform(frame)
    assert enc.encode_known({"item": ["a", "zzz"], "hist": [[], []]}, 2) is None
    assert enc.encode_known({"item": ["a"], "hist": [["a", None]]}, 1) is None  # null inside a sequence
    assert enc.encode_known({"item": [True], "hist": [[]]}, 1) is None  # polars casts bools differently
    got = enc.encode_known({"item": ["b", None], "hist": [["a", "b", "a", "b"], None]}, 2)
    assert got["item"].tolist() == [enc.vocabs["item"].index["b"], PAD]
    assert got["hist"].shape == (2, 4) and (got["hist"][1] == PAD).all()
    assert got["label"].tolist() == [0.0, 0.0]
