"""Base-update strategies: which rows a period's training sees, and where it starts from.

Protocol (METHODS.md "Base updates"): after period t the strategy turns Θ_{t−1} into Θ_t using only
data from periods ≤ t (enforced by ``History``). Strategies never mutate the model they are given:
they return a trained copy — unless the caller hands them over (``UpdateContext.owned``: nothing reads
Θ_{t−1} or its optimizer state after the update), in which case a warm start trains that model and
state in place (the same values as the copy: one model and one optimizer state fewer in memory).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Self

import torch
from torch import Tensor

from reloop.data.tensors import History, PeriodTensors
from reloop.models.base import CTRModel
from reloop.registry import NoOptions, Registry, Strict, integer, one_of
from reloop.update.losses import Loss
from reloop.update.trainer import TrainConfig, make_optimizer, predict_rows, train_rows


@dataclass
class UpdateContext:
    """Everything a strategy may use at period t (data only through ``history``)."""

    history: History
    t: int
    loss: Loss
    train: TrainConfig
    generator: torch.Generator
    fresh_model: Callable[[], CTRModel]
    model: CTRModel | None = None  # Θ_{t−1}, the model the update starts from
    served: Tensor | None = None  # served probability per global row (NaN where never served)
    y_last_source: str = "served"  # or "previous_model"
    on_batch: Callable[[int], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # The caller gives up ``model`` and its optimizer state: a warm start may train them in place.
    owned: bool = False


def attach_loss_columns(rows: PeriodTensors, previous: CTRModel, ctx: UpdateContext) -> PeriodTensors:
    """Add the per-row columns the loss needs: ``teacher`` logits and/or ``y_last`` probabilities.

    ``y_last`` is the prediction served for the row when ``y_last_source == 'served'`` (what production
    logs); rows never served (pretraining periods) fall back to the previous model's prediction.
    """
    needs = ctx.loss.needs
    if not needs:
        return rows
    cols: dict[str, Tensor] = {}
    prev_logits: Tensor | None = None
    here = rows.device  # the columns are made where the rows live (the run's device)
    if "teacher" in needs or ctx.y_last_source == "previous_model" or ctx.served is None:
        prev_logits, _ = predict_rows(previous, rows, ctx.train.eval_batch_size, hidden=False, out_device=here)
    if "teacher" in needs:
        assert prev_logits is not None  # computed above whenever the teacher is needed
        cols["teacher"] = prev_logits
    if "y_last" in needs:
        if ctx.y_last_source == "served" and ctx.served is not None:
            # ``served`` (one entry per global row) stays on the CPU: one gather, one copy per update
            row = rows.data["row"]
            y_last = ctx.served[row.to(ctx.served.device)].to(here)
            missing = torch.isnan(y_last)
            if bool(missing.any()):
                if prev_logits is None:
                    prev_logits, _ = predict_rows(
                        previous, rows, ctx.train.eval_batch_size, hidden=False, out_device=here
                    )
                y_last = torch.where(missing, torch.sigmoid(prev_logits), y_last)
        else:
            assert prev_logits is not None  # computed above unless ``served`` is used
            y_last = torch.sigmoid(prev_logits)
        cols["y_last"] = y_last
    return rows.with_columns(**cols)


class UpdateStrategy:
    """Base class: ``update`` = pick rows, start model, train; state via ``state_dict``.

    A strategy joins the ``update:`` choices with ``@UPDATES.register("name")`` and declares its options
    in a nested ``Options`` (:class:`reloop.registry.Strict`), validated once when the config is parsed.
    """

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    Options: ClassVar[type[Strict]] = NoOptions

    @classmethod
    def from_options(cls, options: Strict, seed: int = 0) -> Self:
        """The strategy of validated ``options`` (``seed``: the run's, for strategies that draw)."""
        return cls(**dict(options))

    def training_rows(self, ctx: UpdateContext) -> PeriodTensors:
        """The rows period t trains on (``ctx.model`` is Θ_{t−1}, for strategies that score rows)."""
        raise NotImplementedError

    def shuffles(self, ctx: UpdateContext) -> bool:
        """Whether the training rows are shuffled (SPMF replays in time order)."""
        return True

    def start_model(self, previous: CTRModel, ctx: UpdateContext) -> CTRModel:
        return _warm_start(previous, ctx)

    def epochs(self, ctx: UpdateContext) -> int:
        return ctx.train.epochs

    def update(
        self, model: CTRModel, optim_state: dict[str, Any] | None, ctx: UpdateContext
    ) -> tuple[CTRModel, dict[str, Any] | None]:
        """Return (Θ_t, optimizer state) from Θ_{t−1}; ``model`` and ``optim_state`` are left untouched
        unless ``ctx.owned`` (then a warm start trains them in place and returns them)."""
        if not self.trains:
            return model, optim_state
        if ctx.model is not model:
            ctx = dataclasses.replace(ctx, model=model)
        rows = attach_loss_columns(self.training_rows(ctx), model, ctx)
        new = self.start_model(model, ctx)
        optimizer = make_optimizer(new, ctx.train)
        if optim_state is not None and self.keeps_optimizer:
            # load_state_dict keeps the given tensors (same dtype and device): Adam then steps them in place
            optimizer.load_state_dict(optim_state if ctx.owned else copy.deepcopy(optim_state))
        train_rows(
            new,
            optimizer,
            rows,
            ctx.loss,
            ctx.train,
            ctx.generator,
            epochs=self.epochs(ctx),
            shuffle=self.shuffles(ctx),
            on_batch=ctx.on_batch,
        )
        self.after_update(ctx)
        return new, optimizer.state_dict()

    @property
    def keeps_optimizer(self) -> bool:
        """Whether the optimizer state of Θ_{t−1}'s update carries over to this one."""
        return True

    def after_update(self, ctx: UpdateContext) -> None:
        """Hook for stateful strategies (the replay reservoir absorbs D_t here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected state keys {sorted(state)}")


def _warm_start(previous: CTRModel, ctx: UpdateContext) -> CTRModel:
    """Θ_{t−1} to train from: a copy, or the model itself when the caller handed it over (``ctx.owned``)."""
    return previous if ctx.owned else copy.deepcopy(previous)


#: The ``update:`` choices (reloop.registry).
UPDATES: Registry[UpdateStrategy] = Registry("update")


@UPDATES.register("none")
class NoUpdate(UpdateStrategy):
    """Serve Θ_0 forever: the "never updated" floor."""

    trains = False


@UPDATES.register("incremental")
class Incremental(UpdateStrategy):
    """IU: Θ_t = argmin L(Θ | D_t) starting from Θ_{t−1} (optimizer state carried over)."""

    def training_rows(self, ctx: UpdateContext) -> PeriodTensors:
        return ctx.history.period(ctx.t)


@UPDATES.register("full")
class FullRetrain(UpdateStrategy):
    """Everything up to t. ``start='previous'`` (default): warm start, ``train.epochs`` passes;
    ``start='scratch'``: a fresh model trained ``train.pretrain_epochs`` passes (the costly upper
    reference)."""

    class Options(Strict):
        start: Annotated[Literal["previous", "scratch"], one_of("previous", "scratch")] = "previous"

    def __init__(self, start: str = "previous") -> None:
        self.start = start

    @property
    def keeps_optimizer(self) -> bool:
        return self.start == "previous"

    def training_rows(self, ctx: UpdateContext) -> PeriodTensors:
        return ctx.history.periods(1, ctx.t)

    def start_model(self, previous: CTRModel, ctx: UpdateContext) -> CTRModel:
        return ctx.fresh_model() if self.start == "scratch" else _warm_start(previous, ctx)

    def epochs(self, ctx: UpdateContext) -> int:
        return ctx.train.pretrain_epochs if self.start == "scratch" else ctx.train.epochs


@UPDATES.register("batch")
class BatchWindow(UpdateStrategy):
    """BU-w: from Θ_{t−1}, train on D_{t−w+1} ∪ … ∪ D_t (ASMG §4.1.4); ``update: {batch: w}``."""

    class Options(Strict):
        shorthand = "window"
        search_space = {"window": [2, 3, 5]}
        window: Annotated[int, integer("the window size (an integer ≥ 1)", lambda x: x >= 1)]

    search_space = Options.search_space

    def __init__(self, window: int) -> None:
        self.window = window

    def training_rows(self, ctx: UpdateContext) -> PeriodTensors:
        return ctx.history.periods(ctx.t - self.window + 1, ctx.t)


def n_batches(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)
