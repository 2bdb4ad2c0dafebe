"""``device: auto | cpu | cuda | cuda:N``: resolution, placement of every tensor, device-neutral checkpoints.

Everything but the last tests runs on a CPU-only machine:

- the resolver, with ``torch.cuda`` faked where a GPU would be needed;
- ``device: cpu`` and ``device: auto`` (here: the CPU) give bit-for-bit the default run;
- the runner really places models, the stream and the error memories on the resolved device: the
  resolver is patched to return ``cpu:0``, a device that is distinct from ``cpu`` as an object (moving a
  tensor there copies it) while computing on the CPU, and spies check what reaches training and serving;
- checkpoints hold CPU tensors and resume on another device.

The ``needs a CUDA GPU`` tests run a tiny protocol on CUDA for each component type; they are skipped
here and have not been run on a GPU yet.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

import reloop.device as rdev
from reloop import distributed as rd
from reloop.cli import app
from reloop.config import ConfigError, RunSpec, parse_config
from reloop.data.tensors import PeriodTensors, Stream
from reloop.device import resolve_device, to_cpu
from reloop.distributed import runtime_device
from reloop.protocol import runner as prunner
from reloop.protocol.experiment import run_experiment
from reloop.protocol.runner import pretrain, run_one
from reloop.update import strategies as pstrategies
from reloop.update.trainer import predict_rows

SENTINEL = torch.device("cpu", 0)  # computes on the CPU, but is not torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SKETCH = {"sketch": {"arrays": 8, "bits": 4}, "lambda": 0.5}
EXACT = {"exact": {"size": 256, "top_k": 8}, "lambda": 0.5}
RUNS = {
    "IU": {"update": "incremental"},
    "IU+sketch": {"update": "incremental", "memory": SKETCH},
    "SC+exact": {"update": "incremental", "loss": {"self_correction": 0.5}, "memory": EXACT},
    "SCprev": {"update": "incremental", "loss": {"self_correction": 0.5, "y_last": "previous_model"}},
    "KD": {"update": "incremental", "loss": {"distill": 0.5}},
    "BU2": {"update": {"batch": 2}},
    "FULL-scratch": {"update": {"full": {"start": "scratch"}}},
}


def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _fake_cuda(monkeypatch, count: int = 2, current: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def _metrics(rows: list[dict]) -> list[dict]:
    """Per-period rows without the wall-clock timings (``*_s``), which differ between any two runs."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def _tensors(obj, path: str = ""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


# --------------------------------------------------------------------------------------------------
# the resolver


def test_resolver_on_a_machine_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert runtime_device("auto") == torch.device("cpu")  # no process group: the resolver's answer
    for spec in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(
            ConfigError,
            match=rf"^device: '{spec}' requested but "
            r"torch\.cuda\.is_available\(\) is False",
        ):
            resolve_device(spec)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:0", "auto:1", "cuda:", "", "mps", 3, None])
def test_resolver_rejects_malformed_specs_naming_the_field(bad):
    with pytest.raises(ConfigError, match=r"^device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device(bad)
    raw = {
        "data": {"source": "synthetic", "periods": {"count": 8}},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2},
        "device": bad,
    }
    with pytest.raises(ConfigError, match=r"(^|; )device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        parse_config(raw)


def test_config_accepts_every_form_and_defaults_to_cpu(monkeypatch):
    raw = {
        "data": {"source": "synthetic", "periods": {"count": 8}},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2},
    }
    assert parse_config(raw).device == "cpu"
    for spec in ("auto", "cpu", "cuda", "cuda:1", "CUDA:0", " auto "):
        # the form is checked when the config is read; the GPU only when a run starts
        assert parse_config({**raw, "device": spec}).device == spec.strip().lower()


def test_resolver_with_cuda_present(monkeypatch):
    """The CUDA branches, with ``torch.cuda`` faked: indices are always explicit (``cuda:N``)."""
    _fake_cuda(monkeypatch, count=2, current=1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda", default_index=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device: 'cuda:2' requested but only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_init_distributed_resolves_the_config_device(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rd.shutdown()
    try:
        _no_cuda(monkeypatch)
        assert rd.init_distributed("auto").device == torch.device("cpu")
        rd.shutdown()
        with pytest.raises(ConfigError, match=r"^device: 'cuda' requested"):
            rd.init_distributed("cuda")
        rd.shutdown()
        _fake_cuda(monkeypatch, count=1)
        assert rd.init_distributed("auto").device == torch.device("cuda", 0)  # a world of one: GPU 0
        assert rd.backend_for(rd.current().device) == "nccl"
    finally:
        rd.shutdown()


def test_cli_run_names_device_when_cuda_is_missing(tmp_path, monkeypatch):
    _no_cuda(monkeypatch)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "data: {source: synthetic, periods: {count: 8}}\nprotocol: {pretrain: 3, warmup: 1, valid: 1, test: 2}\n"
    )
    res = CliRunner().invoke(
        app, ["run", str(cfg), "--out", str(tmp_path / "o"), "--no-progress", "--set", "device=cuda"]
    )
    assert res.exit_code == 2, res.output
    assert "device: 'cuda' requested but torch.cuda.is_available() is False" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()  # refused before any work
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o"), "--set", "device=gpu"])
    assert res.exit_code == 2 and "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'" in " ".join(res.output.split())


