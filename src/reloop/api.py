"""reloop inside your own code: the three papers' methods around any PyTorch model.

Everything here is public and versioned (see the "API reference" page, section "Versioning"); it is
also importable from the package root (``from reloop import SelfCorrectionLoss``). These are thin,
typed wrappers over the classes ``reloop run`` itself uses, so a method behaves the same in your
training loop as in the benchmark.

- **ReLoop** (Cai et al., SIGIR 2022): :class:`SelfCorrectionLoss`, an ``nn.Module``
  ``loss(logits, labels, y_last)``; :class:`DistillationLoss` (IncCTR's KD, the baseline it is
  compared with).
- **ReLoop2** (Zhu et al., KDD 2023): :func:`error_memory` builds the error memory + compensator;
  :class:`CompensatedModel` wraps any model that returns, or has a layer that sees, a representation:
  ``predict`` → ``feedback`` → compensated ``predict``.
- **ASMG** (Peng et al., RecSys 2021) and **SML** (Zhang et al., SIGIR 2020): :class:`MetaGenerator`
  over any ``nn.Module``'s parameters: ``observe`` each trained model, serve ``serving_model()``,
  ``learn`` from the period it served.
- **The prequential protocol** (test, then train, period by period): :func:`prequential` over any
  :class:`Learner` (``predict`` / ``fit``), giving rows that :func:`summarize` and
  :func:`plot_periods` turn into the same tables and figures as ``reloop run``.
- Metrics as the reports compute them: :func:`auc`, :func:`logloss`.
- Data for trying it: :func:`synthetic_periods` (reloop's drifting synthetic stream, with the true
  click probabilities).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, Protocol, cast, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from reloop.data.periods import phase_of
from reloop.data.tensors import History, LookAheadError, PeriodTensors
from reloop.memory.base import ErrorMemory
from reloop.memory.compensate import Compensator
from reloop.memory.config import ExactConfig, MemoryConfig, SketchConfig, build_memory
from reloop.memory.exact import ExactMemory
from reloop.memory.sketch import SketchMemory
from reloop.protocol.metrics import auc, logloss, period_metrics
from reloop.protocol.report import plot_periods, summarize, write_periods
from reloop.update.generators.base import ModelGenerator
from reloop.update.generators.config import build_generator
from reloop.update.losses import Distill, SelfCorrection

log = logging.getLogger(__name__)

__all__ = [
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


# ================================================================================================ losses


def _same_shape(logits: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if not isinstance(t, Tensor) or t.shape != logits.shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected the shape of logits {tuple(logits.shape)}, got {got}")


class SelfCorrectionLoss(nn.Module):
    """ReLoop's self-correcting loss (Cai et al., SIGIR 2022, Eq. 6; METHODS.md "ReLoop self-correction").

    ``L = α · mean(L_sc) + (1 − α) · BCE(σ(z), y)`` with, per sample,
    ``L_sc = y · max(ŷ_last − ŷ, 0) + (1 − y) · max(ŷ − ŷ_last, 0)``, ``ŷ = σ(z)``: the new model is
    penalised only where it does worse than the last model's prediction ``ŷ_last`` on the same row
    (a constant: no gradient flows into it).

    ``y_last`` is what the *previous* model predicted for the row — in production the probability
    that was served when the row was logged (what ``reloop run`` uses); for rows never served, the
    previous model's prediction.

    Args:
        alpha: α in [0, 1]; 0 is plain BCE. The paper's best values lie around 0.5–0.7.
        scale: ``"plain"`` (the paper's convex blend) or ``"normalized"`` (ours: L_sc divided by the
            batch's mean |y − ŷ_last|, detached, so α means the same on any CTR level).

    Example:
        >>> import torch
        >>> loss = SelfCorrectionLoss(alpha=0.5)
        >>> logits = torch.zeros(4, requires_grad=True)
        >>> labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
        >>> y_last = torch.tensor([0.9, 0.1, 0.2, 0.8])
        >>> value = loss(logits, labels, y_last)
        >>> value.backward()
        >>> round(value.item(), 4)
        0.4466
    """

    def __init__(self, alpha: float = 0.5, scale: Literal["plain", "normalized"] = "plain") -> None:
        super().__init__()
        self._loss = SelfCorrection(alpha, scale)

    @property
    def alpha(self) -> float:
        return self._loss.alpha

    @property
    def scale(self) -> str:
        return self._loss.scale

    def forward(self, logits: Tensor, labels: Tensor, y_last: Tensor) -> Tensor:
        """The mean loss over the batch.

        Args:
            logits: the new model's logits ``z`` (any shape, usually ``[B]``).
            labels: 0/1 labels, the shape of ``logits``.
            y_last: the previous model's probabilities in [0, 1], the shape of ``logits``.
        """
        _same_shape(logits, labels=labels, y_last=y_last)
        return self._loss(logits, {"label": labels, "y_last": y_last})

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, scale={self.scale!r}"


class DistillationLoss(nn.Module):
    """IncCTR knowledge distillation from the previous model (Wang et al. 2020; METHODS.md "Losses").

    ``L = (1 − β) · BCE(σ(z), y) + β · BCE(σ(z / T), σ(z_teacher / T))``, the teacher's logits
    ``z_teacher`` (the previous model's, on the same rows) carry no gradient.

    Args:
        beta: β in [0, 1]; 0 is plain BCE.
        temperature: T > 0.
    """

    def __init__(self, beta: float = 0.3, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        self._loss = Distill(beta, temperature)

    @property
    def beta(self) -> float:
        return self._loss.beta

    @property
    def temperature(self) -> float:
        return self._loss.temperature

    def forward(self, logits: Tensor, labels: Tensor, teacher_logits: Tensor) -> Tensor:
        """The mean loss over the batch; ``labels`` and ``teacher_logits`` have the shape of ``logits``."""
        _same_shape(logits, labels=labels, teacher_logits=teacher_logits)
        return self._loss(logits, {"label": labels, "teacher": teacher_logits})

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}"


# ========================================================================================= error memory


def error_memory(
    dim: int,
    kind: Literal["sketch", "exact"] = "sketch",
    *,
    lam: float = 0.5,
    reset_on_update: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **options: Any,
) -> Compensator:
    """ReLoop2's error memory and compensator for keys of width ``dim`` (Zhu et al., KDD 2023, §3.2).

    The compensated prediction is ``ŷ' = clip(ŷ + λ·ê, ε, 1 − ε)`` with ``ê`` the base model's error
    estimated from the stored neighbours of the query's key (see :class:`ErrorMemory`).

    Args:
        dim: width of the keys (the representation your model hands over).
        kind: ``"sketch"`` (LSH sketch, fixed memory, the paper's) or ``"exact"`` (ring buffer with
            cosine top-k, the reference).
        lam: λ, the compensation weight (paper: 0.4–0.9).
        reset_on_update: whether :meth:`CompensatedModel.update_model` empties the memory (the
            stored ŷ belong to the old model).
        seed: seeds the sketch's hash planes.
        device: where the memory's state lives.
        **options: any other key of the ``memory:`` config block (``docs/guide/config.md``):
            sketch: ``arrays``, ``bits``, ``similarity``, ``hash_dtype``, ``project``; exact:
            ``size``, ``top_k``; both: ``temperature``, ``gamma``, ``write``, ``error_threshold``,
            ``decay``, ``center``. A wrong key or value raises ``ValueError`` naming it.

    Example:
        >>> comp = error_memory(8, "exact", lam=0.5, size=100, top_k=4)
        >>> h = torch.randn(3, 8)
        >>> comp.feedback(h, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.2, 0.2, 0.2]))
        >>> comp.predict(h, torch.tensor([0.2, 0.2, 0.2]))  # the memory says: these are clicked
        tensor([0.6000, 0.6000, 0.6000])
    """
    if kind not in ("sketch", "exact"):
        raise ValueError(f"kind: expected 'sketch' or 'exact', got {kind!r}")
    own = set((SketchConfig if kind == "sketch" else ExactConfig).model_fields)
    block: dict[str, Any] = {
        kind: {k: v for k, v in options.items() if k in own},
        "lambda": lam,
        "reset_on_update": reset_on_update,
    }
    block.update({k: v for k, v in options.items() if k not in own})
    return build_memory(MemoryConfig.parse(block), dim=dim, seed=seed, device=device)


@dataclass(frozen=True)
class Prediction:
    """One batch served by :class:`CompensatedModel`; hand it back with the labels to ``feedback``.

    Attributes:
        prob: the served (compensated) probabilities ``[B]``.
        base: the base model's probabilities ``[B]`` (what the memory stores with the label).
        key: the representation ``[B, d]`` the memory was queried with.
        error: the estimated error ``ê`` ``[B]`` (0 where the memory had no neighbour).
        support: valid neighbours per row ``[B]`` (0: the base prediction was served unchanged).
    """

    prob: Tensor
    base: Tensor
    key: Tensor
    error: Tensor
    support: Tensor

    def __len__(self) -> int:
        return int(self.prob.shape[0])

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Prediction:
        """The rows at ``index`` (e.g. the requests whose labels arrived); always keeps the batch axis."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index) if not isinstance(index, (slice, Tensor)) else index
        return Prediction(self.prob[idx], self.base[idx], self.key[idx], self.error[idx], self.support[idx])


