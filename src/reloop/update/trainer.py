"""One training pass over encoded rows, and batched prediction. Shared by every strategy."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from reloop.data.tensors import PeriodTensors
from reloop.models.base import CTRModel
from reloop.update.losses import Loss


class TrainConfig(BaseModel):
    """``train:`` section. ``pretrain_epochs`` trains Θ0 on the pretraining periods."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=1, ge=1)
    pretrain_epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=1024, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_batch_size: int = Field(default=8192, ge=1)


def make_optimizer(model: CTRModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the papers' optimiser), or FTRL-Proximal when the model asks for it (LR, ReLoop's baseline)."""
    from reloop.models.ftrl import optimizer_for

    return optimizer_for(model) or torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def train_rows(model: CTRModel, optimizer: torch.optim.Optimizer, rows: PeriodTensors, loss: Loss,
               cfg: TrainConfig, generator: torch.Generator, epochs: int | None = None,
               shuffle: bool = True, on_batch: Callable[[int], None] | None = None) -> float:
    """Train ``model`` in place for ``epochs`` passes over ``rows``; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs or cfg.epochs):
        for batch in rows.batches(cfg.batch_size, shuffle=shuffle, generator=generator):
            with _autocast(cfg.precision):
                logits = model(batch)
            value = loss(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            n = batch["label"].shape[0]
            total += float(value.detach()) * n
            count += n
            if on_batch is not None:
                on_batch(n)
    model.eval()
    return total / max(count, 1)


@torch.no_grad()
def predict_rows(model: CTRModel, rows: PeriodTensors, batch_size: int = 8192,
                 precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Logits ``[N]`` and hidden ``h`` ``[N, d]`` of ``model`` on ``rows`` (eval mode, no grad)."""
    model.eval()
    logits, hidden = [], []
    for batch in rows.batches(batch_size):
        with _autocast(precision):
            lo, h = model.forward_hidden(batch)
        logits.append(lo.float())
        hidden.append(h.float())
    return torch.cat(logits), torch.cat(hidden)
