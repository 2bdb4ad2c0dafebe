"""The online service in-process (FastAPI TestClient): predict/feedback, bad input, memory, retrain,
hot swap under load, validation gate, y_last from the log."""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

warnings.filterwarnings("ignore", message=".*httpx2.*")
from fastapi.testclient import TestClient  # noqa: E402

from reloop.config import load_config  # noqa: E402
from reloop.data.sources import load_source  # noqa: E402
from reloop.serve.app import create_app  # noqa: E402
from reloop.serve.log import RowCodec, ServeLog  # noqa: E402
from reloop.serve.registry import ModelDir, RegistryError, bootstrap  # noqa: E402
from reloop.serve.retrain import RetrainOptions, retrain  # noqa: E402

MEMORY = {"sketch": {"arrays": 16, "bits": 4}, "lambda": 0.8}
RUNS = {
    "IU": {"update": "incremental"},
    "IU-mem": {"update": "incremental", "memory": MEMORY},
    "SC": {"update": "incremental", "loss": {"self_correction": 0.5}},
    "SC-comp-mem": {
        "update": "incremental",
        "loss": {"self_correction": 0.5, "y_last": "compensated"},
        "memory": MEMORY,
    },
    "BU": {"update": {"batch": 2}},
    "full": {"update": "full"},
    "replay": {"update": {"replay": {"reservoir": 0.5, "ratio": 0.5}}},
    "SML": {"update": "incremental", "generator": {"sml": {"warmup": 0}}},
    "frozen": {"update": "none"},
}


def write_config(dir_: Path) -> Path:
    raw = {
        "data": {
            "source": "synthetic",
            "synthetic": {"users": 60, "items": 40, "rows_per_period": 300, "periods": 8, "seed": 0},
            "periods": {"count": 8, "by": "rows"},
            "cache": str(dir_ / "cache"),
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 128, "lr": 0.01},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0]},
        "runs": RUNS,
    }
    path = dir_ / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Config, raw frame and one bootstrapped model directory per run (built lazily, copied per test)."""
    root = tmp_path_factory.mktemp("serve")
    cfg_path = write_config(root)
    cfg = load_config(cfg_path)
    frame = load_source(cfg.data).frame
    built: dict[str, Path] = {}

    def model_dir(run: str, dest: Path) -> Path:
        if run not in built:
            built[run] = bootstrap(cfg, root / f"md-{run}", run, log=lambda *_: None).path
        shutil.copytree(built[run], dest)
        return dest

    return {"cfg": cfg, "cfg_path": cfg_path, "frame": frame, "model_dir": model_dir}


def records(world, start: int, n: int) -> tuple[list[dict], list[int]]:
    part = world["frame"].slice(start, n)
    cols = ["user_id", "item_id", "item_cat", "hour"]
    return part.select(cols).to_dicts(), part["label"].to_list()


TOKEN = "test-admin-token-0123456789"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


def client_for(world, tmp_path, run="IU", **kw) -> tuple[TestClient, Path]:
    """A client of a fresh copy of ``run``'s model directory; it sends the admin token."""
    md = world["model_dir"](run, tmp_path / "md")
    return TestClient(create_app(md, admin_token=TOKEN, **kw), headers=ADMIN), md


def predict_and_label(client, world, start: int, n: int) -> tuple[list[str], list[int], dict]:
    recs, labels = records(world, start, n)
    r = client.post("/predict", json={"records": recs})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [p["impression_id"] for p in body["predictions"]]
    fb = client.post("/feedback", json={"events": [{"impression_id": i, "label": y} for i, y in zip(ids, labels)]})
    assert fb.status_code == 200, fb.text
    return ids, labels, body


# -- predict / feedback ----------------------------------------------------------------------------
def test_predict_feedback_round_trip_is_logged(world, tmp_path):
    client, md = client_for(world, tmp_path)
    recs, labels = records(world, 900, 20)
    r = client.post("/predict", json={"records": recs})
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == 1
    preds = body["predictions"]
    assert len(preds) == 20 and len({p["impression_id"] for p in preds}) == 20
    assert all(0.0 < p["p"] < 1.0 for p in preds)
    log = ServeLog(md / "log.sqlite3")
    rows = {r["id"]: r for r in log.impressions()}
    assert set(rows) == {p["impression_id"] for p in preds}
    assert all(rows[p["impression_id"]]["p_served"] == pytest.approx(p["p"], abs=0) for p in preds)
    assert {r["period"] for r in rows.values()} == {4} and {r["model_version"] for r in rows.values()} == {1}
    fb = client.post(
        "/feedback", json={"events": [{"impression_id": p["impression_id"], "label": y} for p, y in zip(preds, labels)]}
    )
    assert fb.status_code == 200
    assert fb.json() == {"accepted": 20, "duplicates": [], "memory_written": 0}
    assert log.count("feedback") == 20
    # the same record scores the same with the same model (the encoder is deterministic)
    again = client.post("/predict", json={"records": recs[:3]}).json()["predictions"]
    assert [p["p"] for p in again] == pytest.approx([p["p"] for p in preds[:3]], abs=1e-7)
    assert client.get("/healthz").json() == {"status": "ok", "model_version": 1}


