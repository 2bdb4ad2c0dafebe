"""Online aggregation of K candidate predictors by their prequential log loss (Hedge / EWA).

The exponentially weighted average forecaster (Cesa-Bianchi & Lugosi, *Prediction, Learning, and
Games*, 2006, §2.1 and §3.3) serves the mixture of the experts' probabilities

    p_mix = Σ_k w_k · clip(p_k, ε, 1 − ε),       w_k ∝ π_k · exp(−η · L_k)

where ``L_k`` is expert k's cumulative log loss on rows whose labels have *already arrived* and π the
prior (uniform by default). ``predict`` only reads the weights; ``update`` scores a labelled batch
under the weights that served it, then moves the weights. A batch's labels therefore only reach
predictions made after its ``update``.

**Fixed share** (Herbster & Warmuth, 1998; Cesa-Bianchi & Lugosi §5.2), ``share = α > 0``: after each
update ``w ← (1 − α)·w + α·π``, so no expert's weight falls below α·π_k and the mixture can follow a
best expert that changes over time (drift).

Guarantees (proved in ``docs/methods/combine.md``; ``T`` = number of ``update`` calls, ``B_b`` the
rows of update b, ``ℓ_kb`` expert k's log loss summed over batch b, ``R_b = max_k ℓ_kb − min_k ℓ_kb``),
for every expert k and every label sequence, with ``L_mix`` the mixture's cumulative log loss::

    (a) always:              L_mix ≤ L_k + [ln(1/π_k) + (T − 1)·ln(1/(1 − α))] / η + (η/8)·Σ_b R_b²
    (b) when η·B_b ≤ 1 ∀b:   L_mix ≤ L_k + [ln(1/π_k) + (T − 1)·ln(1/(1 − α))] / η

(b) is the exp-concavity bound (log loss is 1-exp-concave); with one row per update, η = 1, α = 0 and a
uniform prior it is the classical ``L_mix ≤ min_k L_k + ln K``. Clipping makes every row's loss at most
``ln(1/ε)``, so ``R_b ≤ B_b·ln((1 − ε)/ε)`` and (a) is never vacuous. :meth:`Hedge.guarantee` returns
the tighter of the two for the data seen so far.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from reloop.registry import Strict

log = logging.getLogger(__name__)

DEFAULT_EPS = 1e-6

__all__ = ["CombineOptions", "Hedge", "HedgeOptions", "log_loss"]


def log_loss(p: Tensor, y: Tensor) -> Tensor:
    """Per-row log loss ``−[y·ln p + (1 − y)·ln(1 − p)]`` in float64, broadcast over leading dims.

    ``p`` must already lie strictly inside (0, 1) (callers clip); ``y`` may be soft labels in [0, 1].
    """
    p = p.to(torch.float64)
    y = y.to(torch.float64)
    return -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p))


class Hedge:
    """Exponentially weighted average of K experts' probabilities, with optional fixed share.

    Args:
        names: one name per expert (row k of ``probs`` is expert ``names[k]``); unique, K ≥ 1.
        eta: learning rate η > 0 (per row of log loss). η = 1 is the Bayes mixture; the exp-concave
            bound (b) needs ``η·B ≤ 1`` for updates of B rows.
        eps: every expert's probability is clipped to ``[ε, 1 − ε]`` before mixing and scoring, so a
            row's loss is at most ``ln(1/ε)``.
        share: fixed-share rate α in [0, 1): after each update ``w ← (1 − α)·w + α·π``.
        prior: π, one positive number per expert (normalised here); ``None`` is uniform.

    Non-finite expert probabilities (a diverged model) are read as 0.5 in both ``predict`` and
    ``update`` (one warning per instance), so the mixture stays finite and the bounds hold for the
    expert as read.
    """

    def __init__(
        self,
        names: Sequence[str],
        eta: float = 1.0,
        eps: float = DEFAULT_EPS,
        share: float = 0.0,
        prior: Sequence[float] | None = None,
    ) -> None:
        names = tuple(str(n) for n in names)
        if not names:
            raise ValueError("names: need at least one expert")
        if len(set(names)) != len(names):
            raise ValueError(f"names: must be unique, got {list(names)}")
        if not (eta > 0 and math.isfinite(eta)):
            raise ValueError(f"eta: must be a finite number > 0, got {eta}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps: must be in (0, 0.5), got {eps}")
        if not 0.0 <= share < 1.0:
            raise ValueError(f"share: must be in [0, 1), got {share}")
        if prior is None:
            pi = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
        else:
            pi = torch.as_tensor(list(prior), dtype=torch.float64)
            if pi.shape != (len(names),) or not bool(torch.isfinite(pi).all()) or not bool((pi > 0).all()):
                raise ValueError(f"prior: expected {len(names)} finite numbers > 0, got {list(prior)}")
            pi = pi / pi.sum()
        self.names = names
        self.eta = float(eta)
        self.eps = float(eps)
        self.share = float(share)
        self._log_prior = pi.log()
        self._warned = False
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the prior; forget every loss seen."""
        K = len(self.names)
        self._log_w = self._log_prior.clone()  # normalised: logsumexp = 0
        self._loss = torch.zeros(K, dtype=torch.float64)  # L_k, cumulative
        self._mix_loss = 0.0  # L_mix, cumulative, under the weights before each update
        self._sum_range2 = 0.0  # Σ_b R_b²
        self._max_rows = 0  # max_b B_b
        self._rows = 0
        self._updates = 0

    @property
    def K(self) -> int:
        return len(self.names)

    @property
    def weights(self) -> Tensor:
        """Current weights ``[K]`` (float64, a copy), summing to 1."""
        return torch.softmax(self._log_w, 0)

    @property
    def losses(self) -> dict[str, float]:
        """Cumulative log loss of each expert on every row passed to ``update``."""
        return dict(zip(self.names, self._loss.tolist()))

    @property
    def mixture_loss(self) -> float:
        """Cumulative log loss of the mixture, each batch scored under the weights it was served with."""
        return self._mix_loss

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def updates(self) -> int:
        return self._updates

    # ------------------------------------------------------------------ prediction and update
    def _clean(self, probs: Tensor) -> Tensor:
        if not isinstance(probs, Tensor) or probs.dim() != 2 or probs.shape[0] != self.K:
            shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
            raise ValueError(f"probs: expected a tensor [{self.K}, B], got {shape}")
        p = probs.detach().to(torch.float64)
        bad = ~torch.isfinite(p)
        if bool(bad.any()):
            if not self._warned:
                who = [self.names[k] for k in range(self.K) if bool(bad[k].any())]
                log.warning("Hedge: non-finite probabilities from %s read as 0.5", who)
                self._warned = True
            p = p.masked_fill(bad, 0.5)
        return p.clamp(self.eps, 1.0 - self.eps)

    @torch.no_grad()
    def predict(self, probs: Tensor) -> Tensor:
        """The mixture ``Σ_k w_k · clip(p_k) [B]`` of experts' probabilities ``probs [K, B]``; reads only.

        Returned in ``probs``' floating dtype (at least float32), on ``probs``' device; strictly inside
        (0, 1) and finite whatever the inputs.
        """
        p = self._clean(probs)
        out = torch.softmax(self._log_w, 0).to(p.device) @ p
        dtype = torch.promote_types(probs.dtype, torch.float32) if probs.is_floating_point() else torch.float32
        return out.clamp(self.eps, 1.0 - self.eps).to(dtype)

    @torch.no_grad()
    def update(self, probs: Tensor, y: Tensor) -> Tensor:
        """Score a labelled batch and move the weights: ``log w_k −= η·ℓ_k``, normalise, share.

        Args:
            probs: ``[K, B]`` each expert's probability for the B rows, as it was served.
            y: ``[B]`` labels in [0, 1].

        Returns:
            ``ℓ [K]``: each expert's log loss summed over the batch (float64).
        """
        p = self._clean(probs).cpu()  # [K, B] to the CPU once: the weights are K numbers
        y = torch.as_tensor(y).detach().to(device="cpu", dtype=torch.float64)
        if y.shape != (p.shape[1],):
            raise ValueError(f"y: expected shape [{p.shape[1]}], got {tuple(y.shape)}")
        if p.shape[1] and not bool(((y >= 0) & (y <= 1)).all()):
            raise ValueError("y: values must lie in [0, 1]")
        B = int(p.shape[1])
        if B == 0:
            return torch.zeros(self.K, dtype=torch.float64)
        w = torch.softmax(self._log_w, 0)
        mix = (w @ p).clamp(self.eps, 1.0 - self.eps)
        self._mix_loss += float(log_loss(mix, y).sum())
        ell = log_loss(p, y).sum(1)  # [K]
        self._loss += ell
        self._sum_range2 += float(ell.max() - ell.min()) ** 2
        self._max_rows = max(self._max_rows, B)
        self._rows += B
        self._updates += 1
        log_w = self._log_w - self.eta * (ell - ell.min())  # shifting by a constant keeps precision
        log_w = log_w - torch.logsumexp(log_w, 0)
        if self.share > 0.0:
            log_w = torch.logaddexp(log_w + math.log1p(-self.share), self._log_prior + math.log(self.share))
            log_w = log_w - torch.logsumexp(log_w, 0)  # exact already; removes rounding drift
        self._log_w = log_w
        return ell

    # ------------------------------------------------------------------ guarantees
    def regret_bound(self, name: str) -> float:
        """Upper bound on ``mixture_loss − losses[name]`` for the data seen so far (module docstring)."""
        k = self.names.index(name)
        stay = max(self._updates - 1, 0) * -math.log1p(-self.share)  # the comparator never switches
        complexity = (-float(self._log_prior[k]) + stay) / self.eta
        if self.eta * self._max_rows <= 1.0:  # (b) exp-concave: no range term
            return complexity
        return complexity + self.eta * self._sum_range2 / 8.0  # (a) Hoeffding

    def guarantee(self) -> float:
        """``min_k (L_k + regret_bound(k))``: what ``mixture_loss`` cannot exceed, whatever the labels."""
        return min(float(self._loss[k]) + self.regret_bound(n) for k, n in enumerate(self.names))

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "eta": self.eta,
            "eps": self.eps,
            "share": self.share,
            "log_prior": self._log_prior.tolist(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Configuration, weights and loss accounting; ``load_state_dict`` restores it exactly."""
        return {
            **self.config(),
            "log_w": self._log_w.clone(),
            "loss": self._loss.clone(),
            "mix_loss": self._mix_loss,
            "sum_range2": self._sum_range2,
            "max_rows": self._max_rows,
            "rows": self._rows,
            "updates": self._updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s output; a state from another configuration raises ValueError."""
        bad = [
            f"{k}: state has {state.get(k)!r}, this Hedge has {v!r}"
            for k, v in self.config().items()
            if state.get(k) != v
        ]
        if bad:
            raise ValueError("Hedge.load_state_dict: " + "; ".join(bad))
        for key in ("log_w", "loss"):
            t = state[key]
            if not isinstance(t, Tensor) or t.shape != (self.K,):
                raise ValueError(f"Hedge.load_state_dict: {key}: expected a tensor [{self.K}]")
        self._log_w = state["log_w"].to(torch.float64).clone()
        self._loss = state["loss"].to(torch.float64).clone()
        self._mix_loss = float(state["mix_loss"])
        self._sum_range2 = float(state["sum_range2"])
        self._max_rows = int(state["max_rows"])
        self._rows = int(state["rows"])
        self._updates = int(state["updates"])

    def __repr__(self) -> str:
        w = ", ".join(f"{n}={v:.3f}" for n, v in zip(self.names, self.weights.tolist()))
        return f"Hedge(eta={self.eta}, share={self.share}, weights: {w})"


# ---------------------------------------------------------------------- config
class HedgeOptions(Strict):
    """``combine.hedge``: the learning rate η, the clip ε, the fixed-share rate α and the prior π.

    ``prior`` gives named experts a relative prior weight; every expert it does not name weighs 1, and
    the weights are normalised. ``prior: {IU: 4}`` over five experts starts IU at π = 4/8 = 0.5, which
    tightens the regret bound against IU from ``ln 5 / η`` to ``ln 2 / η`` (and loosens it against each
    other expert from ``ln 5 / η`` to ``ln 8 / η``).
    """

    eta: float = Field(default=1.0, gt=0.0)
    eps: float = Field(default=DEFAULT_EPS, gt=0.0, lt=0.5)
    share: float = Field(default=0.0, ge=0.0, lt=1.0)
    prior: dict[str, float] | None = None

    @field_validator("eta")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @field_validator("prior")
    @classmethod
    def _prior(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            bad = sorted(k for k, w in v.items() if not (math.isfinite(w) and w > 0))
            if bad:
                raise ValueError(f"weights must be finite numbers > 0: {bad}")
        return v

    def prior_of(self, names: Sequence[str]) -> list[float] | None:
        """π over ``names`` (unnormalised): ``prior[name]``, or 1 for an expert ``prior`` does not name."""
        if self.prior is None:
            return None
        unknown = sorted(set(self.prior) - set(names))
        if unknown:
            raise ValueError(f"prior: {unknown} are not experts of this combination (experts: {list(names)})")
        return [self.prior.get(n, 1.0) for n in names]

    def build(self, names: Sequence[str]) -> Hedge:
        return Hedge(names, eta=self.eta, eps=self.eps, share=self.share, prior=self.prior_of(names))


#: Replicas of one run a ``combine:`` block may ask for (each costs a pretraining and a chain).
MAX_REPLICAS = 4


def replica_name(run: str, k: int) -> str:
    """The expert name of ``run``'s k-th replica (k ≥ 1): trained from the Θ0 of seed + k."""
    return f"{run}.r{k}"


class CombineOptions(Strict):
    """The ``combine:`` block of a run: which runs are the experts and how they are weighted::

        combine: {experts: [IU, ReLoop, ReLoop2, ASMG], hedge: {eta: 1.0, eps: 1.0e-6, share: 0.0}}

    ``experts: null`` (the default) means every other run of the config.

    ``replicas: {IU: 1}`` also mixes the run ``IU`` trained again from the Θ0 of the next seed (seed + 1,
    with that seed's random stream), named ``IU.r1`` (``IU.r2`` … for more): an expert that disagrees
    with the others for another reason than its remedy, so the mixture also averages initialisation
    noise away (an ensemble). Its fair baseline is then an equal-size ensemble, not IU alone.
    """

    experts: list[str] | None = None
    replicas: dict[str, Annotated[int, Field(ge=1, le=MAX_REPLICAS)]] = Field(default_factory=dict)
    hedge: HedgeOptions = Field(default_factory=HedgeOptions)

    @model_validator(mode="after")
    def _experts(self) -> CombineOptions:
        if self.experts is not None:
            if not self.experts:
                raise ValueError("experts: need at least one run")
            dup = sorted({e for e in self.experts if self.experts.count(e) > 1})
            if dup:
                raise ValueError(f"experts: each run once, repeated: {dup}")
        return self

    def build(self, names: Sequence[str]) -> Hedge:
        """The ``Hedge`` over ``names`` (the experts, in the row order of ``probs``)."""
        return self.hedge.build(names)
