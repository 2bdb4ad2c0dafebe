"""Serving a ``combine:`` run (``reloop.serve.ensemble``): the Hedge mixture of every expert's model.

(a) the same stream served offline (``run_one`` per run + ``combine_served``) and online (predict,
feedback, retrain at the period boundary) gives the same mixture; (b) a batch's own labels never change
its own served mixture; (c) the weights resume exactly after a restart, and labels the main log holds but
the weights never consumed (a crash between the two commits) are applied at start; (d) bad input is a
4xx naming the field, never a 5xx.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*httpx2.*")
from fastapi.testclient import TestClient  # noqa: E402

from reloop.config import parse_config  # noqa: E402
from reloop.data.prepare import prepare_stream  # noqa: E402
from reloop.data.sources import load_source  # noqa: E402
from reloop.protocol.combined import combine_served  # noqa: E402
from reloop.protocol.runner import pretrain, run_one  # noqa: E402
from reloop.serve.app import create_app  # noqa: E402
from reloop.serve.ensemble import COMBINE_DB, CombineLog  # noqa: E402
from reloop.serve.host import Serving  # noqa: E402
from reloop.serve.log import ServeLog  # noqa: E402
from reloop.serve.registry import ExpertDir, ModelDir, RegistryError, bootstrap, pick_run  # noqa: E402
from reloop.serve.retrain import RetrainOptions, retrain  # noqa: E402

ROWS = 300
BATCH = 100
MEMORY = {"sketch": {"arrays": 16, "bits": 4}, "lambda": 0.8}
EXPERTS = ["IU", "SC", "MEM"]
NAMES = ["combined", *EXPERTS]
COLS = ["user_id", "item_id", "item_cat", "hour"]
TOKEN = "test-admin-token-0123456789"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


def _raw(tmp) -> dict:
    return {
        "data": {
            "source": "synthetic",
            "synthetic": {"users": 60, "items": 40, "rows_per_period": ROWS, "periods": 8, "seed": 0},
            "periods": {"count": 8, "by": "rows"},
            "cache": str(tmp / "cache"),
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 64, "lr": 0.01},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0], "serve_batch_size": BATCH},
        "runs": {
            "IU": {"update": "incremental"},
            "SC": {"update": "incremental", "loss": {"self_correction": 0.5}},
            "MEM": {"update": "incremental", "memory": MEMORY},
            "combined": {
                "update": "incremental",
                "loss": {"self_correction": 0.2},  # not SC's: its ŷ_last must not stand in for SC's
                "memory": MEMORY,
                "combine": {"experts": EXPERTS, "hedge": {"eta": 0.05}},
            },
        },
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    cfg = parse_config(_raw(root))
    md = bootstrap(cfg, root / "md", "combined", log=lambda *_: None).path
    return {"cfg": cfg, "md": md, "frame": load_source(cfg.data).frame, "root": root}


def _fresh(world, tmp_path, **kw) -> tuple[TestClient, ModelDir]:
    dest = tmp_path / "md"
    shutil.copytree(world["md"], dest)
    return TestClient(create_app(dest, admin_token=TOKEN, **kw), headers=ADMIN), ModelDir(dest)


def _batch(world, period: int, i: int) -> tuple[list[dict], list[int]]:
    part = world["frame"].slice((period - 1) * ROWS + i * BATCH, BATCH)
    return part.select(COLS).to_dicts(), part["label"].to_list()


def _serve(client, recs, labels) -> tuple[list[str], list[float]]:
    r = client.post("/predict", json={"records": recs})
    assert r.status_code == 200, r.text
    ids = [p["impression_id"] for p in r.json()["predictions"]]
    ps = [p["p"] for p in r.json()["predictions"]]
    if labels is not None:
        fb = client.post("/feedback", json={"events": [{"impression_id": i, "label": y} for i, y in zip(ids, labels)]})
        assert fb.status_code == 200, fb.text
    return ids, ps


def _weights(client) -> dict[str, float]:
    r = client.get("/model")
    assert r.status_code == 200, r.text
    return {e["name"]: e["weight"] for e in r.json()["combine"]["experts"]}


def test_layout_and_model_view(world, tmp_path):
    """Bootstrap writes one chain per expert (version 1 = Θ0) and version 1 names them; /model shows
    the experts, their weights (the prior) and versions."""
    md = ModelDir(world["md"])
    assert md.meta(1)["experts"] == dict.fromkeys(EXPERTS, 1)
    for e in EXPERTS:
        ed = ExpertDir(md, e)
        assert ed.list_versions() == [1] and ed.meta(1)["composition"]["run"] == e
        assert torch.equal(ed.load_serving(1).head.weight, md.load_serving(1).head.weight)
    client, _ = _fresh(world, tmp_path)
    body = client.get("/model").json()
    assert [e["name"] for e in body["combine"]["experts"]] == NAMES
    assert [e["version"] for e in body["combine"]["experts"]] == [1, 1, 1, 1]
    assert _weights(client) == pytest.approx(dict.fromkeys(NAMES, 0.25), abs=1e-12)
    assert body["combine"]["experts"][3]["memory"] is not None and body["combine"]["experts"][1]["memory"] is None


def test_offline_and_online_serve_the_same_mixture(world, tmp_path):
    """Periods P+1 (Θ0 of every chain), P+2 and P+3 (after one and two retrains of every chain) served
    online through predict + feedback per batch give the mixture ``combine_served`` computes offline
    (float order aside). The first retrain is ``reloop.serve.retrain.retrain`` (the CLI's) + a reload, the
    second the server's own (``POST /admin/retrain?wait=true``: the scheduler, then the swap)."""
    torch.set_num_threads(1)
    cfg = world["cfg"]
    P = cfg.protocol.pretrain
    stream = prepare_stream(cfg.data, P).stream
    theta0, optim0 = pretrain(cfg, stream, 0)
    served: dict[str, torch.Tensor] = {}
    for name in NAMES:
        got: dict[str, torch.Tensor] = {}
        run_one(cfg, stream, name, cfg.runs[name], 0, theta0, optim0, stop_after=P + 2, served_out=got)
        served[name] = got["final"]
    _, hedge_off, offline = combine_served(
        cfg, stream, "combined", served, 0, cfg.runs["combined"].combine, last_period=P + 3
    )

    options = RetrainOptions(holdout=0.0, max_auc_drop=1.0)
    client, md = _fresh(world, tmp_path, retrain_options=options)
    online: list[float] = []
    for i in range(ROWS // BATCH):
        online += _serve(client, *_batch(world, P + 1, i))[1]
    result = retrain(md.path, options)
    assert result.outcome == "published", result
    assert {e: v["outcome"] for e, v in result.extra["experts"].items()} == dict.fromkeys(NAMES, "published")
    swap = client.post("/admin/reload")
    assert swap.status_code == 200 and swap.json()["swapped"], swap.text
    hosts = client.app.state.service.ensemble.hosts  # loaded by the swap itself, not by the next request
    assert {e: h.state.version for e, h in hosts.items()} == dict.fromkeys(EXPERTS, 2)
    assert [e["version"] for e in client.get("/model").json()["combine"]["experts"]] == [2, 2, 2, 2]
    for i in range(ROWS // BATCH):
        online += _serve(client, *_batch(world, P + 2, i))[1]
    r = client.post("/admin/retrain?wait=true")
    assert r.status_code == 200 and r.json()["outcome"] == "published", r.text
    assert [e["version"] for e in client.get("/model").json()["combine"]["experts"]] == [3, 3, 3, 3]
    for i in range(ROWS // BATCH):
        online += _serve(client, *_batch(world, P + 3, i))[1]

    start, end = stream.bounds[P][0], stream.bounds[P + 2][1]
    want = offline[start:end]
    assert not bool(torch.isnan(want).any())
    torch.testing.assert_close(torch.tensor(online), want, rtol=0, atol=2e-6)
    # the experts really differ (a mixture of identical experts would prove little) and weights moved
    later = slice(stream.bounds[P + 1][0], end)
    assert float((served["IU"][later] - served["MEM"][later]).abs().max()) > 1e-3
    assert float((served["SC"][later] - served["combined"][later]).abs().max()) > 1e-3
    weights = _weights(client)
    assert weights == pytest.approx(dict(zip(NAMES, hedge_off.weights.tolist())), abs=1e-9)
    assert max(weights.values()) - min(weights.values()) > 1e-3


def test_a_batch_never_sees_its_own_labels(world, tmp_path):
    """The mixture served for a batch is fixed at predict time: it equals the prior-weighted mixture of
    what the experts served, stays as logged after the batch's labels arrive, and two services that get
    opposite labels for it served it identically (they differ only on the next batch)."""
    P = world["cfg"].protocol.pretrain
    recs_a, labels_a = _batch(world, P + 1, 0)
    recs_b, _ = _batch(world, P + 1, 1)
    out = []
    for flip, sub in ((False, "x"), (True, "y")):
        client, md = _fresh(world, tmp_path / sub)
        labels = [1 - y for y in labels_a] if flip else labels_a
        ids_a, p_a = _serve(client, recs_a, labels)
        store = CombineLog(md.path / COMBINE_DB, NAMES)
        try:
            preds = store.preds(ids_a)["p_served"]  # [K, B]: what each expert served
            logged = store.mixture(ids_a)
        finally:
            store.close()
        prior_mix = preds.double().clamp(1e-6, 1 - 1e-6).mean(0)
        assert torch.allclose(torch.tensor(p_a, dtype=torch.float64), prior_mix, atol=1e-6)
        assert [logged[i] for i in ids_a] == [(p, 0) for p in p_a]  # unchanged by the labels
        slog = ServeLog(md.log_path)
        try:
            main = {r["id"]: r["p_served"] for r in slog.impressions(ids_a)}
            assert [main[i] for i in ids_a] == p_a
        finally:
            slog.close()
        _, p_b = _serve(client, recs_b, None)
        out.append((p_a, p_b))
    assert out[0][0] == out[1][0]
    assert max(abs(x - y) for x, y in zip(out[0][1], out[1][1])) > 1e-4


def test_weights_resume_exactly_after_a_restart(world, tmp_path):
    """A restarted service has the same weights and serves the same mixture; labels committed to the main
    log but never consumed by the weights (a kill between the two commits) are applied at start."""
    P = world["cfg"].protocol.pretrain
    client, md = _fresh(world, tmp_path / "a")
    for i in range(2):
        _serve(client, *_batch(world, P + 1, i))
    recs, labels = _batch(world, P + 1, 2)
    ids, _ = _serve(client, recs, None)
    before = _weights(client)
    client.app.state.service.close()

    client2 = TestClient(create_app(md.path, admin_token=TOKEN), headers=ADMIN)
    assert _weights(client2) == before  # exact
    # a "kill" after the main log's commit: labels reach log.sqlite3 only
    slog = ServeLog(md.log_path)
    slog.write_feedback(list(zip(ids, labels)))
    slog.close()
    client2.app.state.service.close()
    client3 = TestClient(create_app(md.path, admin_token=TOKEN), headers=ADMIN)
    replayed = _weights(client3)
    assert replayed != before

    # the reference: the same traffic, labels through /feedback
    ref, _ = _fresh(world, tmp_path / "b")
    for i in range(2):
        _serve(ref, *_batch(world, P + 1, i))
    _serve(ref, recs, labels)
    assert replayed == _weights(ref)
    nxt = _batch(world, P + 2, 0)[0]
    assert _serve(client3, nxt, None)[1] == _serve(ref, nxt, None)[1]


def test_bad_input_is_4xx_naming_the_field(world, tmp_path):
    client, _ = _fresh(world, tmp_path)
    recs, _ = _batch(world, 4, 0)
    bad = [dict(recs[0]), {**recs[1], "item_id": [1, 2]}]
    r = client.post("/predict", json={"records": bad})
    assert r.status_code == 422 and r.json()["field"] == "records[1].item_id", r.text
    r = client.post("/feedback", json={"events": [{"impression_id": "nope", "label": 1}]})
    assert r.status_code == 404, r.text
    r = client.post("/feedback", json={"events": [{"impression_id": "x", "label": 7}]})
    assert r.status_code == 422 and r.json()["field"].startswith("events[0]"), r.text
    for body in ({"records": []}, {"records": [{}]}, {"events": []}, {"records": [{"user_id": None}]}):
        for route in ("/predict", "/feedback"):
            r = client.post(route, json=body)
            assert r.status_code < 500, (route, body, r.text)
            if r.status_code >= 400:
                assert r.json().get("field"), r.text


def test_pick_run_names_a_bad_expert(world):
    raw = _raw(world["root"] / "x")
    raw["runs"]["a/b"] = raw["runs"].pop("IU")
    raw["runs"]["combined"]["combine"]["experts"] = ["a/b", "SC"]
    with pytest.raises(RegistryError, match=r"runs\.combined\.combine\.experts: 'a/b'"):
        pick_run(parse_config(raw), "combined")


def test_a_request_sees_one_set_across_a_swap(world, tmp_path):
    """Every expert prediction of a request comes from the set its top-level version names: while a new
    version's experts are loaded (before the swap) requests still get the old set, after it the new one."""
    P = world["cfg"].protocol.pretrain
    client, md = _fresh(world, tmp_path, poll_interval=3600.0)  # swaps only on /admin/reload
    for i in range(ROWS // BATCH):
        _serve(client, *_batch(world, P + 1, i))
    assert retrain(md.path, RetrainOptions(holdout=0.0, max_auc_drop=1.0)).outcome == "published"
    service = client.app.state.service
    service.ensemble.prepare(Serving(2, md.load_serving(2), md.meta(2)))  # the experts of v2, loaded
    assert {e: h.state.version for e, h in service.ensemble.hosts.items()} == dict.fromkeys(EXPERTS, 2)

    def versions(ids: list[str]) -> set[tuple[int, ...]]:
        store = CombineLog(md.path / COMBINE_DB, NAMES)
        try:
            v = store.preds(ids)["version"]
        finally:
            store.close()
        return {tuple(col) for col in v.T.tolist()}

    recs = _batch(world, P + 2, 0)[0]
    r = client.post("/predict", json={"records": recs})
    assert r.json()["model_version"] == 1
    assert versions([p["impression_id"] for p in r.json()["predictions"]]) == {(1, 1, 1, 1)}
    assert client.post("/admin/reload").json()["swapped"]
    r = client.post("/predict", json={"records": recs})
    assert r.json()["model_version"] == 2
    assert versions([p["impression_id"] for p in r.json()["predictions"]]) == {(2, 2, 2, 2)}


@pytest.mark.slow
def test_weights_survive_kill_9_mid_traffic(world, tmp_path):
    """A server of a combine run killed with SIGKILL mid-traffic: after a restart every acknowledged label
    has been consumed by the weights, and the weights are exactly those of replaying, in order, every Hedge
    update recorded in ``combine.sqlite3`` (then the labels it missed, as one update)."""
    import os
    import signal
    import threading
    import time

    import httpx

    from reloop.serve.replay import start_server

    dest = tmp_path / "md"
    shutil.copytree(world["md"], dest)
    P = world["cfg"].protocol.pretrain
    acked: dict[str, int] = {}
    server = start_server(dest, log_path=tmp_path / "server.log")
    stop = threading.Event()

    def load() -> None:
        k = 0
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not stop.is_set():
                recs, labels = _batch(world, P + 1 + (k // 3) % 4, k % 3)
                k += 1
                try:
                    r = c.post("/predict", json={"records": recs[:20]})
                    if r.status_code != 200:
                        continue
                    ids = [p["impression_id"] for p in r.json()["predictions"]]
                    events = [{"impression_id": i, "label": y} for i, y in zip(ids, labels)]
                    if c.post("/feedback", json={"events": events}).status_code == 200:
                        acked.update({e["impression_id"]: e["label"] for e in events})
                except httpx.HTTPError:
                    return

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(2.0)
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    stop.set()
    worker.join(10)
    server.stop()
    assert len(acked) >= 40

    client = TestClient(create_app(dest, admin_token=TOKEN), headers=ADMIN)
    weights = _weights(client)
    client.app.state.service.close()
    store = CombineLog(dest / COMBINE_DB, NAMES)
    try:
        rows = store.conn.execute("SELECT id, label, batch FROM labels ORDER BY seq").fetchall()
        assert {i for i, _, _ in rows} >= set(acked)  # every acknowledged label reached the weights
        hedge = world["cfg"].runs["combined"].combine.build(NAMES)
        for b in sorted({r[2] for r in rows}):
            part = [(i, y) for i, y, bb in rows if bb == b]
            probs = store.preds([i for i, _ in part])["p_served"]
            hedge.update(probs, torch.tensor([float(y) for _, y in part]))
    finally:
        store.close()
    assert weights == dict(zip(NAMES, hedge.weights.tolist()))


def test_restart_with_a_config_that_changes_an_expert_is_refused(world):
    """``reloop serve --config`` on a bootstrapped combine directory: an expert's composition is part of
    what must match (its chain was built with it), like the run's own."""
    from reloop.serve.cli import _compatible

    raw = _raw(world["root"])
    assert _compatible(world["cfg"], parse_config(raw), "combined") == []
    raw["runs"]["SC"]["loss"] = {"self_correction": 0.9}
    assert _compatible(world["cfg"], parse_config(raw), "combined") == ["runs.SC"]


def test_rejected_chains_keep_their_versions(world, tmp_path, monkeypatch):
    """Every chain is validated alone: when the run's own candidate is rejected and the experts' are not,
    a new top-level version re-publishes its models unchanged with the new experts; when all are rejected
    nothing is published and the period closes."""
    import reloop.serve.retrain as rt

    P = world["cfg"].protocol.pretrain
    client, md = _fresh(world, tmp_path, poll_interval=3600.0)
    for i in range(ROWS // BATCH):
        _serve(client, *_batch(world, P + 1, i))
    real = rt._train_chain

    def own_rejected(p, chain_md, run, version, served):
        chain = real(p, chain_md, run, version, served)
        return rt._Chain("rejected", "forced") if run == "combined" else chain

    monkeypatch.setattr(rt, "_train_chain", own_rejected)
    result = retrain(md.path, RetrainOptions(holdout=0.0, max_auc_drop=1.0))
    assert result.outcome == "published" and result.version == 2, result
    meta = md.meta(2)
    assert meta["experts"] == dict.fromkeys(EXPERTS, 2) and meta["trained_through"] == P
    assert meta["set_through"] == P + 1
    assert torch.equal(md.load_serving(2).head.weight, md.load_serving(1).head.weight)
    assert client.post("/admin/reload").json()["swapped"]
    assert [e["version"] for e in client.get("/model").json()["combine"]["experts"]] == [2, 2, 2, 2]

    monkeypatch.setattr(rt, "_train_chain", real)
    for i in range(ROWS // BATCH):
        _serve(client, *_batch(world, P + 2, i))
    result = retrain(md.path, RetrainOptions(holdout=0.5, max_auc_drop=-1.0))  # every candidate "worse"
    assert result.outcome == "rejected" and result.version == 2, result
    assert {e["outcome"] for e in result.extra["experts"].values()} == {"rejected"}
    assert md.current_version() == 2 and ServeLog(md.log_path).current_period() == P + 3


def test_a_replica_expert_is_its_run_from_the_next_seeds_theta0_offline_and_online(tmp_path):
    """``combine.replicas: {IU: 1}`` adds the expert ``IU.r1``: IU trained from seed 1's Θ0 with seed 1's
    random stream. Offline, ``run_seed`` serves exactly what ``run_one`` of IU under seed 1 serves; online,
    bootstrap gives its chain seed 1's Θ0 and a retrain continues it as offline, and the served mixture
    over P+1 and P+2 equals ``combine_served``'s (fails if the replica shares seed 0's Θ0 or its random
    stream, online or offline)."""
    from reloop.config import experts_of
    from reloop.protocol import runner

    torch.set_num_threads(1)
    raw = _raw(tmp_path)
    raw["runs"]["combined"]["combine"]["replicas"] = {"IU": 1}
    cfg = parse_config(raw)
    names = experts_of(cfg, "combined")
    assert names == [*NAMES, "IU.r1"]
    P = cfg.protocol.pretrain
    stream = prepare_stream(cfg.data, P).stream

    # offline: run_seed trains the replica as IU under seed 1
    captured: dict[str, torch.Tensor] = {}
    original = runner.run_one

    def spy(cfg_, stream_, name, spec, seed, *a, served_out=None, **kw):
        out = original(cfg_, stream_, name, spec, seed, *a, served_out=served_out, **kw)
        captured[f"{name}@{seed}"] = served_out["final"].clone()
        return out

    theta0, optim0 = pretrain(cfg, stream, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "run_one", spy)
        rows = runner.run_seed(cfg, stream, 0, theta0, optim0)
    assert set(captured) == {"IU@0", "SC@0", "MEM@0", "combined@0", "IU.r1@1"}
    assert not any(r["run"] == "IU.r1" for r in rows)  # internal to the mixture: no rows of its own
    assert "IU.r1" in rows[-1]["weights"]
    theta1, optim1 = pretrain(cfg, stream, 1)
    alone: dict[str, torch.Tensor] = {}
    run_one(cfg, stream, "IU", cfg.runs["IU"], 1, theta1, optim1, served_out=alone)
    torch.testing.assert_close(captured["IU.r1@1"], alone["final"], rtol=0, atol=0, equal_nan=True)
    assert float((captured["IU.r1@1"] - captured["IU@0"]).nan_to_num().abs().max()) > 1e-3

    # online: the replica's chain starts from seed 1's Θ0, and the mixture is the offline one
    md_path = bootstrap(cfg, tmp_path / "md", "combined", log=lambda *_: None).path
    md = ModelDir(md_path)
    assert md.meta(1)["experts"] == dict.fromkeys(names[1:], 1)
    replica = ExpertDir(md, "IU.r1")
    assert replica.meta(1)["composition"]["seed_offset"] == 1
    assert torch.equal(replica.load_serving(1).head.weight, theta1.head.weight)
    assert not torch.equal(replica.load_serving(1).head.weight, md.load_serving(1).head.weight)
    served = {n: captured[f"{n}@0"] for n in NAMES} | {"IU.r1": captured["IU.r1@1"]}
    _, _, offline = combine_served(cfg, stream, "combined", served, 0, cfg.runs["combined"].combine, last_period=P + 2)
    options = RetrainOptions(holdout=0.0, max_auc_drop=1.0)
    client = TestClient(create_app(md_path, admin_token=TOKEN, retrain_options=options), headers=ADMIN)
    frame = load_source(cfg.data).frame
    world = {"frame": frame}
    online: list[float] = []
    for i in range(ROWS // BATCH):
        online += _serve(client, *_batch(world, P + 1, i))[1]
    result = retrain(md_path, options)
    assert result.outcome == "published", result
    assert client.post("/admin/reload").json()["swapped"]
    for i in range(ROWS // BATCH):
        online += _serve(client, *_batch(world, P + 2, i))[1]
    start, end = stream.bounds[P][0], stream.bounds[P + 1][1]
    torch.testing.assert_close(torch.tensor(online), offline[start:end], rtol=0, atol=2e-6)


def test_replicas_are_checked_naming_the_field(tmp_path):
    from reloop.errors import ConfigError

    for replicas, match in (
        ({"nope": 1}, r"runs\.combined\.combine\.replicas: 'nope' is not a run"),
        ({"IU": 0}, r"runs\.combined\.combine\.replicas"),
        ({"IU": 9}, r"runs\.combined\.combine\.replicas"),
    ):
        raw = _raw(tmp_path)
        raw["runs"]["combined"]["combine"]["replicas"] = replicas
        with pytest.raises(ConfigError, match=match):
            parse_config(raw)
    raw = _raw(tmp_path)
    raw["runs"]["IU.r1"] = {"update": "incremental"}
    raw["runs"]["combined"]["combine"]["replicas"] = {"IU": 1}
    with pytest.raises(ConfigError, match=r"runs\.combined\.combine\.replicas: 'IU.r1'"):
        parse_config(raw)
