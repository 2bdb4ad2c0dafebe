"""Load benchmark of ``reloop serve``: one JSON object per line.

    python benchmarks/serve_load.py [--concurrency 8] [--requests-b1 2000] [--requests-b256 100]
                                    [--swap-seconds 6] [--out DIR]

Bootstraps two model directories from a synthetic config (DeepFM; run ``IU`` without and ``IU+mem``
with the LSH-sketch error memory), starts each as a real ``reloop serve`` subprocess on loopback and
drives it with a bounded asyncio httpx client (``--concurrency`` requests in flight):

* ``predict`` batch 1 and batch 256, ``feedback`` batch 1 and batch 256 (feedback for the impressions
  just predicted, with their true labels): requests/s, rows/s, p50/p99 latency, failed requests;
* ``swap``: predict + feedback traffic while ``retrain`` runs in this process (as ``reloop retrain``
  would, next to the server) and publishes a new version that the server hot-swaps by polling
  ``CURRENT``: failed_requests must be 0; ``versions_seen`` shows the swap happened under load.

Every ``predict`` line also has ``raw_rows_per_s``: the same version's bare model scoring the same
records, already encoded, at the same batch size, in this process with one torch thread (the server's
``--torch-threads`` default) just before the server starts, and ``ratio_to_raw`` = raw_rows_per_s /
rows_per_s (how much the service costs over the model itself, measured in the same invocation).

With the memory, every scenario also reports ``wrong_keys``: impressions of that scenario (predicted,
or labelled by its feedback) whose logged memory key differs from the key of that record computed
alone with the version that served it (read back from the log). It must be 0; a key caught from a
shared layer mixed concurrent requests up (3.5% of the keys, with 0 failed requests).

Every acknowledged request is a durable SQLite commit (WAL, synchronous=FULL), so the figures include
an fsync per request. Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import yaml

from reloop.components import memory_key
from reloop.config import load_config
from reloop.data.sources import load_source
from reloop.serve.log import RowCodec
from reloop.serve.registry import ModelDir, bootstrap
from reloop.serve.replay import start_server
from reloop.serve.retrain import RetrainOptions, retrain

CONFIG = {
    "data": {
        "source": "synthetic",
        "synthetic": {"users": 2000, "items": 1000, "rows_per_period": 4000, "periods": 8, "seed": 0},
        "periods": {"count": 8, "by": "rows"},
    },
    "model": {"name": "deepfm", "embedding_dim": 16, "hidden_units": [64, 32]},
    "train": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 256, "lr": 0.001},
    "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0]},
    "runs": {
        "IU": {"update": "incremental"},
        "IU+mem": {"update": "incremental", "memory": {"sketch": {"arrays": 64, "bits": 8}, "lambda": 0.5}},
    },
}


def _summary(
    name: str, batch: int, memory: bool, lat: list[float], failed: int, seconds: float, concurrency: int, **extra
) -> dict:
    arr = np.asarray(lat) * 1000 if lat else np.asarray([np.nan])
    n = len(lat) + failed
    return {
        "scenario": name,
        "batch": batch,
        "memory": memory,
        "requests": n,
        "concurrency": concurrency,
        "rps": round(n / seconds, 1),
        "rows_per_s": round(len(lat) * batch / seconds, 1),
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "failed": failed,
        **extra,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU per request of the server process and of this client process over one scenario: on a
    shared host these move less with the load than wall-clock rates do."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server, self.client = cpu_seconds(pid), time.process_time()

    def per_request(self, n: int) -> dict:
        server, client = cpu_seconds(self.pid) - self.server, time.process_time() - self.client
        n = max(n, 1)
        return {"server_cpu_us": round(server / n * 1e6, 1), "client_cpu_us": round(client / n * 1e6, 1)}


def wrong_keys(md: Path, ids: list[str]) -> int:
    """Impressions among ``ids`` whose logged key differs from the key of that record scored alone by
    the version that served it (the log is read through a read-only connection)."""
    import torch

    mdir = ModelDir(md)
    cfg, info = mdir.config(), mdir.info()
    key = memory_key(cfg.runs[info["run"]].memory)
    codec = RowCodec(mdir.feature_map(), with_user=info.get("user") is not None)
    conn = sqlite3.connect(f"file:{mdir.log_path}?mode=ro", uri=True)
    rows = []
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        rows += conn.execute(
            f"SELECT features, h, model_version FROM impressions WHERE id IN ({','.join('?' * len(chunk))})", chunk
        ).fetchall()
    conn.close()
    if len(rows) != len(set(ids)):
        raise RuntimeError(f"{len(set(ids)) - len(rows)} acknowledged impressions are missing from the log")
    models: dict[int, object] = {}
    wrong = 0
    with torch.no_grad():
        for features, h, version in rows:
            if version not in models:
                models[version] = mdir.load_serving(version)
            _, alone = models[version].forward_key(codec.decode([features]), key)
            wrong += alone.float().numpy().tobytes() != h
    return wrong


def _ids(responses: list) -> list[str]:
    return [p["impression_id"] for r in responses if r for p in r["predictions"]]


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just what the benchmark needs (POST/GET with a
    ``Content-Length`` body). A light client: httpx spent ~2.9 ms of CPU per request (measured with
    ``serve_profile.py``), more than the server, on the same 2 cores; this one spends ~0.1 ms."""

    def __init__(self, url: str) -> None:
        u = httpx.URL(url)
        self.host, self.port = u.host, u.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(
                b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % (method.encode(), path.encode(), self.host.encode(), len(body))
                + body
            )
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return status, await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            raise

    async def post(self, path: str, obj: dict) -> tuple[int, dict | None]:
        status, data = await self.request("POST", path, json.dumps(obj).encode())
        return status, json.loads(data) if status == 200 else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _drive(url: str, path: str, bodies: list[dict], concurrency: int) -> tuple[list[float], int, float, list]:
    """Send ``bodies`` over ``concurrency`` keep-alive connections, one request in flight on each;
    latencies, failures, wall time, responses (bodies are JSON-encoded before the clock starts)."""
    lat: list[float] = []
    failed = 0
    out: list = [None] * len(bodies)
    raw = [json.dumps(b).encode() for b in bodies]
    todo = iter(range(len(bodies)))

    async def worker() -> None:
        nonlocal failed
        conn = Connection(url)
        for i in todo:
            t0 = time.perf_counter()
            try:
                status, data = await conn.request("POST", path, raw[i])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                failed += 1
                continue
            if status != 200:
                failed += 1
                continue
            lat.append(time.perf_counter() - t0)
            out[i] = json.loads(data)
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, failed, time.perf_counter() - start, out


