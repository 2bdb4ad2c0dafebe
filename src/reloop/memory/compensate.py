"""Error compensation: ``ŷ' = clip(ŷ_q + λ·ê, ε, 1 − ε)`` (ReLoop2, KDD 2023, §3.2, Eqs. 8-9).

The paper clamps to [0, 1]; we clamp to [ε, 1 − ε] so LogLoss stays finite. ``Compensator`` is the
one object the offline protocol and the online service share: they hand it hidden representations
and base predictions, it knows nothing about models.

**Self-tuning λ (ours, issue #15).** With a :class:`LambdaTuner` the compensator learns λ from the
labelled rows it is fed: every candidate λ_j of a grid (λ = 0, the bare model, included) is an expert
predicting ``clip(ŷ + λ_j·ê)``, and a :class:`reloop.combine.Hedge` weights them by their cumulative
log loss on feedback already received. The rows are scored with an ê that existed before their labels
did (the one served, when the caller passes it back, else the memory re-read just before their write),
so a batch's labels only ever move the λ of later batches. See ``docs/methods/reloop2.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from reloop.combine import Hedge
from reloop.memory.base import ErrorMemory

DEFAULT_EPS = 1e-6
#: λ grid of the self-tuning compensator: 0 (off), 0.1, ..., 1.0.
DEFAULT_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))


def rank_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC by the Mann-Whitney rank sum (ties get their average rank); NaN without both classes.

    ``AUC = (Σ_{i: y_i = 1} r_i − P(P + 1)/2) / (P·N)`` with ``r`` the 1-based ranks of ``scores``.
    """
    s = scores.detach().to(torch.float64).flatten()
    y = labels.detach().flatten() > 0.5
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) - 1.0) / 2.0  # average 1-based rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = avg[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def compensate(y_hat: Tensor, e_hat: Tensor, lam: float, eps: float = DEFAULT_EPS) -> Tensor:
    """``clip(ŷ + λ·ê, ε, 1 − ε)``, strictly inside (0, 1).

    Computed in at least float32: in half precision ``1 − 1e-6`` rounds to 1.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps: must be in (0, 0.5), got {eps}")
    dtype = torch.promote_types(torch.promote_types(y_hat.dtype, e_hat.dtype), torch.float32)
    out = y_hat.to(dtype) + lam * e_hat.to(dtype)
    return out.clamp_(eps, 1.0 - eps)


class LambdaTuner:
    """Online choice of λ: Hedge over the experts ``clip(ŷ + λ_j·ê, ε, 1 − ε)``, λ_j in ``grid``.

    Args:
        grid: candidate λ values in [0, 1], distinct; sorted here. Include 0 so the compensator can
            switch itself off.
        eta: Hedge's learning rate per row of log loss (1: the Bayes mixture over the grid).
        share: fixed-share rate α (``reloop.combine.Hedge``): every λ keeps at least α/|grid| of the
            weight, so the choice can move back when the memory's usefulness changes (drift).
        select: ``mix`` serves the mixture ``Σ_j w_j·clip(ŷ + λ_j·ê)`` (the Hedge guarantee applies to
            what is served); ``leader`` serves ``clip(ŷ + λ*·ê)`` with λ* the heaviest λ_j (ties: the
            smallest, so it starts at the smallest λ and is exactly off when λ* = 0; no worst-case bound).
            ``auc`` (ours) serves ``clip(ŷ + λ*·ê)`` with λ* the λ_j that ranks the last ``window`` labelled
            rows best (ROC AUC, the metric the protocol reports; ties: the smallest λ), kept at the
            grid's smallest λ unless it beats it by ``margin`` AUC, and off until ``min_rows`` rows arrived. Log loss can favour a λ that calibrates while it
            reorders rows; ``auc`` backs off whenever compensation hurt the ranking on recent feedback.
        eps: clip margin, the compensator's.
        window, min_rows, margin: ``select: auc`` only (see above).
    """

    def __init__(
        self,
        grid: Sequence[float] = DEFAULT_GRID,
        eta: float = 1.0,
        share: float = 0.0,
        select: Literal["mix", "leader", "auc"] = "mix",
        eps: float = DEFAULT_EPS,
        window: int = 8192,
        min_rows: int = 1024,
        margin: float = 0.001,
    ) -> None:
        values = sorted(float(v) for v in grid)
        if not values or any(not (0.0 <= v <= 1.0 and math.isfinite(v)) for v in values):
            raise ValueError(f"grid: expected values in [0, 1], got {list(grid)}")
        if len(set(values)) != len(values):
            raise ValueError(f"grid: values must be distinct, got {list(grid)}")
        if select not in ("mix", "leader", "auc"):
            raise ValueError(f"select: must be 'mix', 'leader' or 'auc', got {select!r}")
        if window < 1 or min_rows < 1:
            raise ValueError(f"window and min_rows: must be >= 1, got {window}, {min_rows}")
        self.grid = tuple(values)
        self.select = select
        self.eps = float(eps)
        self.hedge = Hedge([f"lambda={v:g}" for v in self.grid], eta=eta, eps=eps, share=share)
        self._lams = torch.tensor(self.grid, dtype=torch.float64)
        # select: auc — the last `window` labelled rows (ŷ, ê as served, y) and the λ they chose
        self.window, self.min_rows, self.margin = int(window), int(min_rows), float(margin)
        self._recent = torch.empty(3, 0, dtype=torch.float32)
        self._chosen = 0.0

    @property
    def lam(self) -> float:
        """The λ being served: ``Σ_j w_j·λ_j`` (``mix``; exact where nothing is clipped) or λ* (``leader``)."""
        if self.select == "auc":
            return self._chosen
        w = self.hedge.weights
        if self.select == "leader":
            return self.grid[int(torch.argmax(w))]  # first maximum: the smallest λ among ties
        return float(w @ self._lams)

    @property
    def weights(self) -> dict[float, float]:
        return dict(zip(self.grid, self.hedge.weights.tolist()))

    def experts(self, y_hat: Tensor, e_hat: Tensor) -> Tensor:
        """``[G, B]``: each grid λ's compensated prediction."""
        return torch.stack([compensate(y_hat, e_hat, lam, self.eps) for lam in self.grid])

    def serve(self, y_hat: Tensor, e_hat: Tensor) -> Tensor:
        """What the compensator serves for base predictions ``ŷ`` and estimates ``ê``; reads only."""
        if self.select in ("leader", "auc"):
            return compensate(y_hat, e_hat, self.lam, self.eps)
        return self.hedge.predict(self.experts(y_hat, e_hat))

    def update(self, y_hat: Tensor, e_hat: Tensor, y: Tensor) -> None:
        """Charge every λ_j its log loss on labelled rows, ``ê`` being an estimate made before ``y`` existed."""
        self.hedge.update(self.experts(y_hat, e_hat), y)
        if self.select == "auc":
            self._choose_by_auc(y_hat, e_hat, y)

    def _choose_by_auc(self, y_hat: Tensor, e_hat: Tensor, y: Tensor) -> None:
        """``select: auc``: λ* = the grid λ whose compensated scores rank the last ``window`` labelled rows
        best (ROC AUC; ties: the smallest λ). λ = 0 (off) until ``min_rows`` rows have arrived. Rows are
        scored with the ê they were served with, so a batch's labels only move later batches' λ."""
        rows = torch.stack(
            [
                y_hat.detach().float().cpu().flatten(),
                e_hat.detach().float().cpu().flatten(),
                y.detach().float().cpu().flatten(),
            ]
        )
        self._recent = torch.cat([self._recent, rows], dim=1)[:, -self.window :]
        if self._recent.shape[1] < self.min_rows:
            return
        p, e, labels = self._recent
        aucs = [rank_auc(compensate(p, e, lam, self.eps), labels) for lam in self.grid]
        if all(math.isnan(a) for a in aucs):
            return
        score = [a if not math.isnan(a) else -1.0 for a in aucs]
        best = max(range(len(self.grid)), key=lambda j: (score[j], -j))
        # switch compensation on (or up) only for a clear ranking gain over the smallest λ (the grid's off)
        self._chosen = self.grid[best] if score[best] >= score[0] + self.margin else self.grid[0]

    def reset(self) -> None:
        self.hedge.reset()
        self._recent = torch.empty(3, 0, dtype=torch.float32)
        self._chosen = 0.0

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "grid": list(self.grid),
            "eta": self.hedge.eta,
            "share": self.hedge.share,
            "select": self.select,
        }
        if self.select == "auc":
            out.update(window=self.window, min_rows=self.min_rows, margin=self.margin)
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"select": self.select, "hedge": self.hedge.state_dict()}
        if self.select == "auc":
            state.update(recent=self._recent.clone(), chosen=self._chosen)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("select") != self.select:
            raise ValueError(
                f"LambdaTuner.load_state_dict: select: state has {state.get('select')!r}, "
                f"this tuner has {self.select!r}"
            )
        self.hedge.load_state_dict(state["hedge"])
        if self.select == "auc":
            self._recent = state["recent"].clone().float()
            self._chosen = float(state["chosen"])

    def __repr__(self) -> str:
        return f"LambdaTuner(select={self.select!r}, lam={self.lam:.3f}, {self.hedge!r})"


