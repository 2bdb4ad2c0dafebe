"""Serve one period batch by batch, as production would: predict, then receive labels.

The error memory (when configured) is read before a batch's labels exist and written with them only
afterwards, ``feedback_delay`` batches later (label latency). A batch's own labels can therefore
never influence its predictions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from reloop.data.tensors import PeriodTensors
from reloop.memory.compensate import Compensator
from reloop.models.base import CTRModel
from reloop.update.trainer import _device_of, _to, rows_on


@dataclass
class Served:
    base: Tensor  # the base model's probability per row (on the CPU)
    final: Tensor  # what was served (compensated when a memory is configured; on the CPU)
    # streamed rows (not PeriodTensors) only: their labels and users, collected while serving (on the CPU)
    labels: Tensor | None = None
    users: Tensor | None = None


@torch.no_grad()
def serve_period(
    model: CTRModel,
    rows: PeriodTensors,
    compensator: Compensator | None = None,
    batch_size: int = 1024,
    feedback_delay: int = 0,
    predict_batch_size: int | None = None,
) -> Served:
    """Predict every row of ``rows`` in order; feed labels back to ``compensator`` after the fact.

    ``batch_size`` is production's batch: the memory is read and written between batches. Without a
    memory nothing happens between batches and the model does not change within a period, so the
    rows are predicted in batches of ``predict_batch_size`` when given and a multiple of ``batch_size``
    (``train.eval_batch_size``: fewer, larger matrix products). Each row then sits at the same offset
    modulo ``batch_size`` in its batch as before; on the CPU (MKL) that gives the same bits for every
    row (``tests/test_protocol_memory_copies.py``), while batches at other offsets (1,000 instead of
    1,024) differ in the last bit. GPU kernels chosen by shape may differ in the last bit.

    Runs on the model's device (the rows are moved there once when they are elsewhere; the
    compensator's memory should live there too); the served probabilities come back to the CPU once,
    at the end of the period.
    """
    model.eval()
    device = _device_of(model)
    rows = rows_on(rows, device)
    base_out, final_out = [], []
    streamed = not isinstance(rows, PeriodTensors)  # rows read from disk: keep what the metrics need
    labels: list[Tensor] = []
    users: list[Tensor] = []
    # (key, label, base prediction, the ê it was served with): a self-tuning λ is scored on what was served
    pending: deque[tuple[Tensor, Tensor, Tensor, Tensor]] = deque()
    if compensator is None and predict_batch_size is not None and predict_batch_size % batch_size == 0:
        batch_size = predict_batch_size
    for batch in rows.batches(batch_size):
        batch = _to(batch, device)
        logits, h = model.forward_key(batch, compensator.key if compensator is not None else "hidden")
        p = torch.sigmoid(logits.float())
        if compensator is not None:
            served, e_hat, _ = compensator.predict_with_support(h.float(), p)
        else:
            served = p
        base_out.append(p)
        final_out.append(served)
        if streamed:
            labels.append(batch["label"])
            if "user" in batch:
                users.append(batch["user"])
        if compensator is not None:
            pending.append((h.float(), batch["label"], p, e_hat))
            while len(pending) > feedback_delay:
                _feedback(compensator, pending.popleft())
    # Labels of the last batches arrive after the period closes: they still reach the memory.
    while pending and compensator is not None:
        _feedback(compensator, pending.popleft())
    if not streamed:
        return Served(torch.cat(base_out).cpu(), torch.cat(final_out).cpu())
    return Served(
        torch.cat(base_out).cpu(),
        torch.cat(final_out).cpu(),
        torch.cat(labels).cpu(),
        torch.cat(users).cpu() if users else None,
    )


def _feedback(compensator: Compensator, item: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    h, y, p, e_hat = item
    compensator.feedback(h, y, p, e_hat=e_hat)
