"""Bounded growth of the service (issue 16, defect 4): every online vocabulary has a fixed capacity
and hashed overflow (the offline encoder's policy), and encoding costs the same whatever the number of
known ids."""

from __future__ import annotations

import statistics
import time
import warnings

import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

warnings.filterwarnings("ignore", message=".*httpx2.*")
import test_serve_api
from fastapi.testclient import TestClient
from test_serve_api import records

from reloop.data.encode import EncoderConfig, FeatureEncoder
from reloop.data.schema import N_RESERVED, FeatureSchema, FeatureSpec
from reloop.serve.app import RecordParser, create_app
from reloop.serve.log import ServeLog
from reloop.serve.online import OnlineEncoder

world = test_serve_api.world  # the bootstrapped model directories (module-scoped fixture)

SCHEMA = FeatureSchema(
    features=[
        FeatureSpec(name="user_id"),
        FeatureSpec(name="item_id"),
        FeatureSpec(name="history", kind="sequence", vocab="item_id", max_len=3),
        FeatureSpec(name="tags", kind="sequence", max_len=2),
        FeatureSpec(name="price", kind="numeric"),
    ],
    user="user_id",
)


def fitted() -> FeatureEncoder:
    """Tables of capacity 16 (min_capacity) with a few known ids each."""
    enc = FeatureEncoder(SCHEMA, EncoderConfig(headroom=2.0, min_capacity=16))
    frame = pl.DataFrame(
        {
            "user_id": ["u0", "u1", "u2"],
            "item_id": ["i0", "i1", "i2"],
            "history": [["i0"], ["i1", "i2"], []],
            "tags": [["t0"], [], ["t1"]],
            "price": [1.0, 2.0, 3.0],
            "label": [0, 1, 0],
        }
    )
    enc.fit_capacities(frame)
    enc.transform(frame, grow=True)
    return enc


ids = st.sampled_from([f"{p}{k}" for p in ("i", "u", "t", "x") for k in range(30)])
record = st.fixed_dictionaries(
    {
        "user_id": st.one_of(st.none(), ids),
        "item_id": st.one_of(st.none(), ids),
        "history": st.one_of(st.none(), st.lists(ids, max_size=5)),
        "tags": st.one_of(st.none(), st.lists(ids, max_size=3)),
        "price": st.one_of(st.none(), st.floats(-100, 100)),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(record, min_size=1, max_size=12), min_size=1, max_size=4))
def test_online_encoding_equals_the_offline_encoder(batches):
    """Batch after batch (new ids, shared item table, past capacity): the same tensors and the same
    vocabularies as ``FeatureEncoder.transform(grow=True)``; users too while under their capacity."""
    online_enc, offline = fitted(), fitted()
    online = OnlineEncoder(online_enc, user_capacity=10**6, user_overflow=8)
    parser = RecordParser(SCHEMA)
    for batch in batches:
        data, errors = parser.parse(batch)
        assert not errors
        got, new = online.encode(data, len(batch))
        want = offline.transform(parser.frame(data), grow=True)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        for t, v in offline.vocabs.items():
            assert online_enc.vocabs[t].index == v.index and list(online_enc.vocabs[t].index) == list(v.index)
        assert online_enc.users == offline.users
        assert all(
            online_enc.users[i] == idx if t == "__users__" else online_enc.vocabs[t].index[i] == idx
            for t, i, idx in new
        )


def test_users_past_capacity_share_hashed_buckets():
    enc = fitted()
    online = OnlineEncoder(enc, user_capacity=5, user_overflow=8)
    parser = RecordParser(SCHEMA)
    recs = [{"user_id": f"new{k}", "item_id": "i0", "history": [], "tags": [], "price": 1.0} for k in range(40)]
    data, _ = parser.parse(recs)
    cols, new = online.encode(data, 40)
    assert len(enc.users) == 5 and [i for t, i, _ in new if t == "__users__"] == ["new0", "new1"]
    users = cols["user"].tolist()
    assert users[:2] == [3, 4] and all(5 <= u < 5 + 8 for u in users[2:])
    again, _ = online.encode(data, 40)  # stable: the same user gets the same bucket every time
    assert torch.equal(again["user"], cols["user"]) and len(enc.users) == 5