def test_duplicate_feedback_is_ignored_and_reported(world, tmp_path):
    client, md = client_for(world, tmp_path)
    recs, _ = records(world, 900, 3)
    ids = [p["impression_id"] for p in client.post("/predict", json={"records": recs}).json()["predictions"]]
    first = client.post(
        "/feedback", json={"events": [{"impression_id": ids[0], "label": 1}, {"impression_id": ids[0], "label": 0}]}
    ).json()
    assert first["accepted"] == 1 and first["duplicates"] == [ids[0]]
    second = client.post(
        "/feedback", json={"events": [{"impression_id": ids[0], "label": 0}, {"impression_id": ids[1], "label": 0}]}
    ).json()
    assert second["accepted"] == 1 and second["duplicates"] == [ids[0]]
    log = ServeLog(md / "log.sqlite3")
    labels = dict(log.conn.execute("SELECT impression_id, label FROM feedback").fetchall())
    assert labels == {ids[0]: 1, ids[1]: 0}  # the first label wins
    assert "reloop_feedback_duplicates_total 2.0" in client.get("/metrics").text


def test_unknown_impression_is_404_and_writes_nothing(world, tmp_path):
    client, md = client_for(world, tmp_path)
    recs, _ = records(world, 900, 2)
    ids = [p["impression_id"] for p in client.post("/predict", json={"records": recs}).json()["predictions"]]
    r = client.post(
        "/feedback",
        json={"events": [{"impression_id": ids[0], "label": 1}, {"impression_id": "no-such-id", "label": 0}]},
    )
    assert r.status_code == 404
    assert "no-such-id" in r.json()["detail"] and r.json()["impression_ids"] == ["no-such-id"]
    assert ServeLog(md / "log.sqlite3").count("feedback") == 0  # all or nothing


def test_batch_too_large_is_413(world, tmp_path):
    client, _ = client_for(world, tmp_path, max_batch=5)
    recs, _ = records(world, 900, 6)
    r = client.post("/predict", json={"records": recs})
    assert r.status_code == 413 and "records" in r.json()["detail"]
    r = client.post("/feedback", json={"events": [{"impression_id": "x", "label": 0}] * 6})
    assert r.status_code == 413 and r.json()["field"] == "events"
    assert client.post("/predict", json={"records": recs[:5]}).status_code == 200


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda r: r.pop("item_id"), "records[1].item_id", "field required"),
        (lambda r: r.update(hour=[1, 2]), "records[1].hour", "expected a string or integer id"),
        (lambda r: r.update(user_id={"a": 1}), "records[1].user_id", "expected a string or integer id"),
    ],
)
def test_malformed_record_is_422_naming_the_field_and_quarantined(world, tmp_path, mutate, field, reason):
    client, md = client_for(world, tmp_path)
    recs, _ = records(world, 900, 3)
    mutate(recs[1])
    r = client.post("/predict", json=recs and {"records": recs})
    assert r.status_code == 422
    assert r.json()["field"] == field
    assert reason in r.json()["detail"][0]["msg"]
    log = ServeLog(md / "log.sqlite3")
    q = log.quarantined()
    assert len(q) == 1 and reason in q[0]["reason"] and field.split(".")[-1] in q[0]["reason"]
    assert json.loads(q[0]["payload"]) == recs[1]
    assert log.count("impressions") == 0  # nothing of a rejected request is logged
    assert client.post("/predict", json={"records": recs[:1]}).status_code == 200  # still serving