# --------------------------------------------------------------------------------------------------
# helpers that move data


def test_tensors_move_once_and_not_at_all_when_already_there(stream):
    rows = stream.period(2)
    assert rows.device == torch.device("cpu")
    assert rows.to("cpu") is rows and stream.to(torch.device("cpu")) is stream
    moved = stream.to(SENTINEL)  # cpu:0 is another device object: a real copy, once
    assert moved is not stream and moved.bounds == stream.bounds and moved.truth is stream.truth
    for k, v in stream.rows.data.items():
        assert torch.equal(moved.rows.data[k], v)
        assert moved.rows.data[k].data_ptr() != v.data_ptr()
    assert PeriodTensors({}).device == torch.device("cpu")


def test_to_cpu_keeps_structure_and_state_dict_metadata():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    out = to_cpu({"model": sd, "list": [torch.ones(2), 3, "x"], "tuple": (torch.zeros(1), None), "n": 5})
    assert type(out["model"]) is type(sd) and out["model"]._metadata == sd._metadata
    assert out["model"]["0.weight"] is sd["0.weight"]  # CPU tensors are not copied
    assert out["list"][1:] == [3, "x"] and out["tuple"][1] is None and out["n"] == 5
    model.load_state_dict(out["model"])


def test_predict_rows_output_device(stream):
    cfg = tiny_config()
    model, _ = pretrain(cfg, stream, 0, device="cpu")
    rows = stream.period(4)
    a, ha = predict_rows(model, rows)
    b, hb = predict_rows(model, rows, out_device=None)
    c, _ = predict_rows(model, rows, out_device=SENTINEL, hidden=False)
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(a, c)


def test_bf16_autocast_follows_the_device_type():
    import warnings

    from reloop.update.trainer import _autocast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available, disabling" on a CPU-only machine
        on_gpu = _autocast("bf16", torch.device("cuda", 0))
    assert on_gpu.device == "cuda" and on_gpu.fast_dtype == torch.bfloat16
    assert _autocast("bf16", SENTINEL).device == "cpu"


# --------------------------------------------------------------------------------------------------
# end to end on the CPU


def _experiment_config(tmp_path: Path, **extra) -> dict:
    raw = {
        "data": {
            "source": "synthetic",
            "periods": {"count": 8, "by": "rows"},
            "synthetic": {"users": 120, "items": 80, "rows_per_period": 400, "seed": 5},
            "cache": str(tmp_path / "cache"),
        },
        "model": {"name": "emb_mlp", "embedding_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "pretrain_epochs": 2, "batch_size": 128, "lr": 0.01},
        "protocol": {"pretrain": 3, "warmup": 1, "valid": 1, "test": 2, "seeds": [0], "serve_batch_size": 128},
        "runs": {"IU+sketch": RUNS["IU+sketch"], "SC+exact": RUNS["SC+exact"]},
    }
    raw.update(extra)
    return raw


def test_explicit_cpu_and_auto_equal_the_default_run_bit_for_bit(tmp_path, monkeypatch):
    _no_cuda(monkeypatch)
    texts = {}
    for label, extra in {"default": {}, "cpu": {"device": "cpu"}, "auto": {"device": "auto"}}.items():
        cfg = parse_config(_experiment_config(tmp_path, **extra))
        out = tmp_path / label
        run_experiment(cfg, out, show_progress=False)
        texts[label] = (out / "periods.csv").read_text()
    assert texts["cpu"] == texts["default"]
    assert texts["auto"] == texts["default"]


class _Spy:
    """Records what the runner moves to SENTINEL and checks what reaches training, prediction, serving."""

    def __init__(self, monkeypatch) -> None:
        self.moved_storage: set[int] = set()
        self.checked = {"train": 0, "predict": 0, "serve": 0, "memory": 0}
        monkeypatch.setattr(rdev, "resolve_device", lambda *a, **k: SENTINEL)
        monkeypatch.setattr("reloop.distributed.resolve_device", lambda *a, **k: SENTINEL)
        module_to = torch.nn.Module.to

        def spy_module_to(module, *args, **kwargs):
            out = module_to(module, *args, **kwargs)
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)):
                module._spy_device = torch.device(target)  # deep copies carry it along
            return out

        monkeypatch.setattr(torch.nn.Module, "to", spy_module_to)
        stream_to = Stream.to

        def spy_stream_to(stream, device):
            out = stream_to(stream, device)
            if torch.device(device) == SENTINEL:
                # a clone, whatever .to does on this torch: rows read later must come from it
                out = Stream(
                    out.feature_map,
                    PeriodTensors({k: v.clone() for k, v in out.rows.data.items()}),
                    out.bounds,
                    out.truth,
                    out.meta,
                )
                self.moved_storage.add(out.rows.data["label"].untyped_storage().data_ptr())
            return out

        monkeypatch.setattr(Stream, "to", spy_stream_to)
        for module, name, kind in (
            (prunner, "train_rows", "train"),
            (pstrategies, "train_rows", "train"),
            (pstrategies, "predict_rows", "predict"),
            (prunner, "serve_period", "serve"),
        ):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), kind))

    def _wrap(self, fn, kind: str):
        def wrapped(model, *args, **kwargs):
            assert getattr(model, "_spy_device", None) == SENTINEL, f"{kind}: model not moved to the device"
            rows = args[1] if kind == "train" else args[0]  # train_rows(model, optimizer, rows, ...)
            ptr = rows.data["label"].untyped_storage().data_ptr()
            assert ptr in self.moved_storage, f"{kind}: rows do not come from the stream moved to the device"
            comp = (args[1] if len(args) > 1 else kwargs.get("compensator")) if kind == "serve" else None
            if comp is not None:
                assert comp.memory.device == SENTINEL, "serve: error memory not on the device"
                self.checked["memory"] += 1
            self.checked[kind] += 1
            return fn(model, *args, **kwargs)

        return wrapped


