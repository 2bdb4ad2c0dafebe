"""Model generators: what gets served after period t (METHODS.md "Model generators").

Timeline (ASMG Algorithm 1), driven by the protocol for every generator:
  1. the base update produces Θ_t from D_t;   ``observe(t, Θ_t)``
  2. the generator forms Θ*_t;                 ``serving_model(Θ_t) -> CTRModel`` (serves D_{t+1})
  3. D_{t+1} is served and scored;             (protocol)
  4. only then may the generator learn from D_{t+1}: ``learn(history, t + 1, ctx)`` where
     ``history.upto == t + 1``.
A generator must never read D_{t+1} before step 4 (``History`` raises ``LookAheadError``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol, Self, overload

import torch
from torch import Tensor

from reloop.data.tensors import Batch, History
from reloop.models.base import CTRModel
from reloop.registry import NoOptions, Registry, Strict


class TrainSettings(Protocol):
    """The training setting a generator reads: the base update's batch size."""

    @property
    def batch_size(self) -> int: ...


class LearnContext(Protocol):
    """What ``ModelGenerator.learn`` reads of its context: ``UpdateContext`` (the engine's) is one;
    ``train.batch_size`` sets the optimisation steps per epoch, ``on_batch`` reports progress."""

    @property
    def train(self) -> TrainSettings: ...

    @property
    def on_batch(self) -> Callable[[int], None] | None: ...


@overload
def functional_forward(
    model: CTRModel, params: dict[str, Tensor], batch: Batch, with_hidden: Literal[False] = False
) -> Tensor: ...


@overload
def functional_forward(
    model: CTRModel, params: dict[str, Tensor], batch: Batch, with_hidden: Literal[True]
) -> tuple[Tensor, Tensor]: ...


def functional_forward(
    model: CTRModel, params: dict[str, Tensor], batch: Batch, with_hidden: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Run ``model``'s architecture with substituted parameters (gradients flow into ``params``)."""
    out: Tensor | tuple[Tensor, Tensor] = torch.func.functional_call(
        model, params, (batch,), {"with_hidden": with_hidden}, strict=False
    )
    return out


def materialize(model: CTRModel, params: dict[str, Tensor]) -> CTRModel:
    """A standalone copy of ``model`` holding ``params`` (detached) — what actually serves."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        state = out.state_dict()
        for name, value in params.items():
            state[name].copy_(value.detach())
    out.eval()
    return out


#: The ``generator:`` choices (reloop.registry); ``generator: null`` is ``identity``.
GENERATORS: Registry[ModelGenerator] = Registry("generator", empty="identity")


@GENERATORS.register("identity")
class ModelGenerator:
    """Identity generator and base class: Θ*_t = Θ_t.

    A generator joins the ``generator:`` choices with ``@GENERATORS.register("name")`` and declares its
    options in a nested ``Options`` (``generator: {name: {...}}``).
    """

    name: ClassVar[str] = "identity"
    Options: ClassVar[type[Strict]] = NoOptions

    @classmethod
    def from_options(cls, options: Strict, seed: int = 0) -> Self:
        """The generator of validated ``options``; the run's ``seed`` is added to the option ``seed``, so each
        protocol seed draws its own meta initialisation and shuffling, as it does for the base models."""
        kwargs = options.model_dump()
        if "seed" in kwargs:
            kwargs["seed"] += int(seed)
        return cls(**kwargs)

    def observe(self, t: int, model: CTRModel) -> None:
        """Θ_t exists (after the base update on D_t)."""

    def serving_model(self, model: CTRModel) -> CTRModel:
        """Θ*_t, the model that serves D_{t+1}."""
        return model

    def learn(self, history: History, t_next: int, ctx: LearnContext) -> None:
        """Called after D_{t_next} was served; may train on ``history.period(t_next)``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected state keys {sorted(state)}")


Identity = ModelGenerator
