"""One raw value, one id (issue 14, item 4): the offline loaders and the service parse raw values by
the same rules (``reloop.data.values``), so the same raw record encodes to the same tensors offline
(``load_csv`` / ``load_parquet`` → ``FeatureEncoder.transform``) and online (``POST /predict`` →
``OnlineEncoder``, read back from the log) — for every feature kind and option: sequence separators,
float / integer / string ids, missing values, numeric strings, unseen ids, ``max_len``."""

from __future__ import annotations

import csv
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

warnings.filterwarnings("ignore", message=".*httpx2.*")
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from reloop.config import load_config
from reloop.data import values
from reloop.data.sources.config import (
    CsvSourceConfig,
    FeatureConfig,
    ParquetSourceConfig,
)
from reloop.data.sources.tabular import load_csv, load_parquet
from reloop.data.validate import (
    DataError,
    parse_categorical,
    parse_numeric,
    parse_sequence,
)
from reloop.serve.app import create_app
from reloop.serve.log import RowCodec, ServeLog
from reloop.serve.registry import ModelDir, bootstrap

FEATURES = {
    "user_id": "categorical",
    "item_id": "categorical",
    "price": {"kind": "numeric"},  # normalize
    "score": {"kind": "numeric", "numeric": "bucketize", "buckets": 4},
    "tags": {"kind": "sequence", "separator": ";", "max_len": 3},
    "hist": {"kind": "sequence", "vocab": "item_id", "separator": ",", "max_len": 2},
}
COLUMNS = list(FEATURES)


def _write_log(path: Path, n: int = 800) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", "label", *COLUMNS])
        for i in range(n):
            tags = ";".join(f"t{k}" for k in rng.choice(6, size=rng.integers(0, 4), replace=False))
            hist = ",".join(str(k) for k in rng.integers(0, 15, size=rng.integers(0, 3)))
            w.writerow(
                [
                    i,
                    int(rng.random() < 0.3),
                    f"u{rng.integers(20)}",
                    rng.integers(15),
                    f"{rng.normal(10, 2):.3f}",
                    f"{rng.normal(0, 5):.2f}",
                    tags,
                    hist,
                ]
            )


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory) -> tuple[Path, object]:
    """A model directory bootstrapped from a CSV log (item ids are the integers 0..14)."""
    root = tmp_path_factory.mktemp("values")
    _write_log(root / "log.csv")
    raw = {
        "data": {
            "source": "csv",
            "path": str(root / "log.csv"),
            "time": "ts",
            "label": "label",
            "user": "user_id",
            "cache": str(root / "cache"),
            "features": FEATURES,
            "periods": {"count": 8, "by": "rows"},
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"pretrain_epochs": 1, "batch_size": 256},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2},
        "runs": {"IU": {"update": "incremental"}},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(root / "c.yaml")
    md = bootstrap(cfg, root / "md", log=lambda *_: None)
    return md.path, cfg


def _rows(columns: dict[str, list]) -> list[dict]:
    n = len(next(iter(columns.values())))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def offline(md: Path, cfg, columns: dict[str, list], fmt: str, where: Path) -> dict[str, torch.Tensor]:
    """The raw rows through the offline loader (CSV: every value written as its text; Parquet: typed
    columns) and the encoder the service started from, growing as a run would."""
    n = len(next(iter(columns.values())))
    common = {"time": "ts", "label": "label", "user": "user_id", "features": cfg.data["features"], "max_bad_share": 0.0}
    if fmt == "csv":
        path = where / "rows.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["ts", "label", *columns])
            for i, row in enumerate(_rows(columns)):
                w.writerow([i, 0, *("" if v is None else v for v in row.values())])
        log = load_csv(CsvSourceConfig(source="csv", path=str(path), **common))
    else:
        path = where / "rows.parquet"
        pl.DataFrame({"ts": list(range(n)), "label": [0] * n, **columns}, strict=False).write_parquet(path)
        log = load_parquet(ParquetSourceConfig(source="parquet", path=str(path), **common))
    assert log.report.rows_bad == 0, log.report.summary()
    return ModelDir(md).encoder().transform(log.frame, grow=True)


def online(md: Path, columns: dict[str, list], where: Path) -> dict[str, torch.Tensor]:
    """The same rows as JSON records through ``POST /predict``; the encoded features the service logged."""
    copy = where / "md"
    shutil.copytree(md, copy)
    client = TestClient(create_app(copy))
    r = client.post("/predict", json={"records": _rows(columns)})
    assert r.status_code == 200, r.text
    service_map = ModelDir(copy).feature_map()
    blobs = [
        b for (b,) in ServeLog(copy / "log.sqlite3").conn.execute("SELECT features FROM impressions ORDER BY rowid")
    ]
    client.app.state.service.close()
    return RowCodec(service_map, with_user=True).decode(blobs)


