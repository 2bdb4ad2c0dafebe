"""Data sources: CSV/Parquet, MovieLens (100K on disk; 1M and 25M layouts on tiny files), configs,
bad-row accounting and the shared history builder."""

from __future__ import annotations

import calendar
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reloop.data.schema import FeatureSchema
from reloop.data.sources import (
    CsvSourceConfig,
    DataError,
    MovieLensSourceConfig,
    history_column,
    load_source,
    parse_source_config,
)

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"
needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="needs ../shared/data/movielens-100k")

FEATURES = {
    "user_id": "categorical",
    "item_id": "categorical",
    "price": "numeric",
    "tags": {"kind": "sequence", "max_len": 5, "separator": "|"},
}


def _utc(*args: int) -> int:
    return calendar.timegm((*args, 0, 0, 0)[:6] + (0, 0, 0))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _csv_cfg(path: Path, **kw) -> dict:
    return {
        "source": "csv", "path": str(path), "time": "ts", "label": "clk", "user": "user_id", "features": FEATURES, **kw,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# CSV


@pytest.fixture
def good_csv(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "clicks.csv",
        [
            "ts,clk,user_id,item_id,price,tags,extra",
            "1700000300,1,u1,i1,1.5,a|b,x",
            "2023-11-14T22:15:00Z,0,u2,i2,,c,x",  # = 1700000100
            "1700000100,1,u3,i3,2,,x",  # tie with the row above: keeps file order
            "1700000200.9,0,u1,i4,-3e2,a||d,x",  # float seconds floor to 1700000200
            "2023-11-14 22:15:00,1,u4,i5,0.25,b,x",  # naive ISO = UTC, another tie at 1700000100
            "2023-11-15T00:15:00+02:00,0,,007,7,e,x",  # offset; empty user = missing
        ],
    )


def test_csv_loads_canonical_sorted_stably(good_csv: Path) -> None:
    log = load_source(_csv_cfg(good_csv))
    f = log.frame
    assert f.columns == ["label", "time", "user_id", "item_id", "price", "tags"]
    assert f.schema == pl.Schema(
        {
            "label": pl.Int8,
            "time": pl.Int64,
            "user_id": pl.String,
            "item_id": pl.String,
            "price": pl.Float64,
            "tags": pl.List(pl.String),
        }
    )
    assert f["time"].to_list() == [1700000100, 1700000100, 1700000100, 1700000100, 1700000200, 1700000300]
    assert f["item_id"].to_list() == ["i2", "i3", "i5", "007", "i4", "i1"]  # ties in file order; ids verbatim
    assert f["label"].to_list() == [0, 1, 1, 0, 0, 1]
    assert f["price"].to_list() == [None, 2.0, 0.25, 7.0, -300.0, 1.5]
    assert f["tags"].to_list() == [["c"], [], ["b"], ["e"], ["a", "d"], ["a", "b"]]
    assert f["user_id"].to_list() == ["u2", "u3", "u4", None, "u1", "u1"]
    assert log.report.rows_read == log.report.rows_kept == 6 and log.report.bad == {}
    assert log.truth is None
    assert isinstance(log.schema, FeatureSchema)
    assert (log.schema.label, log.schema.time, log.schema.user) == ("label", "time", "user_id")
    assert [s.name for s in log.schema.features] == ["user_id", "item_id", "price", "tags"]
    assert log.schema.feature("tags").kind == "sequence" and log.schema.feature("tags").max_len == 5
    assert _utc(2023, 11, 14, 22, 15, 0) == 1700000100


def test_csv_iso_date_only_and_fractional(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "t.csv",
        ["when,y,item", "2024-01-02,1,a", "2024-01-01T00:00:01.75,0,b", "2024-01-01T00:00Z,1,c", "1e9,0,d"],
    )
    cfg = {"source": "csv", "path": str(p), "time": "when", "label": "y", "features": {"item": "categorical"}}
    log = load_source(cfg)
    day1, day2 = _utc(2024, 1, 1, 0, 0, 0), _utc(2024, 1, 2, 0, 0, 0)
    assert log.frame["time"].to_list() == [1_000_000_000, day1, day1 + 1, day2]
    assert log.frame["item"].to_list() == ["d", "c", "b", "a"]


def _bad_csv(tmp_path: Path, n_good: int) -> Path:
    lines = ["ts,clk,user_id,item_id,price,tags"]
    lines += [f"{1700000000 + i},{i % 2},u{i},i{i},{i}.5,a" for i in range(n_good)]
    lines += [
        "1700000001,,u,i,1,a",  # row n_good+1: missing label
        "1700000002,2,u,i,1,a",  # +2: label not 0/1
        "yesterday,1,u,i,1,a",  # +3: unparsable time
        "1700000004,1,u,i,cheap,a",  # +4: price not a number
        "1700000005,yes,u,i,cheap,a",  # +5: two reasons, one row
        ",0,u,i,1,a",  # +6: missing time
    ]
    return _write(tmp_path / "bad.csv", lines)


def test_csv_bad_rows_counted_with_row_numbers(tmp_path: Path) -> None:
    p = _bad_csv(tmp_path, 194)
    log = load_source(_csv_cfg(p, max_bad_share=0.05))
    r = log.report
    assert r.rows_read == 200 and r.rows_kept == 194 and log.frame.height == 194
    assert r.bad == {
        "clk: missing label": 1,
        "clk: label not 0/1": 2,
        "ts: missing time": 1,
        "ts: unparsable time": 1,
        "price: not a number": 2,
    }
    assert r.examples["clk: missing label"] == [195]
    assert r.examples["clk: label not 0/1"] == [196, 199]
    assert r.examples["ts: unparsable time"] == [197]
    assert r.examples["ts: missing time"] == [200]
    assert r.examples["price: not a number"] == [198, 199]
    text = r.summary()
    assert "read 200 rows, kept 194" in text and "price: not a number: 2 rows (first: 198, 199)" in text
    assert set(log.frame["item_id"].to_list()) == {f"i{i}" for i in range(194)}


def test_csv_too_many_bad_rows_raises_naming_column(tmp_path: Path) -> None:
    p = _bad_csv(tmp_path, 94)  # 6 of 100 bad
    with pytest.raises(DataError) as e:
        load_source(_csv_cfg(p))  # default max_bad_share 0.01
    msg = str(e.value)
    assert "6 of 100 rows" in msg and "max_bad_share=0.01" in msg
    assert "column 'price': 2 rows not a number (first rows: 98, 99)" in msg
    assert "column 'ts'" in msg and "column 'clk'" in msg


def test_csv_missing_column_raises(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.csv", ["ts,clk,user_id,item_id,tags", "1,1,u,i,a"])
    with pytest.raises(DataError) as e:
        load_source(_csv_cfg(p))
    msg = str(e.value)
    assert "'price'" in msg and "numeric feature" in msg
    assert "['ts', 'clk', 'user_id', 'item_id', 'tags']" in msg


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_source(_csv_cfg(tmp_path / "nope.csv"))


# --------------------------------------------------------------------------------------------------
# Parquet


def _raw_table(n: int = 60) -> pl.DataFrame:
    rng = np.random.default_rng(3)
    return pl.DataFrame(
        {
            "ts": rng.integers(1_700_000_000, 1_700_000_040, n),  # many ties
            "clk": rng.integers(0, 2, n),
            "user_id": [f"u{k}" for k in rng.integers(0, 5, n)],
            "item_id": rng.integers(0, 20, n),
            "price": rng.normal(size=n).round(3),
            "tags": [[f"t{j}" for j in range(k % 3)] for k in range(n)],
        }
    )


def test_parquet_shards_load_like_csv(tmp_path: Path) -> None:
    raw = _raw_table()
    csv = tmp_path / "all.csv"
    raw.with_columns(pl.col("tags").list.join("|")).write_csv(csv)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, (lo, hi) in enumerate([(0, 25), (25, 40), (40, 60)]):
        raw.slice(lo, hi - lo).write_parquet(shards / f"part-{k:03d}.parquet")
    (shards / "_SUCCESS").write_text("")  # not a shard
    from_csv = load_source(_csv_cfg(csv)).frame
    from_parquet = load_source({**_csv_cfg(shards), "source": "parquet"}).frame
    assert from_parquet.equals(from_csv)
    assert from_csv.height == 60 and from_csv["time"].is_sorted()
    # stable: within equal times, the original row order
    order = np.argsort(raw["ts"].to_numpy(), kind="stable")
    assert from_csv["item_id"].to_list() == [str(v) for v in raw["item_id"].to_numpy()[order]]


def test_parquet_datetime_time_and_single_file(tmp_path: Path) -> None:
    df = pl.DataFrame(
        {
            "ts": pl.from_epoch(pl.Series([1_700_000_100, 1_700_000_000]), time_unit="s"),
            "clk": [True, False],
            "item_id": [1.0, 2.0],
        }
    )
    p = tmp_path / "one.parquet"
    df.write_parquet(p)
    log = load_source(
        {"source": "parquet", "path": str(p), "time": "ts", "label": "clk", "features": {"item_id": "categorical"}}
    )
    assert log.frame["time"].to_list() == [1_700_000_000, 1_700_000_100]
    assert log.frame["label"].to_list() == [0, 1]
    assert log.frame["item_id"].to_list() == ["2", "1"]  # an id is its value: 2.0 is the id 2 (reloop.data.values)


def test_parquet_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"\*\.parquet"):
        load_source({**_csv_cfg(tmp_path), "source": "parquet"})


# --------------------------------------------------------------------------------------------------
# configs


def test_config_kinds_and_defaults(tmp_path: Path) -> None:
    cfg = parse_source_config(_csv_cfg(tmp_path / "x.csv"))
    assert isinstance(cfg, CsvSourceConfig)
    assert cfg.features["price"].kind == "numeric"
    assert cfg.features["tags"].to_spec("tags").max_len == 5
    assert cfg.periods == {"count": 31, "by": "rows"} and cfg.cache is None and cfg.max_bad_share == 0.01
    ml = parse_source_config({"source": "movielens", "path": "p", "implicit": {"negatives": 2, "history": 30}})
    assert isinstance(ml, MovieLensSourceConfig)
    assert ml.label.rating_at_least == 4 and ml.history_len == 30 and ml.implicit.seed == 1234


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"source": "csv", "path": "x", "features": {"a": "categorical"}, "bogus": 1}, ("bogus",)),
        (
            {"source": "csv", "path": "x", "features": {"a": {"kind": "numeric", "bukets": 3}}},
            ("features", "a", "bukets"),
        ),
        ({"source": "csv", "path": "x", "features": {"a": "categorial"}}, ("features", "a", "kind")),
        ({"source": "movielens", "path": "x", "implicit": {"negative": 1}}, ("implicit", "negative")),
        ({"source": "movielens", "path": "x", "label": {"rating_at_least": "high"}}, ("label", "rating_at_least")),
        ({"source": "synthetic", "synthetic": {"userz": 3}}, ("synthetic", "userz")),
        ({"source": "parquet", "features": {"a": "categorical"}}, ("path",)),
    ],
)
def test_config_errors_have_plain_key_paths(data: dict, loc: tuple) -> None:
    with pytest.raises(ValidationError) as e:
        parse_source_config(data)
    assert loc in [err["loc"] for err in e.value.errors()]


