"""One training pass over encoded rows, and batched prediction. Shared by every strategy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Literal, overload

import torch
from pydantic import Field
from torch import Tensor

from reloop import distributed as rd
from reloop.data.tensors import PeriodTensors
from reloop.distributed import unwrap
from reloop.models.base import CTRModel
from reloop.models.ftrl import optimizer_for
from reloop.registry import Strict
from reloop.update.losses import Loss

if TYPE_CHECKING:
    from reloop.data.shards import ShardedPeriod


class TrainConfig(Strict):
    """``train:`` section. ``pretrain_epochs`` trains Θ0 on the pretraining periods."""

    #: base training settings ``reloop tune`` tries with IU on the valid periods (reloop.protocol.tune)
    search_space: ClassVar[dict[str, list[Any]]] = {"lr": [5e-4, 1e-3, 2e-3, 4e-3], "epochs": [1, 2]}
    epochs: int = Field(default=1, ge=1)
    pretrain_epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=1024, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_batch_size: int = Field(default=8192, ge=1)


def make_optimizer(model: CTRModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the papers' optimiser), or FTRL-Proximal when the model asks for it (LR, ReLoop's baseline)."""

    special = optimizer_for(model)
    if special is not None:
        return special
    params = list(model.parameters())
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fused(params))


def _fused(params: Sequence[Tensor]) -> bool | None:
    """Adam's update in one fused kernel per step instead of ~10 ``foreach`` passes over every
    parameter: the same update (up to float rounding), ~6x faster on CPU, where every step also
    updates every row of the (dense) embedding tables."""
    kinds = {p.device.type for p in params}
    if params and len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params):
        return True
    return None  # Adam's default


