"""``reloop serve --demo``: the live loop, end to end, on the embedded synthetic drifting stream.

1. Bootstrap ``OUT/model`` from the demo config (prepare the stream, pretrain Θ0 = version 1).
2. Start ``reloop serve`` on it as a subprocess on a free loopback port.
3. Replay the served periods over HTTP, in time order, batch by batch: ``POST /predict`` with the
   raw records, then ``POST /feedback`` with their labels (prequential: a batch's labels arrive after
   its predictions). After each period, ``retrain`` (as ``reloop retrain`` would) and wait for the
   server to hot-swap the published version (it polls ``CURRENT``).
4. Score the same records locally with the frozen Θ0 and write ``OUT/live.json`` (``live_auc``,
   ``frozen_auc``, ``requests``, ``failed_requests``, per-period figures) and ``OUT/live.png``
   (rolling AUC of the live loop vs the frozen model).

:func:`start_server` (a ``reloop serve`` subprocess on a free port) is shared with the tests and the
load benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A ``python -m reloop.serve.cli serve`` subprocess on loopback.

    It gets a fresh random admin token (``RELOOP_ADMIN_TOKEN``, unless ``env`` sets one);
    ``admin_headers`` carries it for ``/admin/*`` calls.
    """

    def __init__(
        self,
        model_dir: str | Path,
        port: int | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        import secrets

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RELOOP_ADMIN_TOKEN": secrets.token_hex(16), **(env or {})}
        self.admin_headers = {"authorization": f"Bearer {env['RELOOP_ADMIN_TOKEN']}"}
        cmd = [
            sys.executable,
            "-m",
            "reloop.serve.cli",
            "serve",
            "--model-dir",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(args or []),
        ]
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server on {self.url} not ready after {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    model_dir: str | Path, args: list[str] | None = None, timeout: float = 60.0, log_path: str | Path | None = None
) -> ServerProcess:
    server = ServerProcess(model_dir, args=args, log_path=log_path)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def rolling_auc(labels: np.ndarray, scores: np.ndarray, window: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """AUC over the ``window`` rows ending at every ``step``-th row (x = rows seen)."""
    from reloop.protocol.metrics import auc

    xs, ys = [], []
    for end in range(window, len(labels) + 1, step):
        xs.append(end)
        ys.append(auc(labels[end - window : end], scores[end - window : end]))
    return np.asarray(xs), np.asarray(ys)


def _wait_version(client, version: int, timeout: float = 30.0, headers: dict[str, str] | None = None) -> int:
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        seen = client.get("/model").json()["model_version"]
        if seen == version:
            return seen
        time.sleep(0.1)
    # the poll did not see it: force it
    return client.post("/admin/reload", headers=headers).json().get("model_version", seen)


def run_demo(
    out: str | Path,
    run: str | None = None,
    periods: int | None = None,
    options=None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    batch: int = 256,
    log=None,
) -> dict[str, Any]:
    """Replay the demo stream through a live server (see the module docstring); returns live.json."""
    import httpx
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from reloop.config import demo_config_path, load_config
    from reloop.data.encode import EncoderConfig
    from reloop.data.prepare import prepare_stream
    from reloop.data.sources import load_source
    from reloop.protocol.metrics import auc
    from reloop.serve.registry import bootstrap, is_ours
    from reloop.serve.retrain import RetrainOptions, retrain
    from reloop.update.trainer import predict_rows

    log = log or logging.getLogger("reloop.serve").info
    t_start = time.perf_counter()
    cfg = load_config(config or demo_config_path(), overrides or [])
    run = run or ("IU" if "IU" in cfg.runs else next(iter(cfg.runs)))
    options = options or RetrainOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    if model_dir.exists() and any(model_dir.iterdir()):
        if not all(is_ours(p.name) for p in model_dir.iterdir()):
            raise RuntimeError(f"{model_dir} exists and is not a reloop model directory; choose another --out")
        shutil.rmtree(model_dir)  # the demo owns OUT/model: every demo starts from Θ0
    log(f"demo: bootstrapping {model_dir} (run {run})")
    md = bootstrap(cfg, model_dir, run, log=log)
    P = cfg.protocol.pretrain
    prepared = prepare_stream(cfg.data, P, EncoderConfig(**cfg.encoder.model_dump()))
    stream = prepared.stream
    frame = load_source(cfg.data).frame
    schema = md.encoder().schema
    columns = [f.name for f in schema.features]
    if schema.user and schema.user not in columns:
        columns.append(schema.user)
    labels_all = frame[schema.label].to_numpy().astype(np.int64)
    theta0 = md.load_serving(1)
    last = stream.n_periods if periods is None else min(stream.n_periods, P + periods)

    server = start_server(md.path, log_path=out / "server.log")
    log(f"demo: server pid {server.pid} on {server.url}; replaying periods {P + 1}..{last}")
    requests = failed = 0
    latencies: list[float] = []
    per_period: list[dict[str, Any]] = []
    live_p: list[np.ndarray] = []
    frozen_p: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    swaps: list[int] = []
    retrains: list[dict[str, Any]] = []

    def call(client, path: str, body: dict) -> dict | None:
        nonlocal requests, failed
        requests += 1
        t0 = time.perf_counter()
        try:
            r = client.post(path, json=body)
        except httpx.HTTPError:
            failed += 1
            return None
        latencies.append(time.perf_counter() - t0)
        if r.status_code != 200:
            failed += 1
            return None
        return r.json()

    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            for t in range(P + 1, last + 1):
                start, end = stream.bounds[t - 1]
                records = frame.slice(start, end - start).select(columns).to_dicts()
                y = labels_all[start:end]
                p_live = np.full(end - start, np.nan)
                versions = set()
                for i in range(0, len(records), batch):
                    resp = call(client, "/predict", {"records": records[i : i + batch]})
                    if resp is None:
                        continue
                    versions.add(resp["model_version"])
                    preds = resp["predictions"]
                    p_live[i : i + len(preds)] = [p["p"] for p in preds]
                    call(
                        client,
                        "/feedback",
                        {
                            "events": [
                                {"impression_id": p["impression_id"], "label": int(lbl)}
                                for p, lbl in zip(preds, y[i : i + batch])
                            ]
                        },
                    )
                p_frozen = torch.sigmoid(predict_rows(theta0, stream.period(t))[0]).numpy()
                ok = ~np.isnan(p_live)
                row = {
                    "period": t,
                    "rows": int(end - start),
                    "model_versions": sorted(versions),
                    "live_auc": auc(y[ok], p_live[ok]),
                    "frozen_auc": auc(y, p_frozen),
                }
                truth = stream.truth_of(t)
                if truth is not None:
                    row["oracle_auc"] = auc(y, truth.numpy())
                live_p.append(p_live)
                frozen_p.append(p_frozen)
                ys.append(y)
                if t < last:
                    result = retrain(md.path, options)
                    retrains.append(result.to_dict())
                    row["retrain"] = result.outcome
                    if result.outcome == "published":
                        _wait_version(client, result.version, headers=server.admin_headers)
                        swaps.append(sum(len(a) for a in ys))
                per_period.append(row)
                log(
                    f"period {t}: live AUC {row['live_auc']:.4f}  frozen AUC {row['frozen_auc']:.4f}  "
                    f"served by v{row['model_versions']}  retrain: {row.get('retrain', '-')}"
                )
            metrics_text = client.get("/metrics").text
    finally:
        server.stop()

    y_all = np.concatenate(ys)
    live_all = np.concatenate(live_p)
    frozen_all = np.concatenate(frozen_p)
    ok = ~np.isnan(live_all)
    lat = np.asarray(latencies) * 1000
    summary: dict[str, Any] = {
        "run": run,
        "periods": per_period,
        "live_auc": float(np.nanmean([r["live_auc"] for r in per_period])),
        "frozen_auc": float(np.nanmean([r["frozen_auc"] for r in per_period])),
        "live_auc_pooled": auc(y_all[ok], live_all[ok]),
        "frozen_auc_pooled": auc(y_all, frozen_all),
        "oracle_auc": float(np.nanmean([r.get("oracle_auc", np.nan) for r in per_period])),
        "requests": requests,
        "failed_requests": failed,
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99": float(np.percentile(lat, 99)) if len(lat) else None,
        },
        "retrains": retrains,
        "published": sum(r["outcome"] == "published" for r in retrains),
        "rejected": sum(r["outcome"] == "rejected" for r in retrains),
        "seconds": round(time.perf_counter() - t_start, 1),
        "model_dir": str(md.path),
        "metrics_tail": [line for line in metrics_text.splitlines() if line.startswith("reloop_rolling")],
    }
    summary = _clean(summary)
    (out / "live.json").write_text(json.dumps(summary, indent=2, default=str))

    window = max(500, min(4000, len(y_all) // 10))
    xs, live_roll = rolling_auc(y_all[ok], live_all[ok], window, max(window // 8, 1))
    xf, frozen_roll = rolling_auc(y_all, frozen_all, window, max(window // 8, 1))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(xs, live_roll, label=f"live loop ({run}: retrain + hot swap each period)", color="C0")
    ax.plot(xf, frozen_roll, label="frozen Θ0", color="C3", linestyle="--")
    for s in swaps:
        ax.axvline(s, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel("impressions served")
    ax.set_ylabel(f"rolling AUC (last {window:,} impressions)")
    ax.set_title(
        f"reloop serve --demo: live AUC {summary['live_auc'] or float('nan'):.4f} vs frozen "
        f"{summary['frozen_auc'] or float('nan'):.4f} "
        f"({requests:,} requests, {failed} failed)"
    )
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "live.png", dpi=110)
    plt.close(fig)
    log(
        f"demo: live AUC {summary['live_auc'] or float('nan'):.4f} vs frozen {summary['frozen_auc'] or float('nan'):.4f}; "
        f"{requests} requests, {failed} failed; {out / 'live.json'}, {out / 'live.png'} ({summary['seconds']}s)"
    )
    return summary


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