def _encode_ms(service, user: str, item: str, reps: int = 15) -> float:
    """Median ms of ``Service.encode`` of one record with a new user and a new item."""
    times = []
    rec = {"user_id": "u1", "item_id": "i1", "item_cat": "c1", "hour": "1"}
    for k in range(reps):
        data, _ = service.parser.parse([{**rec, "user_id": f"{user}-{k}", "item_id": f"{item}-{k}"}])
        t0 = time.perf_counter()
        service.encode(data, 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def test_encoding_cost_does_not_grow_with_known_ids(world, tmp_path):
    """A batch with a new user and a new item, at 1k and at 100k known ids of each (capacities raised
    so they are all indexed): before, 11.7 ms at 0.4k and 184.9 ms at 500k known users."""
    md = world["model_dir"]("IU", tmp_path / "md")
    service = TestClient(create_app(md)).app.state.service
    enc = service.encoder
    items = enc.vocabs["item_id"]
    items.capacity = service.online.user_capacity = 10**6  # encode only: the model never sees these ids

    def fill(n: int) -> None:
        for k in range(len(enc.users), n):
            enc.users[f"known-user-{k}"] = len(enc.users)
        for k in range(len(items.index), n):
            items.index[f"known-item-{k}"] = N_RESERVED + len(items.index)

    fill(1_000)
    small = _encode_ms(service, "a", "b")
    fill(100_000)
    large = _encode_ms(service, "c", "d")
    print(f"encode with a new user and item: {small:.3f} ms at 1k known ids, {large:.3f} ms at 100k")
    assert large < 3 * small + 0.5, (small, large)


def test_many_new_ids_leave_the_vocabularies_bounded(world, tmp_path):
    """All-new users and items in every request: the indices stop at each capacity, the log's vocab
    table with them, encoder.json is never rewritten by a request, and memory stays flat (Python
    objects kept: < 512 KiB, resident set: < 16 MiB over 100 requests = 400 new ids, after a warm-up)."""
    import tracemalloc

    md = world["model_dir"]("IU", tmp_path / "md")
    client = TestClient(create_app(md))
    service = client.app.state.service
    enc = service.encoder
    cap_items, cap_users = enc.vocabs["item_id"].capacity, service.online.user_capacity
    snapshot = (md / "encoder.json").stat()
    base = records(world, 900, 1)[0][0]

    def burst(start: int, n: int) -> None:
        for k in range(start, start + n):
            recs = [{**base, "user_id": f"user-{k}-{j}", "item_id": f"item-{k}-{j}"} for j in range(4)]
            assert client.post("/predict", json={"records": recs}).status_code == 200

    burst(0, 40)  # 160 new users and items: past both capacities
    assert len(enc.vocabs["item_id"].index) == cap_items and len(enc.users) == cap_users

    def rss() -> int:  # resident bytes (Linux; 0 elsewhere, where only the Python figure is checked)
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * 4096
        except OSError:
            return 0

    tracemalloc.start()
    before, rss0 = tracemalloc.get_traced_memory()[0], rss()
    burst(1000, 100)
    grown, rss_grown = tracemalloc.get_traced_memory()[0] - before, rss() - rss0
    tracemalloc.stop()
    assert rss_grown < 16 * 2**20, rss_grown
    print(f"Python memory kept after 100 requests with 400 new users and items: {grown / 1024:.0f} KiB")
    assert grown < 512 * 1024, grown
    assert len(enc.vocabs["item_id"].index) == cap_items and len(enc.users) == cap_users
    log = ServeLog(md / "log.sqlite3")
    assert log.count("vocab") <= sum(v.capacity for v in enc.vocabs.values()) + cap_users
    assert (md / "encoder.json").stat().st_mtime_ns == snapshot.st_mtime_ns
    assert service._pending_vocab == {}


@pytest.mark.parametrize(
    "value, problem",
    [
        ("x" * 257, "id of 257 characters"),
        (10**300, "id of 301 characters"),
    ],
)
def test_long_ids_are_refused_naming_the_field(world, tmp_path, value, problem):
    md = world["model_dir"]("IU", tmp_path / "md")
    client = TestClient(create_app(md))
    rec = records(world, 900, 1)[0][0]
    r = client.post("/predict", json={"records": [rec, {**rec, "user_id": value}]})
    assert r.status_code == 422 and r.json()["field"] == "records[1].user_id"
    assert problem in r.json()["detail"][0]["msg"]
    assert ServeLog(md / "log.sqlite3").count("vocab") == 0


def test_sequences_are_bounded():
    parser = RecordParser(SCHEMA)
    ok = {"user_id": "u", "item_id": "i", "tags": [], "price": 1.0}
    _, errors = parser.parse([{**ok, "history": ["i"] * 1025}, {**ok, "history": "a|" + "b" * 300}])
    assert [(i, f) for i, f, _ in errors] == [(0, "history"), (1, "history")]
    assert "1,025 ids" in errors[0][2] and "sequence item" in errors[1][2]
    _, errors = parser.parse([{**ok, "history": [], "price": 1e31}])
    assert errors and errors[0][1] == "price"


# -- the guard's cheap look at a body never hides a broken bound (issue 18) ---------------------------
JSON_TEXT = st.lists(
    st.sampled_from(["a", '"', "\\", "[", "]", "{", "}", "é", "\n", "xxxxx", "\ud800"]), max_size=6
).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.floats(allow_nan=False) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_TEXT, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON_VALUES, ascii_only=st.booleans())
@example(value=['""""""'], ascii_only=True)  # short runs between quotes, a long string
@example(value=[[[[]]]], ascii_only=True)
@example(value={"\ud800": 1}, ascii_only=False)  # a raw surrogate in a key
def test_the_guards_quick_look_never_hides_a_broken_bound(value, ascii_only):
    """``may_break_bounds`` (bytes and types looked at in C) says False only when the full walk of
    ``check_json`` finds nothing: long strings and keys (escaped quotes included), deep nesting,
    surrogates escaped or raw (``json.loads`` of bytes decodes with surrogatepass)."""
    import json

    from reloop.serve import guard

    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    parsed = json.loads(body)
    for limits in (guard.Limits(max_depth=2, max_string=4), guard.Limits(max_depth=2, max_string=10_000)):
        problem = _walk(guard, parsed, limits)
        if problem is not None:
            assert guard.may_break_bounds(parsed, body, limits), (body, problem)
        assert guard.check_json(parsed, body, limits) == problem


def _walk(guard, value, limits):
    """``check_json`` with the quick look switched off: the full walk."""
    original = guard.may_break_bounds
    guard.may_break_bounds = lambda v, b, lim: True
    try:
        return guard.check_json(value, b"", limits)
    finally:
        guard.may_break_bounds = original
