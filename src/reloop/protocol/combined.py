"""A ``combine:`` run: the Hedge mixture (``reloop.combine``) of several runs' served predictions.

A run with ``combine: {experts: [...], hedge: {...}}`` is trained like any other run (its own update,
loss, generator and memory: usually the stack of every remedy); what it *serves* is the online mixture
of its own prediction and its experts' (the named runs of the same config, same seed). Within each
served period the rows are predicted batch by batch (``protocol.serve_batch_size``) and a batch's
labels update the weights only ``protocol.feedback_delay`` batches later, exactly as the error memory
sees them (:func:`reloop.protocol.serving.serve_period`), and the weights carry over from period to
period. Each expert's served predictions do not depend on the mixture, so the mixture is computed from
them after the runs, with the result the live loop would have given.

Guarantee (``docs/methods/combine.md``): with ``feedback_delay = 0`` the served mixture's cumulative log
loss is within ``[ln K + (T−1)·ln(1/(1−α))]/η + (η/8)·Σ_b R_b²`` of the best expert's, over the served
rows (with a delay, ``Hedge.mixture_loss`` is not the served loss: the metrics are computed on what was
served).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from reloop.combine import CombineOptions, Hedge
from reloop.config import Config
from reloop.data.periods import phase_of
from reloop.data.tensors import Stream
from reloop.protocol.metrics import period_metrics


def combine_served(
    cfg: Config,
    stream: Stream,
    name: str,
    served: dict[str, Tensor],
    seed: int,
    options: CombineOptions,
    last_period: int | None = None,
) -> tuple[list[dict[str, Any]], Hedge, Tensor]:
    """Per-period metric rows of the mixture of ``served[expert]`` (served probability per global row).

    Returns the rows (one per served period, as ``run_one``'s, with each expert's weight at the end of
    the period under ``weights``), the final ``Hedge`` and the mixture served per global row (NaN
    outside the served periods). ``last_period`` stops early (e.g. at the last valid period).
    """
    names = list(served)
    hedge = options.build(names)
    p = cfg.protocol
    first = p.pretrain + 1
    last = p.pretrain + p.served_periods + 1 if last_period is None else last_period
    rows: list[dict[str, Any]] = []
    out = torch.full((len(stream.rows),), float("nan"))
    for period in range(first, last + 1):
        start, end = stream.bounds[period - 1]
        part = stream.period(period)
        labels = part.data["label"].float().cpu()
        probs = torch.stack([served[n][start:end].float() for n in names])  # [K, rows]
        if bool(torch.isnan(probs).all(dim=1).any()):
            missing = [n for n, row in zip(names, probs) if bool(torch.isnan(row).all())]
            raise ValueError(f"runs.{name}.combine: no served predictions of {missing} for period {period}")
        mixed = torch.empty(end - start)
        pending: deque[tuple[int, int]] = deque()
        for lo in range(0, end - start, p.serve_batch_size):
            hi = min(lo + p.serve_batch_size, end - start)
            mixed[lo:hi] = hedge.predict(probs[:, lo:hi])
            pending.append((lo, hi))
            while len(pending) > p.feedback_delay:
                a, b = pending.popleft()
                hedge.update(probs[:, a:b], labels[a:b])
        while pending:  # labels of the period's last batches arrive after it closes
            a, b = pending.popleft()
            hedge.update(probs[:, a:b], labels[a:b])
        out[start:end] = mixed
        users = part.data["user"].cpu().numpy() if "user" in part.data else None
        metrics = period_metrics(labels.numpy(), mixed.numpy(), users)
        rows.append(
            {
                "run": name,
                "seed": seed,
                "period": period,
                "phase": phase_of(period, p.pretrain, p.warmup, p.valid),
                **metrics,
                "weights": {n: round(float(w), 6) for n, w in zip(names, hedge.weights)},
            }
        )
    return rows, hedge, out