#: name -> (columns, loaders). Each column holds one type (a Parquet column has one); JSON carries the
#: same Python values. No NaN here: JSON has none (the service refuses it); see the unit tests below.
CASES = {
    "sequences split on their feature's separator": (
        {
            "user_id": ["u1", "u2", "u3"],
            "item_id": ["3", "4", "5"],
            "price": [1.0, 2.0, 3.0],
            "score": [1.0, 2.0, 3.0],
            "tags": ["t1;t2", "t3", "t1;t2;t3;t4"],
            "hist": ["1,2", "3", "4,5,6"],
        },
        ("csv", "parquet"),
    ),
    "strings, as a CSV holds them": (
        {
            "user_id": ["u1", "u2", "u3", "u4"],
            "item_id": ["3", "3.0", "", "007"],  # "3" known; "3.0", "007" unseen ids; "" missing
            "price": [" 2.5", "", "1e1", "-0"],  # numeric strings; "" missing
            "score": ["7", "nan", "-3", "+.5e1"],  # "nan" missing
            "tags": ["t1;t2", "", "t3;;t4;t5;t6", "zz"],  # the feature's separator; max_len 3; unseen "zz"
            "hist": ["1,2,3", "", "99,3", "3.0"],  # shares item_id's table; max_len 2
        },
        ("csv", "parquet"),
    ),
    "typed values, as Parquet holds them": (
        {
            "user_id": ["u1", "u5", None, "u-new"],
            "item_id": [3.0, 2.5, None, 14.0],  # 3.0 is the id 3 (known); 2.5 unseen
            "price": [2, 3, None, -4],
            "score": [1.5, None, 7.25, -1e3],
            "tags": [["t1", "t2"], [], None, ["t1", "", None, "t9", "t2", "t3"]],
            "hist": [[1.0, 2.0], [3.0, None], [], [14.0, 2.5, 7.0]],
        },
        ("parquet",),
    ),
    "integer ids": (
        {
            "user_id": ["u1", "u2", "u3", "u4"],
            "item_id": [3, 14, 999, 0],  # 999 unseen
            "price": [1.25, -3.5, 10.0, 0.0],
            "score": [0, 1, 2, 3],
            "tags": [["t1"], ["t2", "t3"], [], ["t4"]],
            "hist": [[3, 1000], [], [5, 6, 7], [0]],
        },
        ("parquet",),
    ),
    "booleans": (
        {
            "user_id": ["u1", "u2", "u3"],
            "item_id": [True, False, None],  # the ids "true" / "false"
            "price": [True, False, None],  # 1.0 / 0.0
            "score": [False, True, None],
            "tags": [["t1"], [], ["t2"]],
            "hist": [[], [], []],
        },
        ("parquet",),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_raw_record_encodes_identically_offline_and_online(served_dir, tmp_path, case):
    md, cfg = served_dir
    columns, loaders = CASES[case]
    got = online(md, columns, tmp_path)
    for fmt in loaders:
        (tmp_path / fmt).mkdir()
        want = offline(md, cfg, columns, fmt, tmp_path / fmt)
        for name in [*COLUMNS[1:], "user"]:
            assert got[name].dtype == want[name].dtype, (fmt, name)
            assert torch.equal(got[name], want[name]), (fmt, name, got[name].tolist(), want[name].tolist())


def test_the_encoded_ids_follow_the_rules(served_dir, tmp_path):
    """What the rules say, on the encoded indices: 3, 3.0 and "3" are one id; "3.0" is another;
    missing values are padding; a string sequence splits on its feature's separator."""
    md, _ = served_dir
    enc = ModelDir(md).encoder()
    items = enc.vocabs["item_id"].index
    got = online(
        md,
        {
            "user_id": ["u1"] * 5,
            "item_id": [3, 3.0, "3", "3.0", ""],
            "price": [1.0, "2", None, "", " 3 "],
            "score": [1, 1, 1, 1, 1],
            "tags": ["t1;t2", ["t1", "t2"], "t1|t2", None, ""],
            "hist": ["3,4", [3, 4.0], ["3", "4"], "3;4", None],
        },
        tmp_path,
    )
    item = got["item_id"].tolist()
    assert item[0] == item[1] == item[2] == items["3"]
    assert item[3] not in (items["3"], 0, 1) and item[4] == 0
    mean, std = enc.numeric_stats["price"]
    assert got["price"].tolist()[:2] == pytest.approx([(1 - mean) / std, (2 - mean) / std], rel=1e-6)
    assert got["price"].tolist()[2:4] == [0.0, 0.0]  # missing: the normalised mean
    assert not math.isclose(got["price"].tolist()[4], 0.0)
    tags = enc.vocabs["tags"].index
    rows = got["tags"].tolist()
    assert rows[0] == rows[1] == [tags["t1"], tags["t2"], 0]
    assert rows[2][0] not in (tags["t1"], tags["t2"]) and rows[2][1:] == [0, 0]  # "t1|t2" is one (new) id
    assert rows[3] == rows[4] == [0, 0, 0]
    hist = got["hist"].tolist()
    assert hist[0] == hist[1] == hist[2] == [items["3"], items["4"]]
    assert hist[3][0] not in (items["3"], items["4"]) and hist[4] == [0, 0]


# -- the rules, value by value and column by column -------------------------------------------------
def _per_value(rule, raw: list) -> tuple[list, list[bool]]:
    out, bad = [], []
    for v in raw:
        try:
            out.append(rule(v))
            bad.append(False)
        except values.ValueProblem:
            out.append(None)
            bad.append(True)
    return out, bad


def _same_floats(a: list, b: list) -> bool:
    return all(
        (x is None and y is None)
        or (x is not None and y is not None and x == y and math.copysign(1, x) == math.copysign(1, y))
        for x, y in zip(a, b)
    )


def test_id_rule():
    assert [values.id_value(v) for v in ("3", "3.0", "007", " a ", "", None)] == ["3", "3.0", "007", " a ", None, None]
    assert [values.id_value(v) for v in (3, 3.0, -0.0, 2.5, 1e20, float("nan"), float("inf"), True, False)] == [
        "3",
        "3",
        "0",
        "2.5",
        "100000000000000000000",
        None,
        "inf",
        "true",
        "false",
    ]
    assert values.id_value(np.int64(7)) == "7" and values.id_value(np.float32(3.0)) == "3"
    for bad in ([1], {"a": 1}, (1,)):
        with pytest.raises(values.ValueProblem, match="expected a string or integer id"):
            values.id_value(bad)


def test_number_rule():
    assert [
        values.number_value(v) for v in (" 2.5\t", "1e3", "-.5", "+5.", "nan", "", "  ", None, float("nan"), 3, True)
    ] == [2.5, 1000.0, -0.5, 5.0, None, None, None, None, None, 3.0, 1.0]
    for bad in ("cheap", "1_000", "0x10", "\u0661\u0662", "1e400", "INF", float("-inf"), 10**400, [1.0]):
        with pytest.raises(values.ValueProblem) as e:
            values.number_value(bad)
        assert e.value.name == values.NOT_A_NUMBER


def test_sequence_rule():
    assert values.sequence_value("a;;b;", ";") == ["a", "b"]
    assert values.sequence_value("a|b") == ["a", "b"] and values.DEFAULT_SEPARATOR == "|"
    assert FeatureConfig(kind="sequence").split_on == values.DEFAULT_SEPARATOR  # the config's default too
    assert values.sequence_value(["a", "", None, float("nan"), 3, 3.0, 2.5, True]) == ["a", "3", "3", "2.5", "true"]
    assert values.sequence_value(None) == [] and values.sequence_value(float("nan")) == []
    for bad in (5, [[1]], {"a": 1}):
        with pytest.raises(values.ValueProblem):
            values.sequence_value(bad)


text = st.one_of(
    st.text(max_size=8),
    st.sampled_from(
        [
            "",
            " ",
            "3",
            "3.0",
            " 2.5 ",
            "1e3",
            "nan",
            "NaN",
            "inf",
            "-Infinity",
            "+.5e-1",
            "1_0",
            "0x1",
            "\u0663",
            "1e400",
            "5.",
        ]
    ),
)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([3.0, -0.0, 2.5, 1e16, 1e20]))
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.one_of(
        st.lists(st.one_of(st.none(), text)),
        st.lists(st.one_of(st.none(), floats)),
        st.lists(st.one_of(st.none(), ints)),
        st.lists(st.one_of(st.none(), st.booleans())),
    )
)
def test_per_value_and_column_rules_agree(raw):
    """Every raw value the per-record path (service) sees gives what the column path (loaders) gives:
    ids, numbers (and which are bad), for strings, floats, integers and booleans."""
    s = pl.Series("x", raw, strict=False)
    assert parse_categorical(s).to_list() == _per_value(values.id_value, raw)[0]
    if s.dtype == pl.Null or s.dtype.is_numeric() or s.dtype in (pl.String, pl.Boolean):
        col, problems = parse_numeric(s)
        want, bad = _per_value(values.number_value, raw)
        assert _same_floats(col.to_list(), want), (col.to_list(), want)
        assert problems[values.NOT_A_NUMBER].to_list() == bad