def test_config_semantic_errors() -> None:
    base = {"source": "csv", "path": "x"}
    for bad in (
        {"features": {"a": {"kind": "categorical", "separator": ","}}},  # separator only for sequences
        {"features": {"ts": "categorical"}, "time": "ts"},  # time column as a feature
        {"features": {"label": "categorical"}, "label": "clk"},  # would clash with canonical 'label'
        {"features": {"u": "numeric"}, "user": "u"},  # user column must be categorical
        {"features": {}},
    ):
        with pytest.raises(ValidationError):
            parse_source_config({**base, **bad})
    with pytest.raises(ValidationError):
        parse_source_config({"source": "hdfs", "path": "x"})
    with pytest.raises(ValidationError):
        parse_source_config({"source": "movielens", "path": "x", "history": 10, "implicit": {"history": 30}})


# --------------------------------------------------------------------------------------------------
# history builder


def _history_brute(users, times, items, labels, max_len):
    out = []
    for u, t in zip(users, times):
        prev = [items[j] for j in range(len(users)) if users[j] == u and labels[j] == 1 and times[j] < t]
        out.append(prev[::-1][:max_len])
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6), st.integers(0, 1)), min_size=1, max_size=40),
    st.integers(1, 4),
)
def test_history_column_matches_brute_force(rows, max_len) -> None:
    rows = sorted(rows, key=lambda r: r[1])  # a time-sorted (stable) log
    users = np.array([r[0] for r in rows])
    times = np.array([r[1] for r in rows])
    labels = np.array([r[2] for r in rows])
    items = [f"i{k}" for k in range(len(rows))]
    pos = np.flatnonzero(labels == 1)
    got = history_column(users[pos], times[pos], pl.Series(items).gather(pos), users, times, max_len)
    assert got.dtype == pl.List(pl.String)
    assert got.to_list() == _history_brute(users, times, items, labels, max_len)