def _autocast(precision: str, device: torch.device | str = "cpu") -> AbstractContextManager[None]:
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A batch on ``device`` (a no-op for batches already there: the rows were moved beforehand)."""
    if device.type == "cpu" and all(v.device.type == "cpu" for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@overload
def rows_on(rows: PeriodTensors, device: torch.device) -> PeriodTensors: ...


@overload
def rows_on(rows: ShardedPeriod, device: torch.device) -> ShardedPeriod: ...


def rows_on(rows: PeriodTensors | ShardedPeriod, device: torch.device) -> PeriodTensors | ShardedPeriod:
    """In-memory rows (``PeriodTensors``) moved to ``device`` once, so that batches need no copy;
    streaming rows (``ShardedPeriod``) are left as they are (each batch is moved when it is read)."""
    return rows.to(device) if isinstance(rows, PeriodTensors) else rows


def train_rows(
    model: CTRModel,
    optimizer: torch.optim.Optimizer,
    rows: PeriodTensors,
    loss: Loss,
    cfg: TrainConfig,
    generator: torch.Generator,
    epochs: int | None = None,
    shuffle: bool = True,
    on_batch: Callable[[int], None] | None = None,
    data_parallel: Literal["auto", "split", "local", "off"] = "auto",
) -> float:
    """Train ``model`` in place for ``epochs`` passes over ``rows``; returns the mean training loss.

    ``rows`` may be anything with ``batches(batch_size, shuffle, generator)`` and ``len`` (e.g. a
    streaming :class:`reloop.data.shards.ShardedPeriod`). In-memory rows are moved to the model's device
    once per call (nothing is copied when they already live there, as in the protocol); streamed
    batches are moved as they are read.

    Inside a ``torch.distributed`` process group of several processes (``torchrun``; see
    :mod:`reloop.distributed`), ``model`` is wrapped in DDP (unless it already is) and ``data_parallel``
    says how the ranks share the rows:

    - ``split`` (``auto`` for in-memory rows): every rank holds the same ``rows`` and an identically
      seeded ``generator``; each step draws the global batch of ``batch_size`` rows as one process
      would, and this rank trains on ``batch[rank::world]``. Each rank's loss is weighted by its share
      of the batch, so the averaged gradient is the single-process gradient of the whole batch.
    - ``local`` (``auto`` for a rank's share, ``rows.rank_local``): every rank trains its own rows with
      ``batch_size`` per rank; uneven step counts are handled by DDP's ``Join``.
    - ``off``: no gradient averaging (each rank trains alone).

    With ``split`` and ``local`` the returned loss is the mean over every rank's rows.
    """
    mode = data_parallel
    if mode == "auto":
        mode = ("local" if getattr(rows, "rank_local", False) else "split") if rd.is_active() else "off"
    if mode in ("split", "local") and rd.is_active():
        return _train_rows_ddp(model, optimizer, rows, loss, cfg, generator, epochs, shuffle, on_batch, mode)
    inner = rd.unwrap(model)
    device = _device_of(inner)
    rows = rows_on(rows, device)
    inner.train()
    total, count = 0.0, 0
    for _ in range(epochs or cfg.epochs):
        for batch in rows.batches(cfg.batch_size, shuffle=shuffle, generator=generator):
            batch = _to(batch, device)
            with _autocast(cfg.precision, device):
                logits = model(batch)
            value = loss(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward is unannotated
            optimizer.step()
            n = batch["label"].shape[0]
            total += float(value.detach()) * n
            count += n
            if on_batch is not None:
                on_batch(n)
    inner.eval()
    return total / max(count, 1)


def _train_rows_ddp(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: PeriodTensors,
    loss: Loss,
    cfg: TrainConfig,
    generator: torch.Generator,
    epochs: int | None,
    shuffle: bool,
    on_batch: Callable[[int], None] | None,
    mode: str,
) -> float:
    from torch.distributed.algorithms.join import Join, Joinable

    env = rd.current()
    rank, world = env.rank, env.world_size
    inner = rd.unwrap(model)
    ddp = rd.wrap_ddp(model) if model is inner else model
    device = _device_of(inner)
    rows = rows_on(rows, device)
    inner.train()
    total, count = 0.0, 0

    def step(batch: dict[str, Tensor], weight: float) -> int:
        nonlocal total
        batch = _to(batch, device)
        n = batch["label"].shape[0]
        with _autocast(cfg.precision, device):
            logits = ddp(batch)
        if n:
            value = loss(logits.float(), batch)
            scaled = value * weight
            total += float(value.detach()) * n
        else:  # an empty share still joins the gradient all-reduce (with zero gradients)
            scaled = logits.float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        scaled.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward is unannotated
        optimizer.step()
        return n

    for _ in range(epochs or cfg.epochs):
        if mode == "split":
            n_rows = len(rows)
            order = torch.randperm(n_rows, generator=generator) if shuffle else torch.arange(n_rows)
            if isinstance(rows, PeriodTensors) and rows.device.type != "cpu":
                order = order.to(rows.device)  # once per pass: the batches' indices need no copy
            for start in range(0, n_rows, cfg.batch_size):
                global_idx = order[start : start + cfg.batch_size]
                share = global_idx[rank::world]
                # DDP averages over ranks: sum_r (n_r / N) * mean_r = the mean over the global batch
                count += step(rows.take(share).data, share.shape[0] * world / global_idx.shape[0])
                if on_batch is not None:
                    on_batch(global_idx.shape[0])
        else:
            assert isinstance(ddp, Joinable)  # the DDP wrapper
            with Join([ddp]):
                for batch in rows.batches(cfg.batch_size, shuffle=shuffle, generator=generator):
                    n = step(batch, 1.0)
                    count += n
                    if on_batch is not None:
                        on_batch(n)
    inner.eval()
    sums = rd.all_reduce_sums({"loss": total, "n": count})
    return sums["loss"] / max(sums["n"], 1)


@torch.no_grad()
def predict_rows(
    model: CTRModel,
    rows: PeriodTensors,
    batch_size: int = 8192,
    precision: str = "fp32",
    hidden: bool = True,
    out_device: torch.device | str | None = "cpu",
) -> tuple[Tensor, Tensor | None]:
    """Logits ``[N]`` and hidden ``h`` ``[N, d]`` of ``model`` on ``rows`` (eval mode, no grad).

    Computed on the model's device (in-memory rows are moved there once); the outputs are collected
    there and moved to ``out_device`` once at the end (default: the CPU; ``None``: the model's device).
    Outputs are written into preallocated tensors (no per-batch list, no second copy from ``cat``);
    ``hidden=False`` skips ``h`` (returned as None): ``N x d`` floats can outweigh the model.
    """

    inner = unwrap(model)
    assert isinstance(inner, CTRModel)  # a CTRModel, or the one a DDP wrapper holds
    model = inner
    model.eval()
    device = _device_of(model)
    rows = rows_on(rows, device)
    n = len(rows)
    logits = torch.empty(n, dtype=torch.float32, device=device)
    out_h: Tensor | None = None
    start = 0
    for batch in rows.batches(batch_size):
        batch = _to(batch, device)
        with _autocast(precision, device):
            if hidden:
                lo, h = model.forward_hidden(batch)
            else:
                lo, h = model(batch), None
        end = start + lo.shape[0]
        logits[start:end] = lo.float()
        if h is not None:
            if out_h is None:
                out_h = torch.empty((n, h.shape[-1]), dtype=torch.float32, device=device)
            out_h[start:end] = h.float()
        start = end
    if hidden and out_h is None:  # no rows: keep the old shapes ([0], [0, 0]-like)
        out_h = torch.empty((0, 0), dtype=torch.float32, device=device)
    logits = logits[:start]
    if out_device is not None:
        logits = logits.to(out_device)
        out_h = out_h.to(out_device) if out_h is not None else None
    return logits, out_h