@settings(max_examples=100, deadline=None)
@given(
    raw=st.one_of(
        st.lists(st.one_of(st.none(), st.text(alphabet="ab;,| ", max_size=8))),
        st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), text)))),
        st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), floats)))),
        st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), ints)))),
    ),
    separator=st.sampled_from([";", ",", "|", "::"]),
)
def test_sequence_rule_agrees_column_and_value(raw, separator):
    s = pl.Series("x", raw, strict=False)
    assert parse_sequence(s, separator).to_list() == [values.sequence_value(v, separator) for v in raw]


def test_columns_of_the_wrong_type_fail_naming_the_feature():
    with pytest.raises(DataError, match="categorical feature 'x' has nested type"):
        parse_categorical(pl.Series("x", [[1]]))
    with pytest.raises(DataError, match="numeric feature 'x' has type"):
        parse_numeric(pl.Series("x", [[1.0]]))
    with pytest.raises(DataError, match="sequence feature 'x' has type Int64"):
        parse_sequence(pl.Series("x", [1, 2]), "|")


def test_service_bounds_apply_after_the_rules():
    from reloop.data.schema import FeatureSchema, FeatureSpec
    from reloop.serve.guard import Limits
    from reloop.serve.records import RecordParser

    schema = FeatureSchema(
        features=[
            FeatureSpec(name="c"),
            FeatureSpec(name="n", kind="numeric"),
            FeatureSpec(name="s", kind="sequence", max_len=2),
        ]
    )
    parser = RecordParser(schema, Limits(max_id=4, max_sequence=3, max_abs_number=100.0), {"s": ";"})
    data, errors = parser.parse([{"c": 3.0, "n": " 7 ", "s": "a;b;c;d;e"[:5]}, {"c": None, "n": "", "s": ["x", None]}])
    assert not errors and data == {"c": ["3", None], "n": [7.0, None], "s": [["a", "b", "c"], ["x"]]}
    _, errors = parser.parse([{"c": "abcde", "n": 101, "s": "a;b;c;d"}, {"c": 12345, "n": "x", "s": ["abcde"]}])
    assert [(i, f) for i, f, _ in errors] == [(0, "c"), (0, "n"), (0, "s"), (1, "c"), (1, "n"), (1, "s")]
    assert "id of 5 characters" in errors[0][2] and "sequence of 4 ids" in errors[2][2]
    assert errors[4][2] == "expected a number, got str 'x'" and errors[5][2].startswith("sequence item: id of 5")


