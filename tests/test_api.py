"""The public API (``reloop.__all__``, ``reloop.api``): what it declares, and that each wrapper does what
the internal class it wraps does."""

from __future__ import annotations

import doctest
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reloop
from reloop import api
from reloop.memory.compensate import compensate
from reloop.memory.exact import ExactMemory
from reloop.memory.sketch import SketchMemory
from reloop.update.losses import self_correction_term

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = [
    "CompensatedModel",
    "Compensator",
    "DistillationLoss",
    "ErrorMemory",
    "ExactMemory",
    "Learner",
    "MetaGenerator",
    "Period",
    "Prediction",
    "SelfCorrectionLoss",
    "SketchMemory",
    "__version__",
    "auc",
    "error_memory",
    "logloss",
    "oracle_auc",
    "plot_periods",
    "prequential",
    "summarize",
    "synthetic_periods",
    "write_periods",
]


# ------------------------------------------------------------------------------------ declaration


def test_public_names_are_pinned() -> None:
    """Changing the public surface is a decision (docs/api.md, "Versioning"): update this list with it."""
    assert sorted(reloop.__all__) == sorted(PUBLIC)
    assert sorted(api.__all__) == sorted(n for n in PUBLIC if n != "__version__")
    for name in reloop.__all__:
        assert getattr(reloop, name) is not None
    assert set(dir(reloop)) >= set(PUBLIC)
    with pytest.raises(AttributeError):
        reloop.not_a_name  # noqa: B018


def test_version_matches_the_package_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert reloop.__version__ == project["version"]


