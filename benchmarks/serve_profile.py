"""Where a request's CPU time goes in ``reloop serve``: one JSON object per line.

    python benchmarks/serve_profile.py [--path /predict] [--batch 1] [--requests 2000] [--concurrency 8]
                                       [--memory]

Bootstraps a model directory from ``serve_load.py``'s synthetic config, runs the app in this process
under uvicorn (the same app ``reloop serve`` runs, one worker), profiles every thread with yappi (CPU
clock) and drives it from a client subprocess (``serve_load.py``'s client). Prints:

* ``{"stage": ..., "us_per_request": ...}`` — the server's CPU time per request by where it is spent
  (self time grouped by package: the HTTP parser, the ASGI framework, the guard, JSON, validation,
  record parsing, encoding, the model, the error memory, the log, ...);
* ``{"total_server_us": ..., "client_us": ..., "wall_per_request_us": ...}`` — the server's and the
  client's CPU per request (the client's while it sends) and wall time per request;
* the 25 functions with the most self time.

yappi is a profiling tool, not a dependency of reloop: ``pip install yappi`` to run this script.
Profiling slows the server down (roughly 1.5-2x); read the shares, not the absolute speed
(``serve_load.py`` measures speed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve_load  # noqa: E402 - the benchmark's config and client

BUCKETS = [
    ("http: uvicorn (h11 or httptools)", ("/h11/", "/uvicorn/", "/httptools/")),
    ("asgi: starlette + fastapi", ("/starlette/", "/fastapi/")),
    ("validation: pydantic", ("/pydantic/", "/pydantic_core/")),
    ("threadpool: anyio", ("/anyio/",)),
    ("event loop: asyncio", ("/asyncio/", "selectors.py", "/concurrent/", "threading.py", "queue.py")),
    ("json", ("/json/",)),
    ("guard (body, JSON checks)", ("reloop/serve/guard.py",)),
    ("log (SQLite)", ("reloop/serve/log.py", "sqlite3")),
    ("records (value rules)", ("reloop/serve/records.py", "reloop/data/values.py")),
    ("encode (vocabularies)", ("reloop/serve/online.py", "reloop/data/encode.py")),
    ("model forward", ("reloop/models/", "/torch/")),
    ("error memory", ("reloop/memory/",)),
    ("host (score, locks)", ("reloop/serve/host.py",)),
    ("service (predict/feedback glue)", ("reloop/serve/service.py", "reloop/serve/app.py")),
    ("metrics", ("prometheus_client", "reloop/serve/metrics.py")),
    ("uuid", ("uuid.py",)),
    ("numpy", ("/numpy/",)),
]


def bucket(path: str) -> str:
    for name, keys in BUCKETS:
        if any(k in path for k in keys):
            return name
    return "other"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_main(args) -> None:
    bodies = json.loads(Path(args.bodies).read_text())
    cpu = time.process_time()
    lat, failed, wall, _ = asyncio.run(serve_load._drive(args.url, args.path, bodies, args.concurrency))
    print(json.dumps({"n": len(lat), "failed": failed, "wall": wall, "cpu": time.process_time() - cpu}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="/predict", choices=["/predict", "/feedback"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--memory", action="store_true", help="the run with the LSH-sketch error memory")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--url", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bodies", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        client_main(args)
        return

    import uvicorn
    import yaml
    import yappi

    from reloop.config import load_config
    from reloop.data.sources import load_source
    from reloop.serve.app import create_app
    from reloop.serve.registry import bootstrap

    work = Path(tempfile.mkdtemp(prefix="reloop-serve-profile-"))
    try:
        raw = json.loads(json.dumps(serve_load.CONFIG))
        raw["data"]["cache"] = str(work / "cache")
        (work / "config.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_config(work / "config.yaml")
        frame = load_source(cfg.data).frame
        P, R = cfg.protocol.pretrain, raw["data"]["synthetic"]["rows_per_period"]
        served = frame.slice(P * R, 2 * R)
        records = served.select(["user_id", "item_id", "item_cat", "hour"]).to_dicts()
        labels = served["label"].to_list()
        md = work / "md"
        bootstrap(cfg, md, "IU+mem" if args.memory else "IU", log=lambda m: print(m, file=sys.stderr))

        app = create_app(md)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        b = args.batch
        predict = [{"records": [records[(i * b + j) % len(records)] for j in range(b)]} for i in range(args.requests)]
        if args.path == "/feedback":
            # impressions to label first (not profiled)
            _, _, _, out = asyncio.run(serve_load._drive(url, "/predict", predict, args.concurrency))
            bodies = [
                {
                    "events": [
                        {"impression_id": p["impression_id"], "label": labels[(i * b + j) % len(labels)]}
                        for j, p in enumerate(r["predictions"])
                    ]
                }
                for i, r in enumerate(out)
                if r
            ]
        else:
            asyncio.run(serve_load._drive(url, "/predict", predict[:200], args.concurrency))  # warm-up
            bodies = predict
        (work / "bodies.json").write_text(json.dumps(bodies))

        yappi.set_clock_type("cpu")
        yappi.start(builtins=False, profile_threads=True)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--client", "1", "--url", url, "--path", args.path]
            + ["--bodies", str(work / "bodies.json"), "--concurrency", str(args.concurrency)],
            stdout=subprocess.PIPE,
        )
        proc.wait()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        yappi.stop()
        client = json.loads(proc.stdout.read() if proc.stdout else "{}")
        n = max(1, client.get("n", 0) + client.get("failed", 0))
        stats = yappi.get_func_stats()
        per: dict[str, float] = {}
        rows = []
        for s in stats:
            per[bucket(s.module)] = per.get(bucket(s.module), 0.0) + s.tsub
            rows.append((s.tsub, s.ttot, s.ncall, f"{Path(s.module).name}:{s.lineno} {s.name}"))
        total = sum(per.values())
        common = {"path": args.path, "batch": b, "memory": args.memory, "concurrency": args.concurrency}
        for name, sec in sorted(per.items(), key=lambda kv: -kv[1]):
            print(
                json.dumps(
                    {
                        **common,
                        "stage": name,
                        "us_per_request": round(sec / n * 1e6, 1),
                        "share": round(sec / total, 3),
                    }
                )
            )
        print(
            json.dumps(
                {
                    **common,
                    "requests": n,
                    "failed": client.get("failed"),
                    "total_server_us": round(total / n * 1e6, 1),
                    "server_process_cpu_us": round(cpu / n * 1e6, 1),
                    "client_us": round(client.get("cpu", 0.0) / n * 1e6, 1),
                    "wall_per_request_us": round(wall / n * 1e6, 1),
                }
            )
        )
        for tsub, _ttot, ncall, name in sorted(rows, reverse=True)[: args.top]:
            print(json.dumps({"function": name, "self_us": round(tsub / n * 1e6, 1), "calls": ncall}))
        server.should_exit = True
        th.join(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
