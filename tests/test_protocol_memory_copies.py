"""The protocol's copies that nothing needs are gone, and no result moved (issue 18: memory of ``reloop run``).

- ``run_one`` hands Θ_{t−1} and its optimizer state over to each update (``RunEngine.step(release=True)``):
  a warm start trains them in place instead of a deep copy. Every run gives the same metrics and the same
  served predictions, bit for bit, as the copying path. A seed's last run trains Θ0 itself
  (``run_seed(own_theta0=True)``, as ``reloop run`` calls it).
- ``serve_period`` without an error memory predicts in ``train.eval_batch_size`` batches: the same bits.
- ``ShardedPeriod.batches`` permutes indices instead of copying its shuffle window: the same batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config, tiny_stream

from reloop.components import memory_key
from reloop.data.shards import ShardedPeriod, write_tensors
from reloop.engine import RunEngine
from reloop.memory.compensate import Compensator
from reloop.models import build_model
from reloop.protocol.runner import pretrain, run_one, run_seed
from reloop.protocol.serving import serve_period
from reloop.update.strategies import Incremental, UpdateContext

SKETCH = {"sketch": {"arrays": 4, "bits": 4}, "lambda": 0.3}
GRU = {"asmg_gru": {"k": 2, "hidden": 2}}
RUNS = {
    "IU": {"update": "incremental"},
    "ReLoop": {"update": "incremental", "loss": {"self_correction": 0.5}},
    "ReLoop2": {"update": "incremental", "memory": SKETCH},
    "ASMG": {"update": "incremental", "generator": GRU},
    "all": {"update": "incremental", "loss": {"self_correction": 0.5}, "generator": GRU, "memory": SKETCH},
    "BU-2": {"update": {"batch": 2}},  # not incremental: the shadow IU chain starts from Θ_{t−1}
}


def _run(stream, name: str, monkeypatch, release: bool | None):
    """One run; ``release=False`` forces the copying path (what ``run_one`` did before), and records what
    each step returned against what it was given."""
    cfg = tiny_config(**{name: RUNS[name]})
    theta0, optim0 = pretrain(cfg, stream, 0)
    theta0_before = copy.deepcopy(theta0.state_dict())
    step = RunEngine.step
    log: list[tuple[bool, bool]] = []  # (the step returned the model it was given, the optimizer state)
    shadows: list[dict[str, torch.Tensor]] = []

    def spy(self, model, optim_state, *a, **kw):
        if release is not None:
            kw["release"] = release
        out = step(self, model, optim_state, *a, **kw)
        same_state = out.optim_state is not None and optim_state is not None
        same_state = same_state and out.optim_state["state"][0]["exp_avg"] is optim_state["state"][0]["exp_avg"]
        log.append((out.model is model, same_state))
        if out.shadow is not None:  # the shadow IU chain's models, for the comparison
            shadows.append(copy.deepcopy(out.shadow.state_dict()))
        return out

    monkeypatch.setattr(RunEngine, "step", spy)
    served: dict[str, torch.Tensor] = {}
    rows = run_one(cfg, stream, name, cfg.runs[name], 0, theta0, optim0, served_out=served)
    monkeypatch.setattr(RunEngine, "step", step)
    # Θ0 (shared by the seed's runs) is never trained in place
    assert all(torch.equal(v, theta0.state_dict()[k]) for k, v in theta0_before.items())
    return rows, served, log, shadows


def _results(rows):
    """The rows without their wall seconds (``*_s``)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_handing_the_previous_model_to_the_update_changes_no_result(stream, monkeypatch, name):
    copied, served_copied, log_copied, shadows_copied = _run(stream, name, monkeypatch, release=False)
    handed, served_handed, log_handed, shadows_handed = _run(stream, name, monkeypatch, release=None)
    assert _results(handed) == _results(copied)  # every metric of every period, exactly (floats with ==)
    for key in ("base", "final"):  # the served predictions, bit for bit (NaN where never served)
        torch.testing.assert_close(served_handed[key], served_copied[key], rtol=0, atol=0, equal_nan=True)
    assert not any(m or s for m, s in log_copied)  # the copying path: a new model and state every period
    shadowed = name in ("BU-2", "ReLoop", "all")  # not plain IU: the guard's shadow IU chain runs beside
    assert len(shadows_handed) == len(shadows_copied) == (len(log_copied) if shadowed else 0)
    for a, b in zip(shadows_handed, shadows_copied, strict=True):  # the guard's own chain, bit for bit
        assert all(torch.equal(a[k], b[k]) for k in a)
    if shadowed:  # the shadow chain's first step starts from Θ_{t−1} after the update: that one is a copy
        assert not any(log_handed[0])
        later = log_handed[1:]  # then the chain has its own model: the run's is trained in place
        assert later and all(m and s for m, s in later)
    else:  # trained in place: no second model or optimizer state per period
        assert log_handed and all(m and s for m, s in log_handed)