def test_import_reloop_stays_cheap() -> None:
    """``import reloop`` (the CLI's first import) must not pull in torch; the API loads on first use."""
    code = "import sys, reloop; assert 'torch' not in sys.modules; reloop.SelfCorrectionLoss; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_docstring_examples_run() -> None:
    result = doctest.testmod(api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0


# ------------------------------------------------------------------------------------------ losses

vectors = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        *(
            st.lists(st.floats(lo, hi, allow_nan=False, width=32), min_size=n, max_size=n)
            for lo, hi in ((-8, 8), (0, 1), (0, 1))
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(vectors, st.floats(0, 1))
def test_self_correction_loss_is_the_papers_formula(v: tuple[list[float], ...], alpha: float) -> None:
    logits = torch.tensor(v[0], dtype=torch.float64)
    labels = torch.tensor(v[1], dtype=torch.float64).round()
    y_last = torch.tensor(v[2], dtype=torch.float64)
    p = torch.sigmoid(logits)
    sc = labels * torch.clamp(y_last - p, min=0) + (1 - labels) * torch.clamp(p - y_last, min=0)
    expected = alpha * sc.mean() + (1 - alpha) * F.binary_cross_entropy(p, labels)
    got = reloop.SelfCorrectionLoss(alpha)(logits, labels, y_last)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sc, self_correction_term(p, y_last, labels))


def test_self_correction_loss_gradient_ignores_y_last_and_checks_shapes() -> None:
    logits = torch.zeros(3, requires_grad=True)
    y_last = torch.tensor([0.9, 0.1, 0.5], requires_grad=True)
    reloop.SelfCorrectionLoss(0.5)(logits, torch.tensor([1.0, 0.0, 1.0]), y_last).backward()
    assert y_last.grad is None and logits.grad is not None
    with pytest.raises(ValueError, match="y_last: expected the shape of logits"):
        reloop.SelfCorrectionLoss(0.5)(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="α must be in"):
        reloop.SelfCorrectionLoss(1.5)
    assert isinstance(reloop.SelfCorrectionLoss(0.3, "normalized"), nn.Module)
    assert "alpha=0.3" in repr(reloop.SelfCorrectionLoss(0.3))


def test_distillation_loss_is_the_incctr_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(50, generator=g), torch.randn(50, generator=g)
    y = (torch.rand(50, generator=g) > 0.5).float()
    beta, temp = 0.3, 2.0
    expected = (1 - beta) * F.binary_cross_entropy_with_logits(z, y) + beta * F.binary_cross_entropy_with_logits(
        z / temp, torch.sigmoid(zt / temp)
    )
    torch.testing.assert_close(reloop.DistillationLoss(beta, temp)(z, y, zt), expected)
    torch.testing.assert_close(reloop.DistillationLoss(0.0)(z, y, zt), F.binary_cross_entropy_with_logits(z, y))
    with pytest.raises(ValueError, match="temperature"):
        reloop.DistillationLoss(0.3, 0.0)


# ------------------------------------------------------------------------------------ error memory


def test_error_memory_routes_options_to_the_memory() -> None:
    sketch = reloop.error_memory(6, arrays=12, bits=3, temperature=0.2, lam=0.7, reset_on_update=False)
    assert isinstance(sketch.memory, SketchMemory)
    assert (sketch.memory.config()["arrays"], sketch.memory.config()["bits"]) == (12, 3)
    assert sketch.memory.temperature == 0.2 and sketch.lam == 0.7 and not sketch.reset_on_update
    exact = reloop.error_memory(6, "exact", size=50, top_k=5, write="errors", error_threshold=0.2)
    assert isinstance(exact.memory, ExactMemory) and exact.memory.size == 50
    assert exact.memory.write_policy == "errors"
    with pytest.raises(ValueError, match="memory.bitz"):
        reloop.error_memory(6, bitz=3)
    with pytest.raises(ValueError, match="kind"):
        reloop.error_memory(6, "faiss")  # type: ignore[arg-type]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def with_key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h).squeeze(-1), h


def test_compensated_model_equals_the_compensator_by_hand() -> None:
    torch.manual_seed(0)
    net = Net()
    by_layer = reloop.CompensatedModel(net, reloop.error_memory(6, "exact", size=100, top_k=10), key_layer="head")
    by_tuple = reloop.CompensatedModel(net.with_key, reloop.error_memory(6, "exact", size=100, top_k=10))
    x, y = torch.randn(30, 4), (torch.rand(30) > 0.5).float()
    for served in (by_layer, by_tuple):
        first = served.predict(x)
        torch.testing.assert_close(first.prob, compensate(first.base, torch.zeros(30), 0.5))  # empty memory
        assert (first.support == 0).all()
        served.feedback(first, y)
        second = served.predict(x[:7])
        logits, h = net.with_key(x[:7])
        p = torch.sigmoid(logits).detach()
        torch.testing.assert_close(second.base, p)
        torch.testing.assert_close(second.key, h.detach())
        e_hat, support = served.memory.estimate(h.detach(), p)
        torch.testing.assert_close(second.prob, compensate(p, e_hat, 0.5))
        assert (second.support == support).all() and (support > 0).all()


def test_compensated_model_feedback_slices_and_model_updates() -> None:
    net = Net()
    served = reloop.CompensatedModel(net, reloop.error_memory(6, "exact", size=100, top_k=4), key_layer=net.head)
    pred = served.predict(torch.randn(10, 4))
    part = pred[[1, 3]]
    assert len(part) == 2 and part.key.shape == (2, 6) and len(pred[4]) == 1 and len(pred[2:5]) == 3
    served.feedback(part, torch.tensor([1.0, 0.0]))
    assert served.memory.n_written == 2
    with pytest.raises(ValueError, match="expected 2 labels"):
        served.feedback(part, torch.ones(3))
    served.update_model(Net())  # reset_on_update (default): the old model's errors are dropped
    assert served.memory.n_written == 0
    named = reloop.CompensatedModel(net, reloop.error_memory(6), key_layer="head")
    other = Net()
    named.update_model(other)  # the layer name is looked up in the new model
    x = torch.randn(4, 4)
    torch.testing.assert_close(named.predict(x).key, other.with_key(x)[1].detach())
    kept = reloop.CompensatedModel(net, reloop.error_memory(6, reset_on_update=False), key_layer="head")
    kept.feedback(kept.predict(torch.randn(3, 4)), torch.ones(3))
    kept.update_model()
    assert kept.memory.n_written == 3
    with pytest.raises(ValueError, match="not a submodule"):
        reloop.CompensatedModel(net, reloop.error_memory(6), key_layer="nope")
    with pytest.raises(ValueError, match=r"return \(output, h\)"):
        reloop.CompensatedModel(net, reloop.error_memory(6)).predict(torch.randn(2, 4))
    with pytest.raises(TypeError, match="Compensator"):
        reloop.CompensatedModel(net, object())  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- generators


class Tiny(nn.Module):
    """Not a zoo model: an embedding table and a linear layer, called with keyword tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.item = nn.Embedding(20, 3)
        self.out = nn.Linear(3, 1)

    def forward(self, item: torch.Tensor) -> torch.Tensor:
        return self.out(self.item(item)).squeeze(-1)


def _period(seed: int, label: float | None = None, n: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    item = torch.randint(0, 20, (n,), generator=g)
    y = torch.full((n,), label) if label is not None else (item % 2).float()
    return {"item": item, "label": y}


def _train(model: nn.Module, data: dict[str, torch.Tensor], steps: int = 20) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(data["item"]), data["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "spec", [{"asmg_gru": {"k": 2, "lr": 0.05}}, {"asmg_linear": {"k": 2, "lr": 0.05}}, {"sml": {"lr": 0.01}}]
)
def test_meta_generator_learns_from_the_period_it_served(spec: dict[str, Any]) -> None:
    """Trained on a period where every row is a click, the generated model predicts more clicks than
    the base model it was generated from; before it is trained it serves the base model itself."""
    torch.manual_seed(0)
    model = Tiny()
    gen = reloop.MetaGenerator(spec, batch_size=20)
    for t in range(4):
        _train(model, _period(t))
        gen.observe(model)
        served = gen.serving_model()
        if not gen.ready:
            assert served is model
        nxt = _period(100 + t, label=1.0)
        gen.learn(nxt)
    assert gen.ready and gen.n_observed == 4
    served = gen.serving_model()
    assert isinstance(served, Tiny) and served is not model
    with torch.no_grad():
        items = _period(999)["item"]
        assert torch.sigmoid(served(items)).mean() > torch.sigmoid(model(items)).mean() + 0.01
    state = gen.state_dict()
    again = reloop.MetaGenerator(spec, batch_size=20)
    again.load_state_dict(state)
    assert again.t == 4 and again.generator.state_dict()["n_trained"] == gen.generator.state_dict()["n_trained"]


def test_meta_generator_order_is_enforced() -> None:
    model = Tiny()
    gen = reloop.MetaGenerator("asmg_gru")
    with pytest.raises(ValueError, match="observe"):
        gen.serving_model()
    gen.learn(_period(0))  # before the first observe: ignored
    gen.observe(model)
    with pytest.raises(ValueError, match="label"):
        gen.learn({"item": _period(1)["item"]})
    with pytest.raises(ValueError, match="learn"):
        gen.observe(model)  # the period Θ_1 served was never learned from
    gen.learn(_period(1))
    with pytest.raises(ValueError, match="learned already"):
        gen.learn(_period(2))
    gen.observe(model)
    assert gen.serving_model() is model  # k = 3 models are needed first
    assert reloop.MetaGenerator("identity").generator.name == "identity"
    with pytest.raises(ValueError, match="generator"):
        reloop.MetaGenerator("asmg_lstm")


def test_meta_generator_custom_forward() -> None:
    """A model called positionally: ``forward`` says how to run it on a batch."""
    model = nn.Sequential(nn.Embedding(20, 3), nn.Linear(3, 1))
    gen = reloop.MetaGenerator({"asmg_linear": {"k": 1, "lr": 0.05}}, forward=lambda m, b: m(b["x"]), batch_size=50)
    for t in range(3):
        gen.observe(model)
        gen.learn({"x": _period(t)["item"], "label": torch.ones(200)})
    served = gen.serving_model()
    assert isinstance(served, nn.Sequential) and served is not model


# ---------------------------------------------------------------------------------------- protocol


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.bias = 0.0

    def predict(self, inputs: dict[str, Any]) -> np.ndarray:
        self.calls.append(("predict", inputs["t"]))
        return np.clip(inputs["x"] + self.bias, 0.01, 0.99)

    def fit(self, inputs: dict[str, Any], labels: torch.Tensor, served: torch.Tensor) -> None:
        self.calls.append(("fit", inputs["t"]))
        np.testing.assert_allclose(served.numpy(), np.clip(inputs["x"] + self.bias, 0.01, 0.99), rtol=1e-6)
        self.bias += 0.01


def _fake_periods(n: int) -> list[reloop.Period]:
    rng = np.random.default_rng(0)
    out = []
    for t in range(1, n + 1):
        x = rng.random(50)
        out.append(
            reloop.Period(
                {"t": t, "x": x}, (rng.random(50) < x).astype(np.float32), users=rng.integers(0, 5, 50), truth=x
            )
        )
    return out


def test_prequential_tests_then_trains() -> None:
    rec = Recorder()
    periods = _fake_periods(10)
    rows = reloop.prequential(rec, periods, pretrain=2, warmup=3, valid=2, run="mine", seed=7)
    expected_calls = [c for t in range(1, 11) for c in (("predict", t), ("fit", t))][:-1]  # no fit after the last
    assert rec.calls == expected_calls
    assert [r["period"] for r in rows] == list(range(3, 11))
    assert [r["phase"] for r in rows] == ["pretrain"] + ["warmup"] * 3 + ["valid"] * 2 + ["test"] * 2
    assert all(r["run"] == "mine" and r["seed"] == 7 and r["rows"] == 50 for r in rows)
    assert all(0 <= r["auc"] <= 1 and 0 <= r["gauc"] <= 1 and r["logloss"] > 0 for r in rows)
    summary = reloop.summarize(rows, baseline="mine")
    assert summary[0]["run"] == "mine" and summary[0]["auc_imp_pct"] == 0.0
    oracle = reloop.oracle_auc(periods)
    assert sorted(oracle) == list(range(1, 11)) and all(0.5 < v <= 1 for v in oracle.values())


def test_prequential_refuses_what_it_cannot_run() -> None:
    with pytest.raises(TypeError, match="predict"):
        reloop.prequential(object(), _fake_periods(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pretrain"):
        reloop.prequential(Recorder(), _fake_periods(3), pretrain=3)

    class Short(Recorder):
        def predict(self, inputs: dict[str, Any]) -> np.ndarray:
            return np.zeros(3)

    with pytest.raises(ValueError, match="3 values for 50 rows"):
        reloop.prequential(Short(), _fake_periods(3))


def test_synthetic_periods_shapes_and_determinism() -> None:
    a = reloop.synthetic_periods(periods=3, rows_per_period=100, users=20, items=10, categories=4, seed=5)
    b = reloop.synthetic_periods(periods=3, rows_per_period=100, users=20, items=10, categories=4, seed=5)
    assert len(a) == 3 and all(len(p) == 100 for p in a)
    for p, q in zip(a, b):
        assert set(p.inputs) == {"user", "item", "category", "hour"}
        for k, v in p.inputs.items():
            assert v.dtype == torch.int64 and torch.equal(v, q.inputs[k])
        assert int(p.inputs["user"].max()) < 20 and int(p.inputs["item"].max()) < 10
        assert int(p.inputs["category"].max()) < 4 and int(p.inputs["hour"].max()) < 24
        assert set(p.labels.unique().tolist()) <= {0.0, 1.0} and p.truth is not None
    with pytest.raises(Exception, match="drift_sigmaa"):
        reloop.synthetic_periods(periods=2, rows_per_period=10, drift_sigmaa=0.1)
