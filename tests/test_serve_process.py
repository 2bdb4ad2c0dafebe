"""The service as real processes: kill -9 durability, `reloop retrain` + hot swap of a running
server under load, and the --demo replay end to end (tiny config)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from reloop.config import load_config
from reloop.data.sources import load_source
from reloop.serve.log import RowCodec, ServeLog
from reloop.serve.registry import ModelDir, bootstrap
from reloop.serve.replay import run_demo, start_server

COLS = ["user_id", "item_id", "item_cat", "hour"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-proc")
    raw = {
        "data": {
            "source": "synthetic",
            "synthetic": {"users": 60, "items": 40, "rows_per_period": 300, "periods": 8, "seed": 1},
            "periods": {"count": 8, "by": "rows"},
            "cache": str(root / "cache"),
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 128, "lr": 0.01},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0]},
        "runs": {
            "IU-mem": {"update": "incremental", "memory": {"exact": {"size": 500, "top_k": 8}}},
            "IU": {"update": "incremental"},
        },
    }
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    return {"root": root, "cfg": cfg, "cfg_path": path, "frame": load_source(cfg.data).frame}


@pytest.mark.slow
def test_group_commits_under_concurrent_load_survive_kill_9(setup, tmp_path):
    """Eight clients in flight (batch-1 predicts and labels, the case the writer thread groups and the
    event loop scores together), the server killed with SIGKILL mid-load: every impression and every
    label acknowledged before the kill is in the log (impressions commit without fsync, labels with
    one; a killed process loses neither), with the label the client sent."""
    md = bootstrap(setup["cfg"], tmp_path / "md", "IU-mem", log=lambda *_: None)
    frame = setup["frame"]
    recs = frame.slice(900, 400).select(COLS).to_dicts()
    labels = frame.slice(900, 400)["label"].to_list()
    acked_imps: set[str] = set()
    acked_fb: dict[str, int] = {}
    lock = threading.Lock()
    server = start_server(md.path, log_path=tmp_path / "server.log")
    stop = threading.Event()

    def load(w: int) -> None:
        k = w
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not stop.is_set():
                i = k % len(recs)
                k += 8
                try:
                    r = c.post("/predict", json={"records": [recs[i]]})
                    if r.status_code != 200:
                        continue
                    imp = r.json()["predictions"][0]["impression_id"]
                    with lock:
                        acked_imps.add(imp)
                    if (
                        k % 3
                        and c.post(
                            "/feedback", json={"events": [{"impression_id": imp, "label": labels[i]}]}
                        ).status_code
                        == 200
                    ):
                        with lock:
                            acked_fb[imp] = labels[i]
                except httpx.HTTPError:
                    return  # the server is gone

    workers = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for th in workers:
        th.start()
    time.sleep(1.5)
    os.kill(server.pid, signal.SIGKILL)  # mid-load
    server.proc.wait(10)
    stop.set()
    for th in workers:
        th.join(10)
    server.stop()
    assert server.proc.returncode == -signal.SIGKILL
    assert len(acked_imps) >= 40 and len(acked_fb) >= 20

    log = ServeLog(md.log_path)
    assert acked_imps <= {r["id"] for r in log.impressions()}  # every acknowledged impression survived
    stored_fb = dict(log.conn.execute("SELECT impression_id, label FROM feedback").fetchall())
    assert all(stored_fb.get(i) == y for i, y in acked_fb.items())  # every acknowledged label, as sent
    log.close()


def test_acknowledged_writes_survive_kill_9_and_retrain_swaps_a_live_server(setup, tmp_path):
    md = bootstrap(setup["cfg"], tmp_path / "md", "IU-mem", log=lambda *_: None)
    frame = setup["frame"]
    recs = frame.slice(900, 600).select(COLS).to_dicts()
    labels = frame.slice(900, 600)["label"].to_list()
    for k in range(0, 600, 30):
        recs[k]["item_id"] = f"fresh-{k}"  # ids first seen by the live encoder
    acked_imps: dict[str, int] = {}  # impression id -> record index
    acked_fb: dict[str, int] = {}
    server = start_server(md.path, args=["--poll-interval", "0.2"], log_path=tmp_path / "server.log")
    stop = threading.Event()

    def load():
        k = 0
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not stop.is_set():
                i = (k * 30) % 600
                k += 1
                try:
                    r = c.post("/predict", json={"records": recs[i : i + 30]})
                    if r.status_code != 200:
                        continue
                    ids = [p["impression_id"] for p in r.json()["predictions"]]
                    acked_imps.update({imp: i + j for j, imp in enumerate(ids)})
                    events = [{"impression_id": imp, "label": labels[i + j]} for j, imp in enumerate(ids[:20])]
                    if c.post("/feedback", json={"events": events}).status_code == 200:
                        acked_fb.update({e["impression_id"]: e["label"] for e in events})
                except httpx.HTTPError:
                    return  # the server is gone

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(2.0)
    os.kill(server.pid, signal.SIGKILL)  # mid-traffic
    server.proc.wait(10)
    stop.set()
    worker.join(10)
    server.stop()
    assert server.proc.returncode == -signal.SIGKILL
    assert len(acked_imps) >= 60 and len(acked_fb) >= 40

    log = ServeLog(md.log_path)
    logged = {r["id"]: r for r in log.impressions()}
    assert set(acked_imps) <= set(logged)  # every acknowledged impression survived
    stored_fb = dict(log.conn.execute("SELECT impression_id, label FROM feedback").fetchall())
    assert all(stored_fb.get(i) == y for i, y in acked_fb.items())
    codec = RowCodec(ModelDir(md.path).feature_map(), with_user=True)
    fresh_ids = [i for i, k in acked_imps.items() if recs[k]["item_id"] == "fresh-0"]
    blob = log.conn.execute("SELECT features FROM impressions WHERE id = ?", (fresh_ids[0],)).fetchone()[0]
    fresh_index = int(codec.decode([blob])["item_id"][0])
    log.close()

    server = start_server(md.path, args=["--poll-interval", "0.2"], log_path=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            # the error memory was rebuilt from the log: every feedback of version 1 is in it
            n_fb = len(stored_fb)
            assert c.get("/model").json()["memory"]["n_written"] == n_fb
            # feedback for pre-kill impressions still works; labelled ones are duplicates
            unlabelled = [i for i in acked_imps if i not in stored_fb][:5]
            labelled = list(acked_fb)[:3]
            r = c.post("/feedback", json={"events": [{"impression_id": i, "label": 0} for i in unlabelled + labelled]})
            assert r.status_code == 200 and r.json()["accepted"] == len(unlabelled)
            assert sorted(r.json()["duplicates"]) == sorted(labelled)
            # the id the killed server assigned keeps its index after the restart
            r = c.post("/predict", json={"records": [recs[0]]})
            new_id = r.json()["predictions"][0]["impression_id"]
            log = ServeLog(md.log_path)
            blob = log.conn.execute("SELECT features FROM impressions WHERE id = ?", (new_id,)).fetchone()[0]
            assert int(codec.decode([blob])["item_id"][0]) == fresh_index

            # `reloop retrain` in another process while requests are in flight: hot swap, no failure
            failures: list[str] = []
            versions: list[int] = []
            stop = threading.Event()

            def hammer():
                with httpx.Client(base_url=server.url, timeout=30) as h:
                    while not stop.is_set():
                        try:
                            resp = h.post("/predict", json={"records": recs[:8]})
                            if resp.status_code == 200:
                                versions.append(resp.json()["model_version"])
                            else:
                                failures.append(resp.text)
                        except httpx.HTTPError as e:
                            failures.append(repr(e))

            threads = [threading.Thread(target=hammer) for _ in range(2)]
            for th in threads:
                th.start()
            try:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "reloop.serve.cli",
                        "retrain",
                        "--model-dir",
                        str(md.path),
                        "--max-auc-drop",
                        "1",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert out.returncode == 0, out.stderr
                result = json.loads(out.stdout.strip().splitlines()[-1])
                assert result["outcome"] == "published" and result["version"] == 2
                deadline = time.monotonic() + 30
                while (not versions or versions[-1] != 2) and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.3)
            finally:
                stop.set()
                for th in threads:
                    th.join()
            assert failures == []
            assert versions.count(1) > 0 and versions[-1] == 2  # served v1, then swapped to v2
            info = c.get("/model").json()
            assert info["model_version"] == 2 and info["memory"]["n_written"] == 0  # reset_on_update
    finally:
        server.stop()


def test_demo_replays_the_stream_and_writes_live_files(setup, tmp_path):
    summary = run_demo(tmp_path / "demo", run="IU", periods=2, config=setup["cfg_path"], log=lambda *_: None)
    live = json.loads((tmp_path / "demo" / "live.json").read_text())
    assert (tmp_path / "demo" / "live.png").stat().st_size > 10_000
    for key in ("live_auc", "frozen_auc", "requests", "failed_requests"):
        assert key in live
    assert live["failed_requests"] == 0 and live["requests"] == summary["requests"] == 2 * 2 * 2  # 300 rows / 256
    assert [p["period"] for p in live["periods"]] == [4, 5]
    assert live["periods"][0]["model_versions"] == [1] and live["periods"][1]["model_versions"] == [2]
    assert live["periods"][0]["live_auc"] == pytest.approx(live["periods"][0]["frozen_auc"], abs=1e-6)