def test_numeric_feature_rejects_non_numbers(tmp_path):
    """A CSV source with a numeric column: a string there is a 422 naming it (and quarantined)."""
    rng = np.random.default_rng(0)
    n = 800
    lines = ["ts,label,user_id,item_id,price"] + [
        f"{i},{int(rng.random() < 0.3)},u{rng.integers(20)},i{rng.integers(15)},{rng.normal(10, 2):.3f}"
        for i in range(n)
    ]
    (tmp_path / "log.csv").write_text("\n".join(lines))
    raw = {
        "data": {
            "source": "csv",
            "path": str(tmp_path / "log.csv"),
            "time": "ts",
            "label": "label",
            "user": "user_id",
            "cache": str(tmp_path / "cache"),
            "features": {"user_id": "categorical", "item_id": "categorical", "price": "numeric"},
            "periods": {"count": 8, "by": "rows"},
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"pretrain_epochs": 1, "batch_size": 128},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2},
        "runs": {"IU": {"update": "incremental"}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    md = bootstrap(load_config(tmp_path / "c.yaml"), tmp_path / "md", log=lambda *_: None)
    client = TestClient(create_app(md.path))
    good = {"user_id": "u1", "item_id": "i2", "price": 9.5}
    assert client.post("/predict", json={"records": [good, {**good, "price": 11}]}).status_code == 200
    svc = client.app.state.service
    data, _ = svc.parser.parse([good, {**good, "price": 11.25}, {**good, "price": None}])
    fast = svc.encoder.encode_known(data, 3)
    slow = svc.encoder.transform(svc.parser.frame(data), grow=False)
    assert fast is not None and all(torch.equal(fast[k], slow[k]) for k in slow)
    r = client.post("/predict", json={"records": [good, {**good, "price": "cheap"}]})
    assert r.status_code == 422 and r.json()["field"] == "records[1].price"
    assert "expected a number" in r.json()["detail"][0]["msg"]
    assert ServeLog(md.log_path).quarantined()[0]["reason"].startswith("price: expected a number")


def test_bad_json_and_bad_types_are_422_and_quarantined(world, tmp_path):
    client, md = client_for(world, tmp_path)
    r = client.post("/predict", content=b'{"records": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = client.post("/predict", json={"rows": []})
    assert r.status_code == 422 and r.json()["field"] == "records"
    r = client.post("/feedback", json={"events": [{"impression_id": "a", "label": "yes"}]})
    assert r.status_code == 422 and r.json()["field"] == "events[0].label"
    r = client.post("/feedback", json={"events": [{"impression_id": "a", "label": 1, "extra": 1}]})
    assert r.status_code == 422 and r.json()["field"] == "events[0].extra"
    assert len(ServeLog(md / "log.sqlite3").quarantined()) == 4
    assert client.get("/healthz").status_code == 200


def test_unseen_ids_get_new_indices_then_overflow_and_survive_restart(world, tmp_path):
    client, md = client_for(world, tmp_path)
    enc = client.app.state.service.encoder
    vocab = enc.vocabs["item_id"]
    known = len(vocab.index)
    recs, _ = records(world, 900, 1)
    new = [{**recs[0], "item_id": f"brand-new-{k}"} for k in range(vocab.capacity - known + 3)]
    assert client.post("/predict", json={"records": new}).status_code == 200
    assert len(vocab.index) == vocab.capacity  # filled in arrival order up to capacity ...
    assert vocab.index["brand-new-0"] == 2 + known
    log = ServeLog(md / "log.sqlite3")
    codec = RowCodec(client.app.state.service.feature_map, with_user=True)
    blobs = [r[0] for r in log.conn.execute("SELECT features FROM impressions ORDER BY rowid")]
    items = codec.decode(blobs)["item_id"].tolist()
    assert items[0] == 2 + known
    assert all(i >= 2 + vocab.capacity for i in items[-3:])  # ... then hashed overflow buckets
    client.app.state.service.close()
    # a restarted service restores every assigned id from the log (the snapshot only has pretraining ids)
    again = TestClient(create_app(md))
    assert again.app.state.service.encoder.vocabs["item_id"].index == vocab.index


def test_known_id_fast_path_matches_the_encoder(world, tmp_path):
    client, _ = client_for(world, tmp_path)
    svc = client.app.state.service
    recs, _ = records(world, 0, 200)  # pretraining rows: every id is known
    recs[5]["item_cat"] = None  # a missing value -> padding
    data, errors = svc.parser.parse(recs)
    assert not errors
    fast = svc.encoder.encode_known(data, len(recs))
    assert fast is not None
    slow = svc.encoder.transform(svc.parser.frame(data), grow=False)
    assert set(fast) == set(slow)
    for k in slow:
        assert fast[k].dtype == slow[k].dtype and torch.equal(fast[k], slow[k]), k
    data["item_id"][0] = "never-seen"
    assert svc.encoder.encode_known(data, len(recs)) is None  # unseen ids take the encoder's own path


def test_model_and_metrics_endpoints(world, tmp_path):
    client, _ = client_for(world, tmp_path, run="IU-mem")
    predict_and_label(client, world, 900, 50)
    info = client.get("/model").json()
    assert info["model_version"] == 1 and info["trained_through"] == 3 and info["serves_period"] == 4
    assert info["composition"]["run"] == "IU-mem" and info["composition"]["update"] == "incremental"
    assert info["composition"]["memory"]["sketch"] == MEMORY["sketch"]
    assert info["memory"]["n_written"] == 50 and info["open_period"] == 4
    text = client.get("/metrics").text
    assert 'reloop_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert 'reloop_request_seconds_bucket{endpoint="/feedback"' in text
    assert "reloop_memory_written 50.0" in text and "reloop_memory_bytes" in text
    assert "reloop_rolling_events 50.0" in text
    auc_line = next(line for line in text.splitlines() if line.startswith("reloop_rolling_auc "))
    assert 0.0 < float(auc_line.split()[1]) < 1.0


def test_memory_is_written_on_feedback_and_compensates(world, tmp_path):
    client, md = client_for(world, tmp_path, run="IU-mem")
    memory = client.app.state.service.compensator.memory
    assert memory.n_written == 0
    ids, _, first = predict_and_label(client, world, 900, 64)
    assert memory.n_written == 64
    log = ServeLog(md / "log.sqlite3")
    rows = log.impressions(ids)
    assert all(r["p_base"] == pytest.approx(r["p_served"], abs=1e-6) for r in rows)  # empty memory: ŷ' ≈ ŷ
    ids2, _, _ = predict_and_label(client, world, 964, 64)
    assert memory.n_written == 128
    rows2 = log.impressions(ids2)
    assert max(abs(r["p_base"] - r["p_served"]) for r in rows2) > 1e-3  # the memory now compensates
    dup = client.post("/feedback", json={"events": [{"impression_id": ids[0], "label": 1}]}).json()
    assert dup["memory_written"] == 0 and memory.n_written == 128  # duplicates never reach the memory
    client.app.state.service.close()
    # the memory is rebuilt from the log on restart
    assert TestClient(create_app(md)).app.state.service.compensator.memory.n_written == 128


# -- retrain, validation, hot swap -------------------------------------------------------------------
def test_retrain_publishes_and_hot_swaps_under_load(world, tmp_path):
    client, md = client_for(world, tmp_path, poll_interval=0.05)
    labelled_ids, _, _ = predict_and_label(client, world, 900, 300)
    recs, _ = records(world, 1200, 8)
    stop = threading.Event()
    seen: list[int] = []
    timed: list[tuple[float, float, int]] = []
    failures: list[str] = []

    def hammer():
        while not stop.is_set():
            try:
                t0 = time.monotonic()
                r = client.post("/predict", json={"records": recs})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.append(r.json()["model_version"])
                    timed.append((t0, time.monotonic(), r.json()["model_version"]))
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        result = retrain(md, RetrainOptions(max_auc_drop=1.0, holdout=0.2))
        assert result.outcome == "published" and result.version == 2 and result.period == 4
        deadline = time.monotonic() + 20
        while (not seen or seen[-1] != 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert failures == []
    assert seen.count(1) > 0 and seen[-1] == 2  # served v1, then swapped to v2
    first_new = min(end for _, end, v in timed if v == 2)
    assert all(v == 2 for start, _, v in timed if start > first_new)  # never back to the old model
    info = client.get("/model").json()
    assert info["model_version"] == 2 and info["trained_through"] == 4 and info["update_periods"] == [4]
    assert info["open_period"] == 5 and info["validation"]["n_holdout"] == 60
    assert ModelDir(md).current_version() == 2
    log = ServeLog(md / "log.sqlite3")
    # exactly the labelled impressions were trained on (unlabelled ones wait for the label timeout)
    trained = [r for r in log.impressions() if r["row_id"] is not None]
    assert {r["id"] for r in trained} == set(labelled_ids) and {r["period"] for r in trained} == {4}
    closed = next(p["closed"] for p in log.periods() if p["period"] == 4)
    assert all(r["period"] == 5 for r in log.impressions() if r["ts"] > closed)  # logged after the close
    assert "reloop_model_swaps_total 1.0" in client.get("/metrics").text


def test_candidate_worse_than_margin_is_rejected(world, tmp_path):
    client, md = client_for(world, tmp_path)
    predict_and_label(client, world, 900, 300)
    result = retrain(md, RetrainOptions(max_auc_drop=-1.0, holdout=0.3))  # demand an AUC gain of +1
    assert result.outcome == "rejected", result
    assert "candidate AUC" in result.reason and result.auc_candidate is not None
    assert ModelDir(md).current_version() == 1 and ModelDir(md).list_versions() == [1]
    assert client.post("/admin/reload").json() == {"swapped": False, "model_version": 1}
    log = ServeLog(md / "log.sqlite3")
    assert log.current_period() == 5  # the period is consumed all the same
    assert log.retrains()[-1]["outcome"] == "rejected"


def test_unlabelled_impressions_become_negatives_after_the_timeout(world, tmp_path):
    client, md = client_for(world, tmp_path)
    recs, _ = records(world, 900, 40)
    ids = [p["impression_id"] for p in client.post("/predict", json={"records": recs}).json()["predictions"]]
    client.post("/feedback", json={"events": [{"impression_id": i, "label": 1} for i in ids[:10]]})
    skipped = retrain(md, RetrainOptions(label_timeout=None, min_rows=11, holdout=0.0))
    assert skipped.outcome == "skipped" and ServeLog(md / "log.sqlite3").current_period() == 4
    done = retrain(md, RetrainOptions(label_timeout=60.0, holdout=0.0), now=time.time() + 61)
    assert done.outcome == "published" and done.n_train == 40
    used = {r["id"]: r["label_used"] for r in ServeLog(md / "log.sqlite3").impressions()}
    assert [used[i] for i in ids] == [1] * 10 + [0] * 30


def _capture_training_rows(monkeypatch) -> list:
    import reloop.update.strategies as strategies

    captured = []
    real = strategies.train_rows

    def spy(model, optimizer, rows, *a, **kw):
        captured.append(rows)
        return real(model, optimizer, rows, *a, **kw)

    monkeypatch.setattr(strategies, "train_rows", spy)
    return captured


@pytest.mark.parametrize("run, column", [("SC", "p_base"), ("SC-comp-mem", "p_served")])
def test_self_correction_y_last_is_the_logged_prediction(world, tmp_path, monkeypatch, run, column):
    client, md = client_for(world, tmp_path, run=run)
    predict_and_label(client, world, 900, 100)
    predict_and_label(client, world, 1000, 100)
    captured = _capture_training_rows(monkeypatch)
    result = retrain(md, RetrainOptions(holdout=0.0, max_auc_drop=1.0))
    assert result.outcome == "published"
    # the run's own update carries ŷ_last; the guard's shadow IU chain (plain CE) trains after it without
    own = [r for r in captured if "y_last" in r.data]
    assert own and "y_last" not in captured[-1].data
    rows = own[-1]
    log = ServeLog(md / "log.sqlite3")
    logged = {r["row_id"]: r for r in log.impressions()}
    expect = torch.tensor([logged[int(i)][column] for i in rows.data["row"]], dtype=torch.float32)
    assert torch.equal(rows.data["y_last"], expect)  # bit for bit what was logged
    if run == "SC-comp-mem":
        base = torch.tensor([logged[int(i)]["p_base"] for i in rows.data["row"]], dtype=torch.float32)
        assert not torch.equal(rows.data["y_last"], base)  # the test can tell the two apart


@pytest.mark.parametrize("run", ["BU", "full", "replay", "SML"])
def test_every_update_and_generator_retrains_twice_from_the_log(world, tmp_path, monkeypatch, run):
    client, md = client_for(world, tmp_path, run=run)
    captured = _capture_training_rows(monkeypatch)
    predict_and_label(client, world, 900, 200)
    first = retrain(md, RetrainOptions(holdout=0.1, max_auc_drop=1.0))
    assert first.outcome == "published", first
    client.post("/admin/reload")
    predict_and_label(client, world, 1200, 200)
    before_second = len(captured)
    second = retrain(md, RetrainOptions(holdout=0.1, max_auc_drop=1.0))
    assert second.outcome == "published" and second.version == 3, second
    pre = ModelDir(md).info()["pretrain_rows"]
    # the run's own update is the largest training set of the last retrain: BU-w and full also train
    # the guard's shadow IU chain (reloop.engine), on D_5 alone
    rows = max(captured[before_second:], key=len) if captured[before_second:] else None
    if run == "BU":  # D_4 (all 200 labelled rows, hold-out included) + D_5's 180 training rows
        assert sorted(set(rows.data["row"].tolist())) == list(range(pre, pre + 200 + 180))
    if run == "full":
        assert len(rows) == pre + 200 + 180
    assert client.post("/admin/reload").json()["model_version"] == 3
    assert client.post("/predict", json={"records": records(world, 1400, 3)[0]}).json()["model_version"] == 3


def test_frozen_run_never_publishes(world, tmp_path):
    client, md = client_for(world, tmp_path, run="frozen")
    predict_and_label(client, world, 900, 50)
    result = retrain(md)
    assert result.outcome == "skipped" and ModelDir(md).current_version() == 1


def test_in_server_retrain_every_n_feedback_events(world, tmp_path):
    retrain_opts = RetrainOptions(max_auc_drop=1.0, holdout=0.1)
    client, md = client_for(world, tmp_path, retrain_every=100, retrain_options=retrain_opts)
    predict_and_label(client, world, 900, 60)
    assert client.get("/admin/retrain").json()["last"] is None
    predict_and_label(client, world, 960, 60)  # 120 ≥ 100 events: a background retrain starts
    deadline = time.monotonic() + 30
    while client.get("/model").json()["model_version"] != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/model").json()["model_version"] == 2
    assert client.get("/admin/retrain").json()["last"]["outcome"] == "published"


def test_bootstrap_refuses_a_foreign_directory(world, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RegistryError, match="not empty"):
        bootstrap(world["cfg"], tmp_path / "x", log=lambda *_: None)
    with pytest.raises(RegistryError, match="not a bootstrapped"):
        create_app(tmp_path / "x")


def test_group_commit_keeps_each_request_atomic_under_concurrency(tmp_path):
    """Concurrent feedback shares commits, yet every id is accepted once and a request naming an
    unknown id writes nothing while the requests committed beside it keep their writes."""
    import random

    from reloop.serve.log import UnknownImpressions

    log = ServeLog(tmp_path / "log.sqlite3")
    log.open_period(4)
    ids = [f"imp{k}" for k in range(300)]
    log.submit_impressions(ids, 1, [b"f"] * 300, [b"h"] * 300, [0.5] * 300, [0.5] * 300).result()
    accepted: list[str] = []
    rejected: list[list[str]] = []
    lock = threading.Lock()

    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            work(seed)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            batch = rng.sample(ids, 8)
            events = [(i, rng.randint(0, 1)) for i in batch]
            bad = rng.random() < 0.3
            if bad:
                events.append(("unknown-id", 1))
            try:
                res = log.write_feedback(events)
            except UnknownImpressions as e:
                assert bad and e.ids == ["unknown-id"]  # an innocent request never fails with another's error
                with lock:
                    rejected.append(batch)
                continue
            assert not bad
            with lock:
                accepted.extend(r.id for r, _ in res.accepted)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert rejected and accepted
    assert len(accepted) == len(set(accepted))  # no id accepted twice across racing requests
    stored = {r[0] for r in log.conn.execute("SELECT impression_id FROM feedback")}
    assert stored == set(accepted)


def test_cli_refuses_mismatched_config_and_unbootstrapped_dirs(world, tmp_path):
    from typer.testing import CliRunner

    from reloop.serve.cli import app as serve_cli

    runner = CliRunner()
    md = world["model_dir"]("IU", tmp_path / "md")
    raw = yaml.safe_load(world["cfg_path"].read_text())
    raw["model"]["embedding_dim"] = 8
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    r = runner.invoke(serve_cli, ["serve", "--config", str(other), "--model-dir", str(md)])
    assert r.exit_code == 2 and "model" in r.output
    r = runner.invoke(serve_cli, ["serve", "--model-dir", str(md), "--run", "BU"])
    assert r.exit_code == 2 and "serves run 'IU'" in r.output
    r = runner.invoke(serve_cli, ["serve", "--model-dir", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "--config" in r.output
    r = runner.invoke(serve_cli, ["retrain", "--model-dir", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "not a bootstrapped model directory" in r.output
    r = runner.invoke(serve_cli, ["retrain", "--model-dir", str(md)])  # nothing logged yet
    assert r.exit_code == 0 and json.loads(r.stdout.strip().splitlines()[-1])["outcome"] == "skipped"