def test_runner_places_models_stream_and_memory_on_the_resolved_device(stream, tmp_path, monkeypatch):
    cfg = tiny_config(**RUNS)
    plain = {}
    theta0, opt0 = pretrain(cfg, stream, 0, device="cpu")
    for name, spec in cfg.runs.items():
        plain[name] = run_one(cfg, stream, name, spec, 0, theta0, opt0, device="cpu")

    spy = _Spy(monkeypatch)
    assert runtime_device(cfg.device) == SENTINEL
    theta0, opt0 = pretrain(cfg, stream.to(SENTINEL), 0)  # device=None: the (patched) resolver decides
    assert theta0._spy_device == SENTINEL
    for name, spec in cfg.runs.items():
        rows = run_one(cfg, stream, name, spec, 0, theta0, opt0, out=tmp_path)  # run_one moves the stream
        assert _metrics(rows) == _metrics(plain[name]), name  # placement changes no number
    assert spy.checked["train"] >= 1 + 4 * len(RUNS) and spy.checked["serve"] == 5 * len(RUNS)
    assert spy.checked["predict"] >= 4 and spy.checked["memory"] == 10
    # checkpoints hold CPU tensors only (cpu:0 is reported as cpu by tensors; what matters on a GPU)
    for name in RUNS:
        blob = torch.load(tmp_path / "checkpoints" / name / "seed0.pt", map_location="cpu", weights_only=False)
        assert all(t.device.type == "cpu" for _, t in _tensors(blob))


def test_checkpoint_from_another_device_resumes_with_map_location(stream, tmp_path, monkeypatch):
    """A run checkpointed on one device (cpu:0 here) resumes on another (cpu) with the same metrics."""
    cfg = tiny_config(**{k: RUNS[k] for k in ("IU+sketch", "SC+exact")})
    theta0, opt0 = pretrain(cfg, stream, 0, device="cpu")
    loads, saved = [], []
    real_load = torch.load
    # tensors on cpu:0 report device cpu, so whether a checkpoint would hold GPU tensors is checked on
    # the way: every checkpoint goes through to_cpu
    monkeypatch.setattr(prunner, "to_cpu", lambda obj: saved.append(obj) or to_cpu(obj))

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    for name, spec in cfg.runs.items():
        straight = run_one(cfg, stream, name, spec, 0, theta0, opt0, device="cpu")
        out = tmp_path / name
        run_one(cfg, stream, name, spec, 0, copy.deepcopy(theta0), opt0, out=out, stop_after=5, device=SENTINEL)
        monkeypatch.setattr(torch, "load", spy_load)
        resumed = run_one(cfg, stream, name, spec, 0, theta0, opt0, out=out, resume=True, device="cpu")
        monkeypatch.setattr(torch, "load", real_load)
        assert _metrics(resumed) == _metrics(straight), name
    assert loads and all(m == "cpu" for m in loads)
    assert len(saved) == 2 * cfg.protocol.served_periods and all(
        "model" in b and "memory" in b["engine"] for b in saved
    )