def test_the_last_run_of_a_seed_trains_theta0_itself_with_the_same_results(stream):
    cfg = tiny_config(IU=RUNS["IU"], ReLoop2=RUNS["ReLoop2"], ASMG=RUNS["ASMG"])
    theta0, optim0 = pretrain(cfg, stream, 0)
    before = copy.deepcopy(theta0.state_dict())
    shared = run_seed(cfg, stream, 0, theta0, optim0)
    assert all(torch.equal(v, theta0.state_dict()[k]) for k, v in before.items())  # copies only
    owned = run_seed(cfg, stream, 0, theta0, optim0, own_theta0=True)
    assert _results(owned) == _results(shared)
    assert not all(torch.equal(v, theta0.state_dict()[k]) for k, v in before.items())  # the last run's model


def test_an_update_leaves_the_given_model_alone_unless_it_is_handed_over(stream):
    cfg = tiny_config()
    model, optim = pretrain(cfg, stream, 0)
    before = copy.deepcopy(model.state_dict())
    optim_before = copy.deepcopy(optim)

    def ctx(owned: bool) -> UpdateContext:
        engine = RunEngine(cfg, cfg.runs["IU"], 0, stream.feature_map)
        c = engine.context(stream, cfg.protocol.pretrain + 1, None, model)
        c.owned = owned
        return c

    new, new_optim = Incremental().update(model, optim, ctx(owned=False))
    assert new is not model and new_optim is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(optim["state"][0]["exp_avg"], optim_before["state"][0]["exp_avg"])

    same, same_optim = Incremental().update(model, optim, ctx(owned=True))
    assert same is model and same_optim is not None
    assert same_optim["state"][0]["exp_avg"] is optim["state"][0]["exp_avg"]
    # the same values as the copying update (same seed, same rows)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in new.state_dict().items())
    assert torch.equal(same_optim["state"][0]["exp_avg"], new_optim["state"][0]["exp_avg"])


def test_the_memory_is_still_emptied_after_an_update_trained_in_place(stream, monkeypatch):
    cfg = tiny_config(ReLoop2=RUNS["ReLoop2"])
    theta0, optim0 = pretrain(cfg, stream, 0)
    calls: list[int] = []
    reset = Compensator.on_model_update
    monkeypatch.setattr(Compensator, "on_model_update", lambda self: (calls.append(1), reset(self))[1])
    run_one(cfg, stream, "ReLoop2", cfg.runs["ReLoop2"], 0, theta0, optim0)
    assert len(calls) == cfg.protocol.served_periods


# --- serving without a memory in large batches ------------------------------------------------------


@pytest.fixture(scope="module")
def long_stream():
    return tiny_stream(n=10_000)