async def _swap_phase(
    url: str, records: list[dict], labels: list[int], concurrency: int, seconds: float, md: Path
) -> dict:
    """Mixed predict(1)/feedback(1) traffic; a retrain publishes mid-way; the server swaps by polling."""
    lat: list[float] = []
    failed = 0
    versions: dict[int, int] = {}
    impressions: list[str] = []
    result: dict = {}
    publish_at: list[float] = []
    first_new: list[float] = []

    def do_retrain() -> None:
        r = retrain(md, RetrainOptions(max_auc_drop=1.0, holdout=0.1, label_timeout=None))
        result.update(r.to_dict())
        publish_at.append(time.perf_counter())

    start = time.perf_counter()
    stop_at = [start + seconds]

    async def worker(w: int) -> None:
        nonlocal failed
        k = w
        client = Connection(url)
        while time.perf_counter() < stop_at[0]:
            i = k % len(records)
            k += concurrency
            t0 = time.perf_counter()
            try:
                status, body = await client.post("/predict", {"records": [records[i]]})
                if status != 200 or body is None:
                    failed += 1
                    continue
                lat.append(time.perf_counter() - t0)
                impressions.append(body["predictions"][0]["impression_id"])
                v = body["model_version"]
                versions[v] = versions.get(v, 0) + 1
                if publish_at and v == result.get("version") and not first_new:
                    first_new.append(time.perf_counter())
                t0 = time.perf_counter()
                status, _ = await client.post(
                    "/feedback",
                    {"events": [{"impression_id": body["predictions"][0]["impression_id"], "label": labels[i]}]},
                )
                if status != 200:
                    failed += 1
                    continue
                lat.append(time.perf_counter() - t0)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                failed += 1
        client.close()

    async def trigger() -> None:
        await asyncio.sleep(min(1.0, seconds / 4))
        th = threading.Thread(target=do_retrain)
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.05)
        stop_at[0] = max(stop_at[0], time.perf_counter() + 2.0)  # keep the load on after the swap

    await asyncio.gather(trigger(), *(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - start
    swap_delay = (first_new[0] - publish_at[0]) if first_new and publish_at else None
    return {
        "lat": lat,
        "failed": failed,
        "wall": wall,
        "impressions": impressions,
        "versions_seen": {str(k): v for k, v in sorted(versions.items())},
        "retrain": {k: result.get(k) for k in ("outcome", "version", "n_train", "seconds")},
        "swap_delay_s": None if swap_delay is None else round(swap_delay, 3),
    }


def raw_rows_per_s(md: Path, records: list[dict], batch: int, n: int) -> float:
    """Rows/s of the serving model alone (encoded inputs, ``inference_mode``, one thread): the service's floor."""
    import torch

    mdir = ModelDir(md)
    model = mdir.load_serving(mdir.current_version()).eval()
    encoder = mdir.encoder()
    names = [f.name for f in encoder.schema.features]
    rows = [records[(i * batch) % (len(records) - batch) :][:batch] for i in range(n)]
    # unseen ids score as out-of-vocabulary (the service would add them; encoding is not timed here)
    inputs = [
        encoder.transform(
            pl.DataFrame(chunk).select(names).with_columns(pl.lit(0).alias(encoder.schema.label)), grow=False
        )
        for chunk in rows
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for x in inputs[:20]:
                model(x)  # warm-up
            t0 = time.perf_counter()
            for x in inputs:
                model(x)
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return len(inputs) * batch / seconds


def bench_variant(md: Path, memory: bool, records: list[dict], labels: list[int], args, emit) -> None:
    raw1 = raw_rows_per_s(md, records, 1, args.requests_b1)
    raw256 = raw_rows_per_s(md, records, 256, args.requests_b256)

    def versus_raw(line: dict, raw: float) -> dict:
        line["raw_rows_per_s"] = round(raw, 1)
        line["ratio_to_raw"] = round(raw / line["rows_per_s"], 2) if line["rows_per_s"] else None
        return line

    server = start_server(md, args=["--poll-interval", "0.5"], log_path=md / "server.log")
    try:
        c, cf = args.concurrency, args.feedback_concurrency or args.concurrency
        all_ids: list[str] = []

        def checked(ids: list[str]) -> dict:
            """``wrong_keys`` of these impressions (scenarios with the memory only)."""
            all_ids.extend(ids)
            return {"wrong_keys": wrong_keys(md, ids)} if memory else {}

        # warm-up (first-call costs: polars, torch kernels, SQLite pages)
        asyncio.run(_drive(server.url, "/predict", [{"records": records[:256]}] * 4, 2))
        n1, n256 = args.requests_b1, args.requests_b256
        bodies = [{"records": [records[i % len(records)]]} for i in range(n1)]
        meter = CpuMeter(server.pid)
        lat, failed, wall, resp1 = asyncio.run(_drive(server.url, "/predict", bodies, c))
        cpu = meter.per_request(len(bodies))
        emit(versus_raw(_summary("predict", 1, memory, lat, failed, wall, c, **cpu, **checked(_ids(resp1))), raw1))
        bodies = [{"records": records[(i * 256) % (len(records) - 256) :][:256]} for i in range(n256)]
        meter = CpuMeter(server.pid)
        lat, failed, wall, resp256 = asyncio.run(_drive(server.url, "/predict", bodies, c))
        cpu = meter.per_request(len(bodies))
        emit(
            versus_raw(_summary("predict", 256, memory, lat, failed, wall, c, **cpu, **checked(_ids(resp256))), raw256)
        )
        fb1 = [
            {"events": [{"impression_id": r["predictions"][0]["impression_id"], "label": labels[i % len(labels)]}]}
            for i, r in enumerate(resp1)
            if r
        ]
        meter = CpuMeter(server.pid)
        lat, failed, wall, done = asyncio.run(_drive(server.url, "/feedback", fb1, cf))
        cpu = meter.per_request(len(fb1))
        labelled = [e["impression_id"] for b, r in zip(fb1, done) if r for e in b["events"]]
        emit(_summary("feedback", 1, memory, lat, failed, wall, cf, **cpu, **checked(labelled)))
        fb256 = []
        for i, r in enumerate(resp256):
            if not r:
                continue
            off = (i * 256) % (len(records) - 256)
            fb256.append(
                {
                    "events": [
                        {"impression_id": p["impression_id"], "label": labels[off + j]}
                        for j, p in enumerate(r["predictions"])
                    ]
                }
            )
        meter = CpuMeter(server.pid)
        lat, failed, wall, done = asyncio.run(_drive(server.url, "/feedback", fb256, c))
        cpu = meter.per_request(len(fb256))
        labelled = [e["impression_id"] for b, r in zip(fb256, done) if r for e in b["events"]]
        emit(_summary("feedback", 256, memory, lat, failed, wall, c, **cpu, **checked(labelled)))
        swap = asyncio.run(_swap_phase(server.url, records, labels, c, args.swap_seconds, md))
        emit(
            _summary(
                "swap (predict 1 + feedback 1, retrain + hot swap mid-run)",
                1,
                memory,
                swap["lat"],
                swap["failed"],
                swap["wall"],
                c,
                versions_seen=swap["versions_seen"],
                retrain=swap["retrain"],
                swap_delay_s=swap["swap_delay_s"],
                **checked(swap["impressions"]),
            )
        )
        metrics = httpx.get(server.url + "/metrics").text
        mem_line = next((line for line in metrics.splitlines() if line.startswith("reloop_memory_bytes ")), "")
        if memory:
            emit(
                {
                    "scenario": "memory",
                    "memory": True,
                    "nbytes": float(mem_line.split()[-1]) if mem_line else None,
                    "impressions_checked": len(set(all_ids)),
                    "wrong_keys": wrong_keys(md, sorted(set(all_ids))),
                }
            )
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--feedback-concurrency",
        type=int,
        default=None,
        help="requests in flight for feedback at batch 1 (default: --concurrency)",
    )
    ap.add_argument("--requests-b1", type=int, default=2000)
    ap.add_argument("--requests-b256", type=int, default=100)
    ap.add_argument("--swap-seconds", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="reloop-serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = json.loads(json.dumps(CONFIG))
    raw["data"]["cache"] = str(work / "cache")
    (work / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(work / "config.yaml")

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    try:
        frame = load_source(cfg.data).frame
        P, R = cfg.protocol.pretrain, raw["data"]["synthetic"]["rows_per_period"]
        served = frame.slice(P * R, 2 * R)
        records = served.select(["user_id", "item_id", "item_cat", "hour"]).to_dicts()
        labels = served["label"].to_list()
        for run, memory in (("IU", False), ("IU+mem", True)):
            md = work / ("md-mem" if memory else "md")
            if md.exists():
                shutil.rmtree(md)
            bootstrap(cfg, md, run, log=lambda m: print(m, file=sys.stderr))
            bench_variant(md, memory, records, labels, args, emit)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