def test_saved_models_load_with_map_location(stream, tmp_path):
    from reloop.models.base import load_model, save_model

    cfg = tiny_config()
    model, _ = pretrain(cfg, stream, 0, device="cpu")
    save_model(model, tmp_path / "m.pt")
    from safetensors.torch import load_file  # save_model writes safetensors (never a pickle)

    assert all(t.device.type == "cpu" for t in load_file(tmp_path / "m.pt").values())
    loaded = load_model(tmp_path / "m.pt", stream.feature_map).to(SENTINEL)
    a, _ = predict_rows(model, stream.period(5), hidden=False)
    b, _ = predict_rows(loaded, stream.period(5), hidden=False)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# on a GPU (skipped without one; not yet run on a GPU)

CUDA_RUNS = {
    "IU": {"update": "incremental"},
    "SC": {"update": "incremental", "loss": {"self_correction": 0.5}},
    "ASMG-GRU": {"update": "incremental", "generator": {"asmg_gru": {"k": 2, "warmup": 1}}},
    "sketch": {"update": "incremental", "memory": SKETCH},
    "exact": {"update": "incremental", "memory": EXACT},
}


def _on_cuda(module: torch.nn.Module) -> bool:
    return all(p.device.type == "cuda" for p in module.parameters())


@needs_cuda
@pytest.mark.parametrize("name", list(CUDA_RUNS))
def test_tiny_protocol_on_cuda(name, stream, tmp_path, monkeypatch):
    cfg = parse_config({**tiny_config().model_dump(mode="json"), "device": "cuda", "runs": {name: CUDA_RUNS[name]}})
    device = resolve_device(cfg.device)
    assert device.type == "cuda" and device.index is not None
    served_on = []
    real_serve = prunner.serve_period

    def serve(model, rows, compensator=None, *args, **kwargs):
        served_on.append(
            (_on_cuda(model), rows.device.type, None if compensator is None else compensator.memory.device.type)
        )
        return real_serve(model, rows, compensator, *args, **kwargs)

    monkeypatch.setattr(prunner, "serve_period", serve)
    theta0, opt0 = pretrain(cfg, stream, 0)
    assert _on_cuda(theta0)
    rows = run_one(cfg, stream, name, cfg.runs[name], 0, theta0, opt0, out=tmp_path)
    assert served_on and all(m and r == "cuda" and c in (None, "cuda") for m, r, c in served_on)
    assert len(rows) == 1 + cfg.protocol.served_periods
    assert all(0.0 <= r["auc"] <= 1.0 and r["logloss"] == r["logloss"] for r in rows)
    # against the CPU: the same protocol, up to float summation order
    cpu_theta0, cpu_opt0 = pretrain(cfg, stream, 0, device="cpu")
    cpu_rows = run_one(cfg, stream, name, cfg.runs[name], 0, cpu_theta0, cpu_opt0, device="cpu")
    mean = lambda rs: sum(r["auc"] for r in rs) / len(rs)  # noqa: E731
    assert abs(mean(rows) - mean(cpu_rows)) < 0.02
    # the CUDA checkpoint is device-neutral: it resumes on the CPU
    blob = torch.load(tmp_path / "checkpoints" / name / "seed0.pt", map_location="cpu", weights_only=False)
    assert all(t.device.type == "cpu" for _, t in _tensors(blob))
    run_one(cfg, stream, name, cfg.runs[name], 0, cpu_theta0, cpu_opt0, out=tmp_path, resume=True, device="cpu")


@needs_cuda
def test_cpu_checkpoint_resumes_on_cuda(stream, tmp_path):
    cfg = tiny_config(**{"sketch": CUDA_RUNS["sketch"]})
    theta0, opt0 = pretrain(cfg, stream, 0, device="cpu")
    spec = RunSpec(**CUDA_RUNS["sketch"])
    run_one(cfg, stream, "sketch", spec, 0, theta0, opt0, out=tmp_path, stop_after=5, device="cpu")
    rows = run_one(
        cfg, stream, "sketch", spec, 0, theta0, opt0, out=tmp_path, resume=True, device=resolve_device("cuda")
    )
    assert len(rows) == 1 + cfg.protocol.served_periods


def test_clock_waits_for_cuda_work_only_on_cuda(monkeypatch):
    """Stage timings (update_s, generator_fit_s, ...) must not charge queued GPU kernels to a later stage."""
    from reloop.device import clock

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    before = clock("cpu")
    assert calls == []
    after = clock("cuda:0")
    assert calls == [torch.device("cuda", 0)] and after >= before
