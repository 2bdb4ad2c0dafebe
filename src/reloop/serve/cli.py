"""``reloop serve`` and ``reloop retrain``: argument wiring only (the logic is in ``reloop.serve``).

Mounted on the main ``reloop`` app by ``reloop.cli``; also runnable alone as
``python -m reloop.serve.cli serve|retrain ...`` (the tests and the benchmark start servers so).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="reloop online service.")


def _err(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _load_config(config: Path, overrides: list[str] | None):
    from reloop.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _err(f"config error {config}: {e}")


def _compatible(stored, given, run: str) -> list[str]:
    """Keys of ``given`` that must not differ from the config a model directory was built with."""
    problems = []
    a, b = stored.model_dump(mode="json"), given.model_dump(mode="json")
    for key in ("model", "encoder"):
        if a[key] != b[key]:
            problems.append(key)
    da = {k: v for k, v in a["data"].items() if k not in ("path", "cache")}
    db = {k: v for k, v in b["data"].items() if k not in ("path", "cache")}
    if da != db:
        problems.append("data")
    if a["protocol"]["pretrain"] != b["protocol"]["pretrain"]:
        problems.append("protocol.pretrain")
    if run not in b["runs"]:
        problems.append(f"runs.{run} (missing)")
    elif a["runs"].get(run) != b["runs"][run]:
        problems.append(f"runs.{run}")
    elif stored.runs[run].combine is not None:  # a combine run's experts are chains of their own
        from reloop.config import experts_of

        problems += [f"runs.{e}" for e in experts_of(stored, run)[1:] if a["runs"].get(e) != b["runs"].get(e)]
    return problems


def _label_timeout(value: float) -> float | None:
    return None if value < 0 else value


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); anything else is reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _admin_token(token_file: Path | None) -> str | None:
    """The admin token: ``--admin-token-file`` (its first line), else ``RELOOP_ADMIN_TOKEN``."""
    from reloop.serve.guard import MIN_TOKEN_LENGTH, TOKEN_ENV

    if token_file is not None:
        try:
            lines = token_file.read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            _err(f"--admin-token-file {token_file}: cannot be read ({type(e).__name__})")
        token = lines[0].strip() if lines else ""
        source = f"--admin-token-file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "")
        source = TOKEN_ENV
    if not token:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        _err(f"{source}: the admin token needs at least {MIN_TOKEN_LENGTH} characters")
    return token


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reloop %(levelname)s %(message)s", stream=sys.stderr)


# The retrain gate's options, shared by `reloop serve` (background retrains) and `reloop retrain`.
MaxAucDropOption = Annotated[
    float,
    typer.Option(
        "--max-auc-drop",
        help="Reject a candidate whose held-out AUC is lower than the serving model's by more than this.",
    ),
]
HoldoutOption = Annotated[
    float, typer.Option("--holdout", help="Share of the period's last rows held out for validation.")
]
LabelTimeoutOption = Annotated[
    float,
    typer.Option(
        "--label-timeout", help="Seconds after which an unlabelled impression counts as a negative (<0: never)."
    ),
]


def serve(
    config: Annotated[
        Path | None, typer.Option("--config", help="Run config (YAML); needed to bootstrap an empty --model-dir.")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Model directory (created and bootstrapped when empty).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind (loopback by default; any other needs an admin token).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (--demo picks a free one).")] = 8080,
    run: Annotated[
        str | None, typer.Option("--run", help="Which run of the config composes the service (default: the first).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: a.b.c=<YAML value>.")] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Largest records/events per request (413 above).")
    ] = 4096,
    retrain_every: Annotated[
        int,
        typer.Option(
            "--retrain-every",
            help="Retrain in the background every N feedback events (0: never; use `reloop retrain`).",
        ),
    ] = 0,
    max_auc_drop: MaxAucDropOption = 0.01,
    holdout: HoldoutOption = 0.1,
    label_timeout: LabelTimeoutOption = 3600.0,
    poll_interval: Annotated[
        float, typer.Option("--poll-interval", help="Seconds between checks of the CURRENT pointer.")
    ] = 0.5,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            "--admin-token-file",
            help="File whose first line is the admin token (else RELOOP_ADMIN_TOKEN); /admin/* needs it as 'Authorization: Bearer <token>'.",
        ),
    ] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body (413 above).")] = 8
    * 2**20,
    max_id_length: Annotated[
        int,
        typer.Option(
            "--max-id-length", help="Longest id (categorical value, sequence item) in characters (422 above)."
        ),
    ] = 256,
    body_timeout: Annotated[
        float, typer.Option("--body-timeout", help="Seconds to receive a whole request body (408 after).")
    ] = 10.0,
    admin_rate: Annotated[
        float, typer.Option("--admin-rate", help="Admin requests per minute per client (bursts of 10; 429 above).")
    ] = 30.0,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Concurrent connections (503 above).")] = 64,
    torch_threads: Annotated[
        int,
        typer.Option(
            "--torch-threads",
            help="Intra-op threads of the model (torch.set_num_threads); 1 is fastest for small batches "
            "on a few cores (0: torch's default).",
        ),
    ] = 1,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Replay the embedded synthetic stream through a live server; write OUT/live.png and live.json.",
        ),
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Output directory of --demo.")] = Path("runs/serve-demo"),
    demo_periods: Annotated[
        int | None, typer.Option("--demo-periods", help="--demo: replay only this many served periods.")
    ] = None,
) -> None:
    """Serve predictions over HTTP with feedback, a durable log and hot-swapped models."""
    from reloop.serve.retrain import RetrainOptions

    _setup_logging()
    options = RetrainOptions(max_auc_drop=max_auc_drop, holdout=holdout, label_timeout=_label_timeout(label_timeout))
    if demo:
        from reloop.serve.replay import run_demo

        summary = run_demo(
            out,
            run=run,
            periods=demo_periods,
            options=options,
            config=config,
            overrides=set_ or [],
            log=lambda m: typer.echo(m, err=True),
        )
        typer.echo(
            json.dumps({k: summary[k] for k in ("live_auc", "frozen_auc", "requests", "failed_requests", "seconds")})
        )
        return
    if model_dir is None:
        _err("--model-dir is required (or --demo)")
    token = _admin_token(admin_token_file)
    if not is_loopback(host) and token is None:
        _err(
            f"--host {host} is not a loopback address: set RELOOP_ADMIN_TOKEN or --admin-token-file "
            "(admin routes and /docs then need it)"
        )
    from reloop.config import ConfigError
    from reloop.serve.registry import ModelDir, RegistryError, bootstrap, pick_run

    md = ModelDir(model_dir)
    try:
        if not md.is_bootstrapped():
            if config is None:
                _err(f"{model_dir} is not bootstrapped yet: pass --config CONFIG to create it")
            cfg = _load_config(config, set_)
            bootstrap(cfg, md.path, run, log=lambda m: typer.echo(m, err=True))
        elif config is not None:
            cfg = _load_config(config, set_)
            stored_run = md.info()["run"]
            chosen = pick_run(cfg, run) if run is not None else stored_run
            if chosen != stored_run:
                _err(f"{model_dir} serves run {stored_run!r}; --run {chosen!r} needs a new --model-dir")
            problems = _compatible(md.config(), cfg, stored_run)
            if problems:
                _err(
                    f"{config} differs from the config {model_dir} was bootstrapped with in: {', '.join(problems)}; "
                    "use a new --model-dir"
                )
            from reloop.config import dump_config
            from reloop.serve.registry import write_atomic

            write_atomic(md.path / "config.yaml", dump_config(cfg))  # e.g. new train settings for retrains
        elif run is not None and run != md.info()["run"]:
            _err(f"{model_dir} serves run {md.info()['run']!r}; --run {run!r} needs a new --model-dir")
    except RegistryError as e:
        _err(str(e))
    except ConfigError as e:  # e.g. device: cuda on a machine without a GPU
        _err(f"config error: {e}")
    import torch
    import uvicorn

    from reloop.serve.app import create_app

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    from reloop.serve.guard import Limits

    limits = Limits(
        max_body_bytes=max_body_bytes, max_id=max_id_length, body_timeout=body_timeout, admin_per_minute=admin_rate
    )
    try:
        application = create_app(
            md.path,
            max_batch=max_batch,
            retrain_every=retrain_every,
            retrain_options=options,
            poll_interval=poll_interval,
            limits=limits,
            admin_token=token or "",
            docs_need_token=not is_loopback(host),
        )
    except ConfigError as e:
        _err(f"config error {md.path / 'config.yaml'}: {e} (pass --config with --set device=cpu to change it)")
    except RegistryError as e:
        _err(str(e))
    svc = application.state.service
    typer.echo(
        f"reloop serve: {md.path} version {svc.state.version} (run {svc.run}) on http://{host}:{port}"
        f"; admin routes {'need the token' if token else 'off (no RELOOP_ADMIN_TOKEN)'}",
        err=True,
    )
    uvicorn.run(
        application, host=host, port=port, log_level="warning", access_log=False, limit_concurrency=max_connections
    )


def retrain(
    model_dir: Annotated[Path, typer.Option("--model-dir", help="Model directory of a (running or stopped) service.")],
    max_auc_drop: MaxAucDropOption = 0.01,
    holdout: HoldoutOption = 0.1,
    label_timeout: LabelTimeoutOption = 3600.0,
    min_rows: Annotated[
        int, typer.Option("--min-rows", help="Skip (keep the period open) with fewer labelled impressions.")
    ] = 1,
) -> None:
    """Close the open period, train on its logged impressions and feedback, validate and publish."""
    from reloop.serve.registry import RegistryError
    from reloop.serve.retrain import RetrainOptions
    from reloop.serve.retrain import retrain as run_retrain

    _setup_logging()
    options = RetrainOptions(
        max_auc_drop=max_auc_drop, holdout=holdout, label_timeout=_label_timeout(label_timeout), min_rows=min_rows
    )
    from reloop.config import ConfigError

    try:
        result = run_retrain(model_dir, options, log=lambda m: typer.echo(m, err=True))
    except RegistryError as e:
        _err(str(e))
    except ConfigError as e:
        _err(f"config error {Path(model_dir) / 'config.yaml'}: {e}")
    out: dict[str, Any] = result.to_dict()
    typer.echo(json.dumps(out))
    if result.outcome == "busy":
        raise typer.Exit(1)


app.command("serve")(serve)
app.command("retrain")(retrain)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