# --------------------------------------------------------------------------------------------------
# MovieLens 100K (real files)


@pytest.fixture(scope="module")
def ml100k():
    return load_source({"source": "movielens", "path": str(ML100K), "history": 30})


@pytest.fixture(scope="module")
def ml100k_implicit():
    return load_source({"source": "movielens", "path": str(ML100K), "implicit": {"negatives": 1, "history": 30}})


@pytest.fixture(scope="module")
def u_data() -> np.ndarray:
    return np.loadtxt(ML100K / "u.data", dtype=np.int64)


@needs_ml100k
def test_ml100k_explicit(ml100k, u_data) -> None:
    f = ml100k.frame
    assert f.height == 100_000 and ml100k.report.rows_kept == 100_000 and ml100k.report.bad == {}
    assert abs(f["label"].mean() - 0.553) < 0.002
    assert f["time"].is_sorted()
    assert f["genres"].list.len().min() >= 1
    assert f["user_id"].n_unique() == 943 and f["item_id"].n_unique() == 1682
    assert set(f["age"].unique().to_list()) <= {"<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert set(f["gender"].unique().to_list()) == {"M", "F"}
    assert f["occupation"].n_unique() == 21
    assert [s.name for s in ml100k.schema.features] == [
        "user_id", "item_id", "genres", "age", "gender", "occupation", "history",
    ]  # fmt: skip
    assert ml100k.schema.user == "user_id"
    hist = ml100k.schema.feature("history")
    assert hist.kind == "sequence" and hist.vocab == "item_id" and hist.max_len == 30
    # stable sort: equal times keep u.data's order
    order = np.argsort(u_data[:, 3], kind="stable")
    assert f["item_id"].to_list() == [str(v) for v in u_data[order, 1]]
    toy = f.filter(pl.col("item_id") == "1")["genres"][0].to_list()
    assert toy == ["Animation", "Children's", "Comedy"]  # Toy Story
    u1 = f.filter(pl.col("user_id") == "1").row(0, named=True)
    assert (u1["age"], u1["gender"], u1["occupation"]) == ("18-24", "M", "technician")  # 24|M|technician


def _check_history(frame: pl.DataFrame, positives: pl.DataFrame, rows: np.ndarray) -> None:
    for r in rows:
        row = frame.row(int(r), named=True)
        prev = positives.filter((pl.col("user_id") == row["user_id"]) & (pl.col("time") < row["time"]))
        assert row["history"] == prev["item_id"].to_list()[::-1][:30]


@needs_ml100k
def test_ml100k_history_strictly_before(ml100k) -> None:
    f = ml100k.frame
    positives = f.filter(pl.col("label") == 1)
    rows = np.random.default_rng(0).choice(f.height, 40, replace=False)
    _check_history(f, positives, rows)
    assert f["history"].list.len().max() == 30


@needs_ml100k
def test_ml100k_implicit(ml100k, ml100k_implicit) -> None:
    explicit, f = ml100k.frame, ml100k_implicit.frame
    n_pos = int(explicit["label"].sum())
    assert f.height == 2 * n_pos and int(f["label"].sum()) == n_pos
    assert f["time"].is_sorted()
    # each positive is followed by its negative, which copies user, time, user features, history
    pos, neg = f[0::2], f[1::2]
    assert (pos["label"] == 1).all() and (neg["label"] == 0).all()
    for c in ("user_id", "time", "age", "gender", "occupation", "history"):
        assert pos[c].equals(neg[c]), c
    assert pos.select("user_id", "item_id", "time").equals(
        explicit.filter(pl.col("label") == 1).select("user_id", "item_id", "time")
    )
    # negatives never an item the user rated at or before the event (any rating)
    first = explicit.group_by("user_id", "item_id").agg(pl.col("time").min().alias("first"))
    clash = neg.join(first, on=["user_id", "item_id"], how="inner").filter(pl.col("first") <= pl.col("time"))
    assert clash.height == 0
    # negatives' genres are those of the sampled item
    genres = explicit.select("item_id", "genres").unique("item_id")
    check = neg.select("item_id", "genres").join(genres, on="item_id", suffix="_ref")
    assert check.height == neg.height and (check["genres"] == check["genres_ref"]).all()
    assert neg["item_id"].n_unique() > 1000  # uniform over the catalogue
    rows = np.random.default_rng(1).choice(f.height, 30, replace=False)
    _check_history(f, explicit.filter(pl.col("label") == 1), rows)
    assert "55,375 positives" in ml100k_implicit.report.summary()


@needs_ml100k
def test_ml100k_implicit_seen_candidates_and_seed(ml100k) -> None:
    cfg = {"source": "movielens", "path": str(ML100K), "user_features": False,
           "implicit": {"negatives": 2, "candidates": "seen", "seed": 7}}  # fmt: skip
    a, b = load_source(cfg), load_source(cfg)
    assert a.frame.equals(b.frame)
    f = a.frame
    assert [s.name for s in a.schema.features] == ["user_id", "item_id", "genres"]
    # 'seen': a negative's item was rated by someone at or before the event
    all_first = ml100k.frame.group_by("item_id").agg(pl.col("time").min().alias("t0"))
    neg = f.filter(pl.col("label") == 0).join(all_first, on="item_id", how="left")
    assert neg["t0"].null_count() == 0 and (neg["t0"] <= neg["time"]).all()
    n_pos = int(f["label"].sum())
    dropped = 2 * n_pos - (f.height - n_pos)
    assert dropped >= 0 and (dropped == 0 or "not drawn" in a.report.summary())


# --------------------------------------------------------------------------------------------------
# MovieLens 1M and latest/25M layouts (tiny files)


def test_movielens_1m_layout(tmp_path: Path) -> None:
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text(
        "1::10::5::978300760\n1::20::3::978300700\n2::10::4::978300700\n2::30::1::978300800\n", encoding="utf-8"
    )
    (d / "movies.dat").write_bytes(
        "10::Café Society (1999)::Comedy|Drama\n20::Toy Story (1995)::Animation|Children's|Comedy\n30::X::Horror\n".encode(
            "latin-1"
        )
    )
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n", encoding="utf-8")
    log = load_source({"source": "movielens", "path": str(d), "history": 2})
    f = log.frame
    assert f["time"].to_list() == [978300700, 978300700, 978300760, 978300800]
    assert f["item_id"].to_list() == ["20", "10", "10", "30"]  # tie: file order (line 2 before line 3)
    assert f["label"].to_list() == [0, 1, 1, 0]
    assert f["genres"].to_list() == [
        ["Animation", "Children's", "Comedy"], ["Comedy", "Drama"], ["Comedy", "Drama"], ["Horror"],
    ]  # fmt: skip
    assert f["age"].to_list() == ["<18", "56+", "<18", "56+"]
    assert f["gender"].to_list() == ["F", "M", "F", "M"] and f["occupation"].to_list() == ["10", "16", "10", "16"]
    assert f["history"].to_list() == [[], [], [], ["10"]]
    assert log.schema.feature("genres").max_len == 5


def test_movielens_25m_layout(tmp_path: Path) -> None:
    d = tmp_path / "ml-25m"
    d.mkdir()
    _write(
        d / "ratings.csv",
        [
            "userId,movieId,rating,timestamp",
            "7,1,4.0,1500000002",
            "7,2,3.5,1500000001",
            "8,3,4.5,1500000001",
            "8,1,0.5,1500000003",
        ],
    )
    _write(
        d / "movies.csv",
        ["movieId,title,genres", '1,"Heat, The (1995)",Action|Crime', "2,Alone (2000),(no genres listed)", "3,Z,Drama"],
    )
    log = load_source({"source": "movielens", "path": str(d / "ratings.csv"), "implicit": {"negatives": 1, "seed": 0}})
    f = log.frame
    assert [s.name for s in log.schema.features] == ["user_id", "item_id", "genres"]
    ex = load_source({"source": "movielens", "path": str(d)}).frame
    assert ex["label"].to_list() == [0, 1, 1, 0] and ex["item_id"].to_list() == ["2", "3", "1", "1"]
    assert ex["genres"].to_list() == [[], ["Drama"], ["Action", "Crime"], ["Action", "Crime"]]
    # implicit: positives (8,3)@..01 and (7,1)@..02, each followed by a negative never rated by that user before
    assert f["label"].to_list() == [1, 0, 1, 0]
    assert f["user_id"].to_list() == ["8", "8", "7", "7"]
    assert f[1, "item_id"] in {"1", "2"} and f[3, "item_id"] == "3"  # user 7 rated 1 and 2 by then


def test_movielens_bad_rows_and_missing_path(tmp_path: Path) -> None:
    d = tmp_path / "ml"
    d.mkdir()
    _write(d / "ratings.csv", ["userId,movieId,rating,timestamp", "1,1,4,100", "1,2,x,101", "1,3,4,soon"])
    with pytest.raises(DataError, match=r"column 'rating': 1 rows not a number \(first rows: 2\)"):
        load_source({"source": "movielens", "path": str(d)})
    log = load_source({"source": "movielens", "path": str(d), "max_bad_share": 0.7})
    assert log.report.bad == {"rating: not a number": 1, "timestamp: unparsable time": 1}
    assert log.frame.height == 1 and "no item file" in log.report.summary()
    with pytest.raises(FileNotFoundError) as e:
        load_source({"source": "movielens", "path": str(tmp_path / "missing")})
    assert str(tmp_path / "missing") in str(e.value) and "u.data" in str(e.value) and "ratings.csv" in str(e.value)