ModelOutput = Callable[..., tuple[Tensor, Tensor]]


class CompensatedModel:
    """ReLoop2's fast loop around *your* model: query the error memory at serving time, write labels
    as they arrive (Zhu et al., KDD 2023, §3.2; the service and ``reloop run`` use the same
    :class:`Compensator`).

    The key ``h`` is either returned by the model (``model(*inputs) -> (logits, h)``) or caught as
    the input of one of its layers (``key_layer``, e.g. the output layer: the paper keys on "a hidden
    layer"). The model is called under ``torch.no_grad()``; put it in ``eval()`` mode yourself.

    Args:
        model: any callable module.
        compensator: from :func:`error_memory`; its width must be the key's.
        key_layer: a submodule (or its dotted name in ``model``) whose *input* is the key,
            flattened to ``[B, d]``. When ``None``, the model must return ``(output, h)``. Give
            the name when ``update_model`` will swap in another model: it is looked up again there.
        output: whether the model's output is ``"logits"`` or ``"probs"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> served = CompensatedModel(net, error_memory(8, "exact", size=64, top_k=8), key_layer="2")
        >>> x = torch.randn(5, 4)
        >>> pred = served.predict(x)        # the memory is empty: the base model is served
        >>> bool(torch.allclose(pred.prob, pred.base, atol=1e-6))
        True
        >>> served.feedback(pred, torch.ones(5))
        >>> again = served.predict(x)       # same rows, now known to be clicked
        >>> bool((again.prob > again.base).all())
        True
    """

    def __init__(
        self,
        model: nn.Module | ModelOutput,
        compensator: Compensator,
        *,
        key_layer: str | nn.Module | None = None,
        output: Literal["logits", "probs"] = "logits",
    ) -> None:
        if not isinstance(compensator, Compensator):
            raise TypeError(f"compensator: expected a Compensator (see error_memory), got {type(compensator).__name__}")
        if output not in ("logits", "probs"):
            raise ValueError(f"output: expected 'logits' or 'probs', got {output!r}")
        self.model = model
        self.compensator = compensator
        self.output = output
        self._key_layer = key_layer
        self._layer = self._resolve_layer(model, key_layer)

    @staticmethod
    def _resolve_layer(model: Any, key_layer: str | nn.Module | None) -> nn.Module | None:
        if key_layer is None or isinstance(key_layer, nn.Module):
            return key_layer
        if not isinstance(model, nn.Module):
            raise TypeError("key_layer: a layer name needs an nn.Module model; pass the layer itself")
        try:
            return model.get_submodule(key_layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"key_layer: {key_layer!r} is not a submodule of the model; it has {names}") from None

    @property
    def memory(self) -> ErrorMemory:
        return self.compensator.memory

    def _forward(self, *inputs: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Base probabilities ``[B]`` and keys ``[B, d]``."""
        if self._layer is None:
            out = self.model(*inputs, **kwargs)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError("the model must return (output, h) when no key_layer is given")
            raw, h = out
        else:
            caught: list[Tensor] = []
            handle = self._layer.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
            try:
                raw = self.model(*inputs, **kwargs)
            finally:
                handle.remove()
            if not caught:
                raise ValueError("key_layer: the layer was not called by the model's forward")
            raw = raw[0] if isinstance(raw, tuple) else raw
            h = caught[-1]
        raw = raw.reshape(h.shape[0], -1)
        if raw.shape[1] != 1:
            raise ValueError(f"the model's output must have one value per row, got {tuple(raw.shape)}")
        raw = raw[:, 0].float()
        p = torch.sigmoid(raw) if self.output == "logits" else raw
        return p, h.reshape(h.shape[0], -1).float()

    @torch.no_grad()
    def predict(self, *inputs: Any, **kwargs: Any) -> Prediction:
        """Serve a batch: the base prediction, compensated by what the memory holds (reads only)."""
        p, h = self._forward(*inputs, **kwargs)
        prob, e_hat, support = self.compensator.predict_with_support(h, p)
        return Prediction(prob, p, h, e_hat, support)

    def feedback(self, prediction: Prediction, labels: Tensor) -> None:
        """Write the labels of served rows (``prediction`` or a slice of it, e.g. ``pred[idx]``)."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != len(prediction):
            raise ValueError(f"labels: expected {len(prediction)} labels for the prediction, got {labels.shape[0]}")
        self.compensator.feedback(prediction.key, labels, prediction.base)

    def update_model(self, model: nn.Module | ModelOutput | None = None) -> None:
        """Call after the base model changed (retrained, or ``model`` replaces it): the memory is
        emptied when the compensator was built with ``reset_on_update``."""
        if model is not None:
            self.model = model
            if isinstance(self._key_layer, str):  # a layer given as a module stays that module
                self._layer = self._resolve_layer(model, self._key_layer)
        self.compensator.on_model_update()

    def __repr__(self) -> str:
        return f"CompensatedModel(model={type(self.model).__name__}, compensator={self.compensator!r})"


# ============================================================================================ generators

Batch = Mapping[str, Tensor]
ForwardFn = Callable[[nn.Module, Batch], Tensor]


def _default_forward(module: nn.Module, batch: Batch) -> Tensor:
    return cast(Tensor, module(**{k: v for k, v in batch.items() if k != "label"}))


class _ModuleAdapter(nn.Module):
    """Presents any ``nn.Module`` as the generators' model: ``forward(batch) -> logits [B]`` and
    ``param_groups`` (``nn.Embedding`` / ``nn.EmbeddingBag`` weights are id-indexed tables)."""

    def __init__(self, module: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.module = module
        self._user_forward = forward

    def forward(self, batch: Batch, with_hidden: bool = False) -> Tensor:
        if with_hidden:
            raise NotImplementedError("MetaGenerator models have no hidden representation")
        out = self._user_forward(self.module, batch)
        label = batch.get("label")
        return out.reshape(label.shape) if label is not None else out.reshape(-1)

    def param_groups(self) -> dict[str, str]:
        groups: dict[str, str] = {}
        for mod_name, mod in self.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                groups[full] = "embedding" if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) else "dense"
        return groups


class _Periods:
    """The labelled periods given to ``MetaGenerator.learn``, readable as the generators' History."""

    def __init__(self) -> None:
        self.upto = 0
        self._data: dict[int, PeriodTensors] = {}

    def add(self, t: int, rows: PeriodTensors) -> None:
        self._data[t] = rows
        self.upto = t

    def drop_before(self, t: int) -> None:
        for key in [k for k in self._data if k < t]:
            del self._data[key]

    def period(self, i: int) -> PeriodTensors:
        if i > self.upto:
            raise LookAheadError(f"period {i} is in the future (data known up to period {self.upto})")
        if i not in self._data:
            raise ValueError(
                f"MetaGenerator: the generator needs the data of period {i}, which was never given "
                "to learn(); call learn() after every observe()"
            )
        return self._data[i]


class MetaGenerator:
    """ASMG's meta model generator (or SML's transfer) over any ``nn.Module``'s parameters.

    The timeline of ASMG's Algorithm 1 (Peng et al., RecSys 2021), with period t's data ``D_t``::

        train your model on D_t            (your code, any loss)
        gen.observe(model)                 Θ_t is snapshotted
        serving = gen.serving_model()      Θ*_t = M_ω(Θ_{t−k+1..t}) serves D_{t+1}
        ... D_{t+1} is served, its labels arrive ...
        gen.learn(D_{t+1})                 M_ω is trained on D_{t+1} (base models frozen)

    Until the generator was trained ``warmup`` times on ``k`` observed models, ``serving_model``
    returns the latest observed model itself. Embedding tables (``nn.Embedding``,
    ``nn.EmbeddingBag``) get one generator per embedding dimension shared by all ids; every other
    parameter one per coordinate (METHODS-notes §3.4). The generator trains on BCE of the logits.

    Args:
        generator: the ``generator:`` config value: ``"asmg_gru"``, ``"asmg_linear"``, ``"sml"``,
            ``"identity"``, or a one-key mapping with options, e.g.
            ``{"asmg_gru": {"k": 3, "hidden": 4, "variant": "multi", "lr": 0.01}}``
            (``docs/guide/config.md``, ``generator``).
        forward: ``forward(module, batch) -> logits`` for one batch (a mapping of tensors with a
            ``label`` entry). Default: ``module(**inputs)`` with every entry but ``label``.
        batch_size: rows per meta-training step.
        seed: added to the generator's own seed (meta initialisation, shuffling).
    """

    def __init__(
        self,
        generator: str | Mapping[str, Any] = "asmg_gru",
        *,
        forward: ForwardFn | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        cfg = dict(generator) if isinstance(generator, Mapping) else generator
        self.generator: ModelGenerator = build_generator(cfg, run_seed=seed)
        self._forward = forward or _default_forward
        self._ctx = SimpleNamespace(train=SimpleNamespace(batch_size=int(batch_size)), on_batch=None)
        self._periods = _Periods()
        self._latest: _ModuleAdapter | None = None
        self.t = 0

    @property
    def ready(self) -> bool:
        """Whether ``serving_model`` returns a generated model (else the latest observed one)."""
        return bool(getattr(self.generator, "ready", False))

    @property
    def n_observed(self) -> int:
        return self.t

    def observe(self, model: nn.Module) -> None:
        """The model trained through the current period, Θ_t (its parameters are copied)."""
        if self._periods.upto < self.t:
            raise ValueError(f"MetaGenerator.observe: learn() was not called with the period Θ_{self.t} served")
        self.t += 1
        self._latest = _ModuleAdapter(model, self._forward)
        self.generator.observe(self.t, self._latest)  # type: ignore[arg-type]

    def serving_model(self) -> nn.Module:
        """Θ*_t, the model to serve the next period: a new module of your model's class holding the
        generated parameters, or the latest observed model itself while the generator warms up."""
        if self._latest is None:
            raise ValueError("MetaGenerator.serving_model: observe() a model first")
        served = self.generator.serving_model(self._latest)  # type: ignore[arg-type]
        return cast(_ModuleAdapter, served).module

    def learn(self, period: Mapping[str, Tensor]) -> None:
        """Train the generator on the labelled data of the period ``serving_model()`` just served.

        ``period`` maps input names to tensors with one row per sample, plus ``label`` (0/1). Data
        given before the first ``observe`` is ignored (no generator needs it).
        """
        if "label" not in period:
            raise ValueError(f"MetaGenerator.learn: the period needs a 'label' entry, got {sorted(period)}")
        if self.t == 0:
            log.debug("MetaGenerator.learn before the first observe(): ignored")
            return
        if self._periods.upto > self.t:
            raise ValueError(f"MetaGenerator.learn: period {self.t + 1} was learned already; observe() the next model")
        device = next((p.device for p in self._latest.parameters()), torch.device("cpu"))  # type: ignore[union-attr]
        rows = PeriodTensors({k: torch.as_tensor(v).to(device) for k, v in period.items()})
        self._periods.add(self.t + 1, rows)
        observed = getattr(self.generator, "observed_periods", None)
        if observed:
            self._periods.drop_before(min(observed) + 1)  # targets are the periods after observed models
        self.generator.learn(cast(History, self._periods), self.t + 1, self._ctx)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (meta parameters, Adam, observed snapshots) plus the period counter."""
        return {"t": self.t, "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; call ``observe`` with the current model before ``serving_model``.

        The labelled periods the generator may still need are not part of the state, so restore only
        into a process that calls ``learn`` after its next ``observe`` as usual."""
        self.generator.load_state_dict(state["generator"])
        self.t = int(state["t"])
        self._periods.upto = self.t


# ============================================================================================= protocol


@dataclass
class Period:
    """One time period of your data, in whatever form your learner takes.

    Attributes:
        inputs: handed as-is to :meth:`Learner.predict` and :meth:`Learner.fit`.
        labels: 0/1 per row.
        users: user id per row, for gAUC (optional).
        truth: the true click probability per row, when known (synthetic data): the oracle.
    """

    inputs: Any
    labels: Tensor | np.ndarray
    users: Tensor | np.ndarray | None = None
    truth: Tensor | np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@runtime_checkable
class Learner(Protocol):
    """What :func:`prequential` needs from your model: two methods."""

    def predict(self, inputs: Any) -> Tensor | np.ndarray:
        """Click probabilities for the rows of ``inputs``, shape ``[n]``."""
        ...

    def fit(self, inputs: Any, labels: Tensor, served: Tensor) -> None:
        """Update on one period. ``served`` are the probabilities that were served for these rows
        (before this fit): ReLoop's ``y_last``."""
        ...


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def prequential(
    learner: Learner,
    periods: Sequence[Period],
    *,
    pretrain: int = 1,
    warmup: int = 0,
    valid: int = 0,
    run: str = "model",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Test-then-train, period by period (ASMG §4.1.3; the protocol of ``reloop run``).

    Periods ``1..pretrain`` only train (``served`` = the learner's own prediction before the fit);
    then every later period is first predicted (scored: AUC, gAUC when ``users`` are given,
    LogLoss), then trained on with those predictions as ``served``. The first scored period is
    labelled ``pretrain`` (the pretrained model serves it), the next ``warmup`` ones ``warmup``, then
    ``valid`` ``valid`` ones, the rest ``test``: choose settings on ``valid``, report ``test``.

    Returns:
        One row per scored period with the columns of ``periods.csv`` (``run``, ``seed``,
        ``period``, ``phase``, ``auc``, ``gauc``, ``logloss``, ``rows``); rows of several runs
        together go to :func:`summarize`, :func:`plot_periods` and :func:`write_periods`.
    """
    if not isinstance(learner, Learner):
        raise TypeError(f"learner: {type(learner).__name__} needs predict(inputs) and fit(inputs, labels, served)")
    if not 1 <= pretrain < len(periods):
        raise ValueError(f"pretrain: must be in [1, {len(periods) - 1}] for {len(periods)} periods, got {pretrain}")
    rows: list[dict[str, Any]] = []
    for i, period in enumerate(periods, start=1):
        labels = torch.as_tensor(_numpy(period.labels)).float().reshape(-1)
        served = torch.as_tensor(_numpy(learner.predict(period.inputs))).float().reshape(-1)
        if served.shape != labels.shape:
            raise ValueError(f"period {i}: predict returned {served.shape[0]} values for {labels.shape[0]} rows")
        if i > pretrain:
            users = _numpy(period.users) if period.users is not None else None
            metrics = period_metrics(labels.numpy(), served.numpy(), users)
            rows.append(
                {"run": run, "seed": seed, "period": i, "phase": phase_of(i, pretrain, warmup, valid), **metrics}
            )
        if i < len(periods):
            learner.fit(period.inputs, labels, served)
    return rows


def oracle_auc(periods: Sequence[Period]) -> dict[int, float]:
    """AUC of the true click probabilities per period (1-based), where ``truth`` is known: the ceiling."""
    return {i: auc(_numpy(p.labels), _numpy(p.truth)) for i, p in enumerate(periods, start=1) if p.truth is not None}


def synthetic_periods(
    periods: int = 12,
    rows_per_period: int = 2000,
    *,
    users: int = 300,
    items: int = 200,
    categories: int = 10,
    seed: int = 0,
    **drift: Any,
) -> list[Period]:
    """reloop's drifting synthetic click stream (``data: {source: synthetic}``) as :class:`Period` s.

    Each period's ``inputs`` is a dict of ``[n]`` int64 tensors: ``user`` in ``[0, users)``, ``item``
    in ``[0, items)``, ``category`` in ``[0, categories)``, ``hour`` in ``[0, 24)``; ``labels`` are
    float 0/1, ``users`` the user ids and ``truth`` the true click probabilities. ``**drift``: any
    other option of the synthetic source (``drift_sigma``, ``switch_share``, ``item_lifetime``, ...,
    ``docs/guide/config.md``).
    """
    from reloop.data.sources.config import SyntheticConfig
    from reloop.data.sources.synthetic import SyntheticWorld

    world = SyntheticWorld(
        SyntheticConfig(
            periods=periods,
            rows_per_period=rows_per_period,
            users=users,
            items=items,
            categories=categories,
            seed=seed,
            **drift,
        )
    )
    a = world.draw()
    out = []
    for t in range(periods):
        sel = a["period"] == t
        item = a["item"][sel]
        inputs = {
            "user": torch.as_tensor(a["user"][sel]),
            "item": torch.as_tensor(item),
            "category": torch.as_tensor(world.item_cat[item].astype(np.int64)),
            "hour": torch.as_tensor(a["hour"][sel].astype(np.int64)),
        }
        out.append(
            Period(inputs, torch.as_tensor(a["label"][sel], dtype=torch.float32), a["user"][sel], a["p_true"][sel])
        )
    return out