def test_json_nan_never_reaches_the_rules():
    """JSON has no NaN / Infinity (Python's ``json`` reads them): the guard refuses them as invalid JSON,
    so a NaN that would read as a missing value can only come from a loader's float column."""
    from reloop.serve.guard import Limits, parse_json

    for const in ("NaN", "Infinity", "-Infinity"):
        value, problem = parse_json(f'{{"records": [{{"price": {const}}}]}}'.encode(), Limits())
        assert value is None and problem is not None and problem["field"] == "body"
        assert "not a JSON value" in problem["detail"][0]["msg"]


# -- issue 14, item 5: below the HTTP layer nothing knows HTTP --------------------------------------
def test_service_layers_below_http_import_no_web_framework():
    import ast

    import reloop.serve

    root = Path(reloop.serve.__file__).parent
    for name in ("host", "service", "records", "events", "online", "log", "retrain", "registry"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("fastapi", "starlette", "uvicorn")}, name
        assert "status_code" not in (root / f"{name}.py").read_text(), name


def test_event_lines_are_one_line_key_values():
    from reloop.serve.events import format_event

    line = format_event("version_refused", version=2, reason='bad "file"\nsecond line', serving=None, auc=0.123456789)
    assert line == 'event=version_refused version=2 reason="bad \\"file\\"\\nsecond line" serving=- auc=0.123457'
    assert "\n" not in line