class Compensator:
    """An error memory plus the compensation weight λ, fixed or self-tuned.

    ``predict`` reads only; ``feedback`` writes labelled samples once their labels are known. The
    paper's slot protocol is ``predict(slot t+1)`` after ``feedback(slot t)``.

    Args:
        memory: any ``ErrorMemory``.
        lam: λ; 0 gives back the (clipped) base model. Paper: 0.4 to 0.9. Unused with a ``tuner``.
        eps: clip margin.
        reset_on_update: whether ``on_model_update`` empties the memory (the stored ŷ belong to the
            old model, so its errors no longer describe the new one).
        key: which representation callers pass as ``h`` (``CTRModel.forward_key``): ``"hidden"`` or
            ``"embeddings"``. The compensator only carries it, so protocol and service agree.
        tuner: a ``LambdaTuner`` (built with this ``eps``) to learn λ online from the feedback; ``None``
            serves the fixed ``lam`` exactly as before.

    With a tuner, ``on_model_update`` resets the memory (per ``reset_on_update``) but keeps the
    tuner's loss history: it measures whether compensation helps on this stream, evidence a new base
    model does not void; an emptied memory has ê = 0, so every λ scores alike until it refills. Fixed
    share (``share > 0``) is what lets the choice move when it should. ``reset()`` forgets both.
    """

    def __init__(
        self,
        memory: ErrorMemory,
        lam: float = 0.5,
        *,
        eps: float = DEFAULT_EPS,
        reset_on_update: bool = True,
        key: str = "hidden",
        tuner: LambdaTuner | None = None,
    ) -> None:
        if not isinstance(memory, ErrorMemory):
            raise TypeError(f"memory: expected an ErrorMemory, got {type(memory).__name__}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps: must be in (0, 0.5), got {eps}")
        if tuner is None and not lam >= 0.0:
            raise ValueError(f"lam: must be >= 0, got {lam}")
        if tuner is not None and tuner.eps != eps:
            raise ValueError(f"tuner: its eps {tuner.eps} differs from the compensator's {eps}")
        self.memory = memory
        self._lam = float(lam)
        self.eps = float(eps)
        self.reset_on_update = bool(reset_on_update)
        self.key = str(key)
        self.tuner = tuner

    @property
    def adaptive(self) -> bool:
        return self.tuner is not None

    @property
    def lam(self) -> float:
        """The λ served now: the fixed one, or the tuner's current (effective) λ."""
        return self.tuner.lam if self.tuner is not None else self._lam

    @torch.no_grad()
    def predict_with_support(self, h: Tensor, y_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(ŷ', ê, support)`` for queries ``h [B, d]`` with base predictions ``ŷ [B]``.

        Keep ``ê`` and hand it back to ``feedback`` with the batch's labels: a self-tuning
        compensator then scores each λ on exactly what it would have served.
        """
        e_hat, support = self.memory.estimate(h, y_hat)
        if self.tuner is not None:
            return self.tuner.serve(y_hat.detach(), e_hat), e_hat, support
        return compensate(y_hat.detach(), e_hat, self._lam, self.eps), e_hat, support

    @torch.no_grad()
    def predict(self, h: Tensor, y_hat: Tensor) -> Tensor:
        """Compensated probabilities ``[B]``, strictly inside (0, 1)."""
        return self.predict_with_support(h, y_hat)[0]

    @torch.no_grad()
    def feedback(self, h: Tensor, y: Tensor, y_hat: Tensor, e_hat: Tensor | None = None) -> None:
        """Write labelled samples; ``y_hat`` must be the *base* prediction, not the compensated one.

        With a tuner, every λ is first charged its log loss on these rows, using ``e_hat`` — the ê
        that ``predict_with_support`` returned when the rows were served — or, when it is ``None``,
        the memory's estimate read now, *before* the rows are written (it holds only labels that
        arrived earlier, never these rows' own). Without a tuner ``e_hat`` is ignored.
        """
        if self.tuner is not None:
            if e_hat is None:
                e_hat = self.memory.estimate(h, y_hat)[0]
            elif e_hat.shape != y.shape:
                raise ValueError(f"e_hat: expected shape {tuple(y.shape)}, got {tuple(e_hat.shape)}")
            self.tuner.update(y_hat.detach(), e_hat, y)
        self.memory.write(h, y, y_hat)

    def on_model_update(self) -> None:
        """Call after the base model changes; resets the memory when ``reset_on_update`` (λ's history stays)."""
        if self.reset_on_update:
            self.memory.reset()

    def reset(self) -> None:
        """Forget everything: the memory and, when self-tuning, λ's loss history."""
        self.memory.reset()
        if self.tuner is not None:
            self.tuner.reset()

    def _settings(self) -> dict[str, Any]:
        lam: Any = "auto" if self.tuner is not None else self._lam
        mine = {"lambda": lam, "eps": self.eps, "reset_on_update": self.reset_on_update, "key": self.key}
        if self.tuner is not None:
            mine["adapt"] = self.tuner.config()
        return mine

    def state_dict(self) -> dict[str, Any]:
        """Settings, the memory's state and (self-tuning) the tuner's; a fixed λ's state is unchanged."""
        state = {**self._settings(), "memory": self.memory.state_dict()}
        if self.tuner is not None:
            state["tuner"] = self.tuner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore memory (and tuner); λ and the other settings must match (a mismatch raises ValueError)."""
        mine = self._settings()
        bad = [
            f"{k}: state has {state.get(k)!r}, this compensator has {v!r}" for k, v in mine.items() if state.get(k) != v
        ]
        if bad:
            raise ValueError("Compensator.load_state_dict: " + "; ".join(bad))
        self.memory.load_state_dict(state["memory"])
        if self.tuner is not None:
            self.tuner.load_state_dict(state["tuner"])

    def __repr__(self) -> str:
        lam = f"auto: {self.tuner!r}" if self.tuner is not None else self._lam
        return f"Compensator(lam={lam}, key={self.key!r}, memory={self.memory!r})"