@pytest.mark.parametrize("model", ["deepfm", "emb_mlp"])
@pytest.mark.parametrize("n", [1, 700, 1024, 5000, 8193, 9221])
def test_serving_without_a_memory_in_large_batches_gives_the_same_bits(long_stream, model, n):
    torch.manual_seed(0)
    spec = {"name": model, "embedding_dim": 8, "hidden_units": [64, 64]}
    m = build_model(spec, long_stream.feature_map)
    rows = long_stream.rows.slice(0, n)
    small = serve_period(m, rows, None, 1024)
    large = serve_period(m, rows, None, 1024, predict_batch_size=8192)
    assert torch.equal(small.base, large.base) and torch.equal(small.final, large.final)


def test_a_memory_still_acts_between_production_batches(stream, monkeypatch):
    """With an error memory, ``predict_batch_size`` is ignored: it reads and writes every ``batch_size`` rows."""
    cfg = tiny_config(ReLoop2=RUNS["ReLoop2"])
    theta0, _ = pretrain(cfg, stream, 0)
    sizes: list[int] = []
    feedback = Compensator.feedback
    monkeypatch.setattr(
        Compensator, "feedback", lambda self, h, *a, **kw: (sizes.append(h.shape[0]), feedback(self, h, *a, **kw))[1]
    )
    spec = cfg.runs["ReLoop2"]
    engine = RunEngine(cfg, spec, 0, stream.feature_map, key_dim=theta0.key_dim(memory_key(spec.memory)))
    rows = stream.period(cfg.protocol.pretrain + 1)
    serve_period(theta0, rows, engine.compensator, 128, predict_batch_size=8192)
    assert max(sizes) == 128 and sum(sizes) == len(rows)


# --- ShardedPeriod.batches: indices permuted, same batches -----------------------------------------


def _reference_batches(chunks, batch_size, shuffle, window, generator):
    """The batches as ``ShardedPeriod.batches`` made them before (the permuted window copied)."""
    pending, held = [], 0

    def cat(parts):
        return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    window = max(window, batch_size) if shuffle else batch_size
    for cols in chunks:
        pending.append(cols)
        held += next(iter(cols.values())).shape[0]
        if held >= window:
            buf = cat(pending)
            if shuffle:
                order = torch.randperm(held, generator=generator)
                buf = {k: v[order] for k, v in buf.items()}
            usable = (held // batch_size) * batch_size
            for i in range(0, usable, batch_size):
                yield {k: v[i : i + batch_size] for k, v in buf.items()}
            rest = {k: v[usable:] for k, v in buf.items()}
            pending, held = ([rest], held - usable) if held > usable else ([], 0)
    if held:
        buf = cat(pending)
        if shuffle:
            order = torch.randperm(held, generator=generator)
            buf = {k: v[order] for k, v in buf.items()}
        for i in range(0, held, batch_size):
            yield {k: v[i : i + batch_size] for k, v in buf.items()}


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(
    ("read_rows", "window", "batch"), [(100, 350, 64), (1000, 10, 64), (64, 256, 64), (37, 5000, 50)]
)
def test_sharded_batches_are_the_batches_of_the_permuted_window(tmp_path, shuffle, read_rows, window, batch):
    n = 1003
    cols = {"label": torch.arange(n) % 2, "x": torch.arange(n) * 10, "v": torch.randn(n, 3), "row": torch.arange(n)}
    write_tensors(cols, tmp_path, rows_per_file=300, row_group_rows=90)
    period = ShardedPeriod(tmp_path, read_rows=read_rows, shuffle_rows=window)
    got = list(period.batches(batch, shuffle=shuffle, generator=torch.Generator().manual_seed(3)))
    want = list(_reference_batches(period.chunks(), batch, shuffle, window, generator=torch.Generator().manual_seed(3)))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)
    rows = torch.cat([b["row"] for b in got])
    assert sorted(rows.tolist()) == list(range(n))  # every row once
    if shuffle and window > batch:
        assert rows.tolist() != list(range(n))
