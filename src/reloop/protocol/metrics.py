"""AUC, gAUC and LogLoss, vectorised (numpy), agreeing with scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from reloop import distributed as rd

EPS = 1e-7


def _tie_ranks(scores: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks within each group, ties averaged; returns (order, ranks in that order)."""
    if groups is None:
        groups = np.zeros(len(scores), dtype=np.int64)
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    n = len(s)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    pos = np.arange(n) - group_start + 1.0
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    tie_sum = np.bincount(tie_id, weights=pos)
    tie_cnt = np.bincount(tie_id)
    return order, (tie_sum / tie_cnt)[tie_id]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney with tie-averaged ranks); NaN with one class."""
    y = np.asarray(labels, dtype=np.float64)
    order, ranks = _tie_ranks(np.asarray(scores, dtype=np.float64))
    y = y[order]
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(((ranks * y).sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """gAUC = Σ_u n_u·AUC_u / Σ_u n_u over users with both classes; n_u = the user's rows."""
    y = np.asarray(labels, dtype=np.float64)
    u = np.asarray(users)
    _, u = np.unique(u, return_inverse=True)
    order, ranks = _tie_ranks(np.asarray(scores, dtype=np.float64), u)
    y, u = y[order], u[order]
    n_u = np.bincount(u).astype(np.float64)
    pos_u = np.bincount(u, weights=y)
    neg_u = n_u - pos_u
    rank_pos = np.bincount(u, weights=ranks * y)
    ok = (pos_u > 0) & (neg_u > 0)
    if not ok.any():
        return float("nan")
    auc_u = (rank_pos[ok] - pos_u[ok] * (pos_u[ok] + 1) / 2) / (pos_u[ok] * neg_u[ok])
    return float((n_u[ok] * auc_u).sum() / n_u[ok].sum())


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1 − 1e-7]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def period_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray | None) -> dict[str, float]:
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(labels, probs, users) if users is not None else float("nan"),
        "logloss": logloss(labels, probs),
        "rows": int(len(labels)),
    }


def global_auc(labels: Tensor, scores: Tensor) -> float:
    """Exact AUC over the rows of every rank (gathers labels and scores; ``O(N)`` memory on each rank)."""
    y = rd.all_gather_rows(labels.detach().float().flatten().cpu())
    p = rd.all_gather_rows(scores.detach().float().flatten().cpu())
    return float(auc(y.numpy(), p.numpy()))
