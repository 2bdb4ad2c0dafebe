"""The service against hostile files, incompatible or broken versions, and unauthenticated callers
(issue 16: defects 2, 3, 5, 6, 7, 8)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*httpx2.*")
import test_serve_api
from fastapi.testclient import TestClient
from test_serve_api import ADMIN, TOKEN, records
from typer.testing import CliRunner

from reloop.models.base import build_model, load_model, save_model
from reloop.serve.app import create_app
from reloop.serve.cli import app as serve_cli
from reloop.serve.cli import is_loopback
from reloop.serve.guard import Limits, RateLimiter
from reloop.serve.log import ServeLog
from reloop.serve.registry import ModelDir, RegistryError, write_atomic
from reloop.serve.retrain import retrain

world = test_serve_api.world  # the bootstrapped model directories (module-scoped fixture)


def fresh(world, tmp_path, run="IU") -> Path:
    return world["model_dir"](run, tmp_path / "md")


def client(md: Path, **kw) -> TestClient:
    kw.setdefault("admin_token", TOKEN)
    return TestClient(create_app(md, **kw), headers=ADMIN)


def copy_version(md: Path, src: int = 1, dst: int = 2) -> Path:
    """A second version identical to ``src`` (not yet published)."""
    mdir = ModelDir(md)
    shutil.copytree(mdir.version_path(src), mdir.version_path(dst))
    meta = json.loads((mdir.version_path(dst) / "meta.json").read_text())
    (mdir.version_path(dst) / "meta.json").write_text(json.dumps({**meta, "version": dst}))
    return mdir.version_path(dst)


def point(md: Path, version) -> None:
    write_atomic(Path(md) / "CURRENT", f"{version}\n")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def poison(path: Path, marker: Path, legacy_blob: dict | None = None) -> None:
    torch.save(
        {**(legacy_blob or {}), "state_dict": Payload(marker), "config": {"name": "emb_mlp"}, "feature_map": {}}, path
    )


# -- 2: no code from model files ------------------------------------------------------------------
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(world, tmp_path):
    md = fresh(world, tmp_path)
    marker = tmp_path / "pwned"
    version = copy_version(md)
    poison(version / "serving.safetensors", marker)  # a torch zip whose pickle calls open()
    poison(version / "state.pt", marker)
    c = client(md)
    point(md, 2)
    r = c.post("/admin/reload")
    assert r.status_code == 422 and r.json()["field"] == "CURRENT" and r.json()["refused_version"] == 2
    assert "version 2" in r.json()["detail"] and "\n" not in r.json()["detail"]
    assert c.get("/model").json()["model_version"] == 1 and c.get("/model").json()["refused"]["version"] == 2
    assert c.post("/predict", json={"records": records(world, 900, 2)[0]}).json()["model_version"] == 1
    with pytest.raises(RegistryError, match="version 2"):  # a resumed retrain reads state.pt the same way
        ModelDir(md).load_state(2)
    (version / "serving.pt").write_bytes((version / "serving.safetensors").read_bytes())
    with pytest.raises(ValueError, match="unreadable model file"):
        load_model(version / "serving.pt")
    raw = tmp_path / "raw.pkl"  # a plain pickle (not a zip) is no safetensors file either
    import pickle

    raw.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    with pytest.raises(ValueError, match="unreadable model file"):
        load_model(raw)
    pre = Path(md) / "pretrain.pt"
    poison(pre, marker)
    with pytest.raises(RegistryError, match="pretrain.pt"):
        ModelDir(md).pretrain_rows()
    assert not marker.exists()


def test_models_are_safetensors_with_json_metadata_and_legacy_files_still_load(world, tmp_path):
    from safetensors import safe_open

    md = fresh(world, tmp_path)
    path = ModelDir(md).version_path(1) / "serving.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "reloop-model/2" and json.loads(meta["config"])["name"] == "emb_mlp"
    model = load_model(path)
    legacy = tmp_path / "legacy.pt"  # the format save_model wrote before: loads with weights_only=True
    torch.save(
        {"config": model.config(), "feature_map": model.feature_map.model_dump(), "state_dict": model.state_dict()},
        legacy,
    )
    again = load_model(legacy, model.feature_map)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# -- 3: incompatible checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("other", [{"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [16]}, {"name": "lr"}])
def test_an_incompatible_version_is_refused_and_the_old_one_keeps_serving(world, tmp_path, other, caplog):
    md = fresh(world, tmp_path)
    mdir = ModelDir(md)
    c = client(md, poll_interval=0.05)
    torch.manual_seed(0)
    model = build_model(other, mdir.feature_map())
    mdir.publish(model, model, mdir.load_state(1), mdir.meta(1))  # CURRENT -> 2
    recs = records(world, 900, 3)[0]
    with caplog.at_level(logging.WARNING, logger="reloop.serve"):
        r = c.post("/admin/reload")
        assert r.status_code == 409, r.text
        assert "another model" in r.json()["detail"] and r.json()["field"] == "CURRENT"
        for _ in range(5):  # the server's own poll refuses it too, and keeps serving version 1
            assert c.post("/predict", json={"records": recs}).json()["model_version"] == 1
    info = c.get("/model").json()
    assert info["model_version"] == 1 and info["model"]["name"] == "emb_mlp" and info["model"]["hidden_units"] == [8]
    assert info["refused"]["version"] == 2
    assert sum("refused" in rec.getMessage() for rec in caplog.records) == 1  # logged once
    c.app.state.service.close()
    restarted = TestClient(create_app(md, admin_token=TOKEN))  # a restart falls back to version 1
    assert restarted.get("/model").json()["model_version"] == 1


# -- 5: a broken published version -----------------------------------------------------------------
def test_broken_current_falls_back_and_every_path_answers_in_one_line(world, tmp_path, caplog):
    md = fresh(world, tmp_path)
    version = copy_version(md)
    blob = (version / "serving.safetensors").read_bytes()
    (version / "serving.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated
    point(md, 2)
    with caplog.at_level(logging.WARNING, logger="reloop.serve"):
        c = client(md)
    assert c.get("/model").json()["model_version"] == 1
    assert any("serving version 1" in rec.getMessage() for rec in caplog.records)
    r = c.post("/admin/reload")
    assert r.status_code == 422 and "version 2" in r.json()["detail"]
    recs, labels = records(world, 900, 30)  # something to train on, so that retrain loads CURRENT
    ids = [p["impression_id"] for p in c.post("/predict", json={"records": recs}).json()["predictions"]]
    c.post("/feedback", json={"events": [{"impression_id": i, "label": y} for i, y in zip(ids, labels)]})
    runner = CliRunner()
    out = runner.invoke(serve_cli, ["retrain", "--model-dir", str(md)])
    last = out.output.strip().splitlines()[-1]  # after the progress line, one line of error, no traceback
    assert out.exit_code == 2 and last.startswith("error: version 2") and "Traceback" not in out.output
    point(md, "two")  # not a number at all: the newest version that loads
    c.app.state.service.close()
    c = client(md)
    assert c.get("/model").json()["model_version"] == 1
    r = c.post("/admin/reload")
    assert r.status_code == 422 and "expected a version number" in r.json()["detail"]


def test_corrupt_config_is_a_one_line_error(world, tmp_path):
    md = fresh(world, tmp_path)
    (md / "config.yaml").write_text("data: {source: [unclosed\n  runs: :::\n")
    runner = CliRunner()
    for args in (["serve", "--model-dir", str(md)], ["retrain", "--model-dir", str(md)]):
        out = runner.invoke(serve_cli, args)
        assert out.exit_code == 2, out.output
        assert out.output.startswith("error:") and len(out.output.strip().splitlines()) == 1, out.output
        assert "config.yaml" in out.output
    (md / "config.yaml").write_text("just a string\n")
    with pytest.raises(RegistryError, match="not a mapping"):
        ModelDir(md).config()


# -- 6: bad input that gave 5xx or hung -----------------------------------------------------------
@pytest.mark.parametrize("field", ["user_id", "item_id"])
def test_lone_surrogates_are_422_naming_the_field(world, tmp_path, field):
    md = fresh(world, tmp_path)
    c = client(md)
    recs = records(world, 900, 2)[0]
    body = json.dumps({"records": recs}).replace(f'"{field}": "', f'"{field}": "\\ud800', 1)
    r = c.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == f"records[0].{field}"
    assert "surrogate" in r.json()["detail"][0]["msg"]
    r = c.post("/feedback", content='{"events": [{"impression_id": "\\udfff", "label": 1}]}')
    assert r.status_code == 422 and r.json()["field"] == "events[0].impression_id"
    r = c.post("/predict", content='{"records": [{"\\ud800": 1}]}')
    assert r.status_code == 422 and r.json()["field"] == "records[0].\\ud800"
    log = ServeLog(md / "log.sqlite3")
    assert log.count("impressions") == 0 and len(log.quarantined()) == 3  # stored, escaped
    assert c.get("/healthz").status_code == 200


def _asgi(app, messages: list[dict], headers: list[tuple[bytes, bytes]], path="/predict", timeout=5.0):
    """Drive the ASGI app directly: ``messages`` are what the client sends (then it goes silent)."""
    sent: list[dict] = []

    async def main():
        queue = list(messages)

        async def receive():
            if queue:
                return queue.pop(0)
            await asyncio.sleep(3600)  # a client that promised more and never sends it

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout)

    asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_short_bodies_time_out_and_large_ones_are_refused_unread(world, tmp_path):
    md = fresh(world, tmp_path)
    app = create_app(md, admin_token=TOKEN, limits=Limits(body_timeout=0.3, max_body_bytes=1000))
    # Content-Length longer than the body: 408 after the timeout instead of a connection held open
    status, body = _asgi(
        app,
        [{"type": "http.request", "body": b'{"records": [', "more_body": True}],
        [(b"content-length", b"500"), (b"content-type", b"application/json")],
    )
    assert status == 408 and body["field"] == "body"
    # a declared size over the limit is refused before reading a byte
    status, body = _asgi(app, [], [(b"content-length", b"5000000")])
    assert status == 413 and body["field"] == "body"
    # a chunked body that grows past the limit
    chunk = {"type": "http.request", "body": b" " * 600, "more_body": True}
    status, body = _asgi(app, [chunk, chunk], [(b"transfer-encoding", b"chunked")])
    assert status == 413


def test_every_500_is_logged_once_with_a_bounded_line(world, tmp_path, caplog, monkeypatch):
    md = fresh(world, tmp_path)
    c = TestClient(create_app(md, admin_token=TOKEN), raise_server_exceptions=False)
    svc = c.app.state.service

    def broken(records):
        raise RuntimeError("boom " + "x" * 10_000)

    monkeypatch.setattr(svc, "predict", broken)
    with caplog.at_level(logging.ERROR, logger="reloop.serve"):
        for _ in range(5):
            r = c.post("/predict", json={"records": []})
            assert r.status_code == 500 and r.json() == {
                "detail": "internal error (logged by the server)",
                "field": None,
            }
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # the traceback once, not per request
    assert len(errors[0].getMessage()) < 600
    assert 'reloop_internal_errors_total{endpoint="/predict"} 5.0' in c.get("/metrics").text


# -- 7: admin token, rate limit, docs ---------------------------------------------------------------
def test_admin_routes_need_the_token(world, tmp_path, monkeypatch):
    monkeypatch.delenv("RELOOP_ADMIN_TOKEN", raising=False)
    md = fresh(world, tmp_path)
    off = TestClient(create_app(md))
    r = off.post("/admin/reload")
    assert r.status_code == 403 and r.json()["field"] == "authorization"
    assert off.get("/admin/retrain").status_code == 403
    assert off.post("/admin/retrain", params={"wait": "true"}).status_code == 403
    assert off.get("/docs").status_code == 200  # loopback default: docs open
    off.app.state.service.close()
    on = TestClient(create_app(md, admin_token=TOKEN, docs_need_token=True))
    for headers in ({}, {"authorization": "Bearer wrong-token-wrong-token"}, {"authorization": TOKEN}):
        r = on.post("/admin/reload", headers=headers)
        assert r.status_code == 401 and r.json()["field"] == "authorization"
    assert on.post("/admin/reload", headers=ADMIN).json() == {"swapped": False, "model_version": 1}
    assert on.get("/openapi.json").status_code == 401 and on.get("/docs").status_code == 401
    assert on.get("/openapi.json", headers=ADMIN).status_code == 200
    assert on.post("/predict", json={"records": []}).status_code == 200  # the public routes stay public
    monkeypatch.setenv("RELOOP_ADMIN_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16"):
        create_app(md)


def test_admin_routes_are_rate_limited_per_client(world, tmp_path):
    md = fresh(world, tmp_path)
    c = client(md, limits=Limits(admin_per_minute=6, admin_burst=3))
    codes = [c.post("/admin/reload").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = c.post("/admin/reload")
    assert r.json()["field"] == "admin" and int(r.headers["retry-after"]) >= 1
    assert c.post("/predict", json={"records": []}).status_code == 200  # only admin routes are limited
    limiter = RateLimiter(per_minute=60, burst=2, max_clients=3)
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.take("a", now=1.0) == 0.0  # one request per second refills
    for k in range(10):
        limiter.take(f"c{k}", now=2.0)
    assert len(limiter._buckets) == 3  # bounded


def test_non_loopback_bind_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("RELOOP_ADMIN_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    out = CliRunner().invoke(serve_cli, ["serve", "--model-dir", str(tmp_path / "md"), "--host", "0.0.0.0"])
    assert out.exit_code == 2 and "not a loopback address" in out.output
    (tmp_path / "token").write_text("short\n")
    out = CliRunner().invoke(
        serve_cli,
        [
            "serve",
            "--model-dir",
            str(tmp_path / "md"),
            "--host",
            "0.0.0.0",
            "--admin-token-file",
            str(tmp_path / "token"),
        ],
    )
    assert out.exit_code == 2 and "at least 16" in out.output


# -- 8: the quick-start curl ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers", [{}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}]
)
def test_json_is_accepted_whatever_the_content_type(world, tmp_path, headers):
    md = fresh(world, tmp_path)
    c = client(md)
    recs = records(world, 900, 1)[0]
    r = c.post("/predict", content=json.dumps({"records": recs}), headers=headers)
    assert r.status_code == 200, r.text
    imp = r.json()["predictions"][0]["impression_id"]
    r = c.post("/feedback", content=json.dumps({"events": [{"impression_id": imp, "label": 1}]}), headers=headers)
    assert r.status_code == 200 and r.json()["accepted"] == 1


def test_retrain_still_publishes_loadable_safe_versions(world, tmp_path):
    """The chain continues across the new formats: publish, reload, state.pt read with weights_only."""
    md = fresh(world, tmp_path, run="replay")
    c = client(md)
    recs, labels = records(world, 900, 200)
    ids = [p["impression_id"] for p in c.post("/predict", json={"records": recs}).json()["predictions"]]
    c.post("/feedback", json={"events": [{"impression_id": i, "label": y} for i, y in zip(ids, labels)]})
    from reloop.serve.retrain import RetrainOptions

    result = retrain(md, RetrainOptions(max_auc_drop=1.0, holdout=0.1))
    assert result.outcome == "published", result
    assert c.post("/admin/reload").json() == {"swapped": True, "model_version": 2}
    assert {p.name for p in ModelDir(md).version_path(2).iterdir()} >= {"serving.safetensors", "state.pt"}
    assert isinstance(ModelDir(md).load_state(2)["strategy"], dict)
    save_model(c.app.state.service.state.model, tmp_path / "m.safetensors")


def test_a_combine_run_is_hosted_and_a_bad_expert_name_is_refused_naming_the_key(tmp_path):
    """A ``combine:`` run is hosted (one chain per expert, reloop.serve.ensemble); an expert whose name cannot
    be a directory, is refused before any work, naming the key."""
    from reloop.config import parse_config
    from reloop.serve.registry import RegistryError, pick_run

    def cfg_with(runs):
        return parse_config({"data": {"source": "synthetic", "periods": {"count": 31, "by": "rows"}}, "runs": runs})

    mix = {"update": "incremental", "combine": {"experts": ["IU"]}}
    cfg = cfg_with({"IU": {"update": "incremental"}, "mix": mix})
    assert pick_run(cfg, None) == "IU" and pick_run(cfg, "mix") == "mix"
    bad = cfg_with({"a/b": {"update": "incremental"}, "mix": {**mix, "combine": {"experts": ["a/b"]}}})
    with pytest.raises(RegistryError, match=r"runs\.mix\.combine\.experts: 'a/b'"):
        pick_run(bad, "mix")
