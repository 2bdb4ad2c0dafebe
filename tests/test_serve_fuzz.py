"""Fuzzing every route of the service (issue 16): schema-driven cases from its own OpenAPI document
(schemathesis, valid and invalid) and a hand list of hostile inputs. Never a 5xx; every 4xx names the
field it is about; the server keeps answering."""

from __future__ import annotations

import json
import time
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*httpx2.*")
import schemathesis
import test_serve_api
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_serve_api import ADMIN, TOKEN, records

from reloop.serve.app import create_app
from reloop.serve.guard import Limits
from reloop.serve.log import ServeLog

world = test_serve_api.world  # the bootstrapped model directories (module-scoped fixture)

LIMITS = Limits(admin_per_minute=10**6, admin_burst=10**6, max_body_bytes=2 * 2**20, body_timeout=2.0)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    md = world["model_dir"]("IU-mem", tmp_path_factory.mktemp("fuzz") / "md")
    app = create_app(md, admin_token=TOKEN, limits=LIMITS, max_batch=512)
    with TestClient(app, headers=ADMIN, raise_server_exceptions=False) as client:
        yield client, md


def check(r) -> None:
    """No 5xx; a 4xx is JSON naming a field."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body.get("field"), str) and body["field"], (r.status_code, body)


def _fuzz(op, mode, codes: dict[int, int]) -> None:
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=12, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        r = case.call(headers=ADMIN)
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        check(r)

    run()


def test_every_route_from_the_openapi_document(served):
    """Valid and invalid requests generated from the schema of every operation (~12 per operation and
    mode: CI-sized, a few seconds)."""
    client, md = served
    # its own app: schemathesis runs the app's lifespan, whose end closes the service's log
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(md, admin_token=TOKEN, limits=LIMITS, max_batch=512)
    )
    seen: dict[str, dict[int, int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(op, mode, seen.setdefault(f"{op.label} {mode.value}", {}))
            except Unsatisfiable:  # no invalid request exists for an operation without input
                assert mode is GenerationMode.NEGATIVE
    assert {k for k, v in seen.items() if v} >= {
        "POST /predict positive",
        "POST /predict negative",
        "POST /feedback positive",
        "POST /feedback negative",
        "GET /healthz positive",
        "POST /admin/reload positive",
    }
    assert client.get("/healthz").status_code == 200


def _record(world) -> dict:
    return records(world, 900, 1)[0][0]


def hostile(world) -> list[tuple[str, str, bytes | str, dict]]:
    """(name, path, raw body, headers)."""
    rec = _record(world)
    good = json.dumps({"records": [rec]})
    deep = "[" * 50_000 + "]" * 50_000
    return [
        ("surrogate in user_id", "/predict", good.replace(f'"{rec["user_id"]}"', '"\\ud800"'), {}),
        ("surrogate in a key", "/predict", '{"records": [{"\\udfff": "x"}]}', {}),
        ("surrogate in impression_id", "/feedback", '{"events": [{"impression_id": "\\ud800", "label": 0}]}', {}),
        (
            "surrogate pair is fine but unknown",
            "/feedback",
            '{"events": [{"impression_id": "\\ud83d\\ude00", "label": 0}]}',
            {},
        ),
        ("1 MB user_id", "/predict", json.dumps({"records": [{**rec, "user_id": "x" * 2**20}]}), {}),
        ("1 MB ignored key", "/predict", json.dumps({"records": [{**rec, "note": "x" * 2**20}]}), {}),
        ("300-character id", "/predict", json.dumps({"records": [{**rec, "item_id": "y" * 300}]}), {}),
        ("huge integer id", "/predict", json.dumps({"records": [{**rec, "user_id": 10**400}]}), {}),
        ("5000-digit integer", "/predict", '{"records": [{"user_id": ' + "9" * 5000 + "}]}", {}),
        ("100k rows", "/predict", json.dumps({"records": [rec] * 100_000}), {}),
        ("100k empty rows", "/predict", json.dumps({"records": [{}] * 100_000}), {}),
        ("100k events", "/feedback", json.dumps({"events": [{"impression_id": "a", "label": 0}] * 100_000}), {}),
        ("body over the limit", "/predict", " " * (3 * 2**20), {}),
        ("NaN id", "/predict", good.replace(f'"{rec["hour"]}"', "NaN"), {}),
        ("Infinity id", "/predict", good.replace(f'"{rec["hour"]}"', "Infinity"), {}),
        ("NaN label", "/feedback", '{"events": [{"impression_id": "a", "label": NaN}]}', {}),
        ("-Infinity label", "/feedback", '{"events": [{"impression_id": "a", "label": -Infinity}]}', {}),
        ("float label", "/feedback", '{"events": [{"impression_id": "a", "label": 1.0}]}', {}),
        ("bool label", "/feedback", '{"events": [{"impression_id": "a", "label": true}]}', {}),
        ("deep nesting (recursion)", "/predict", deep, {}),
        ("deep nesting in a record", "/predict", '{"records": [{"user_id": ' + "[" * 40 + "]" * 40 + "}]}", {}),
        ("records is an object", "/predict", '{"records": {"a": 1}}', {}),
        ("record is a list", "/predict", '{"records": [[1, 2]]}', {}),
        ("top level is a list", "/predict", "[]", {}),
        ("top level is a string", "/feedback", '"events"', {}),
        ("empty body", "/predict", "", {}),
        ("null body", "/feedback", "null", {}),
        ("invalid UTF-8", "/predict", b'{"records": [{"user_id": "\xff\xfe"}]}', {}),
        ("NUL bytes", "/predict", b'{"records": [{"user_id": "a\x00b"}]}\x00', {}),
        ("XML", "/predict", "<records><record/></records>", {"content-type": "application/xml"}),
        ("form", "/feedback", "events=1&label=2", {"content-type": "application/x-www-form-urlencoded"}),
        (
            "multipart",
            "/predict",
            "--x\r\ncontent-disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n",
            {"content-type": "multipart/form-data; boundary=x"},
        ),
        ("truncated JSON", "/predict", good[:-3], {}),
        ("extra top-level key", "/predict", json.dumps({"records": [], "also": 1}), {}),
        ("unknown event key", "/feedback", '{"events": [{"impression_id": "a", "label": 0, "x": 1}]}', {}),
        ("sequence of dicts", "/predict", json.dumps({"records": [{**rec, "item_cat": [{"a": 1}]}]}), {}),
        ("non-numeric content-length", "/predict", good, {"content-length": "12abc"}),
    ]


def test_hostile_inputs_are_4xx_naming_the_field(served, world):
    client, md = served
    log = ServeLog(md / "log.sqlite3")
    before = log.count("impressions")
    for name, path, body, headers in hostile(world):
        t0 = time.perf_counter()
        try:
            r = client.post(path, content=body, headers=headers)
        except Exception as e:  # noqa: BLE001 - a malformed header the client library itself refuses
            assert name == "non-numeric content-length", (name, e)
            continue
        assert time.perf_counter() - t0 < 10, name
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        check(r)
    assert log.count("impressions") == before  # nothing of a refused request was logged
    assert client.get("/healthz").status_code == 200
    r = client.post("/predict", json={"records": [_record(world)]})
    assert r.status_code == 200


def test_hostile_admin_calls(served):
    client, _ = served
    for r in (
        client.post("/admin/retrain", params={"wait": "maybe"}),
        client.post("/admin/reload", content="x" * 10_000),
        client.post("/admin/reload", headers={"authorization": "Bearer \u00e9\u00e9".encode()}),
        client.get("/admin/../admin/retrain"),
        client.delete("/predict"),
        client.get("/nowhere"),
        client.put("/model"),
    ):
        check(r)
        assert 400 <= r.status_code < 500 or r.status_code == 200, r.text
