"""FTRL-Proximal (McMahan et al., Ad Click Prediction: a View from the Trenches, KDD 2013): ReLoop's LR baseline.

Per coordinate, with gradient ``g`` and accumulators ``z, n``:

    σ = (sqrt(n + g²) - sqrt(n)) / α
    z ← z + g - σ·w
    n ← n + g²
    w ← 0                                               if |z| ≤ λ1
    w ← -(z - sign(z)·λ1) / ((β + sqrt(n)) / α + λ2)    otherwise

so L1 gives exact zeros. ``n`` starts at 0 and ``z`` at ``-(β/α + λ2)·w_0 - λ1·sign(w_0)``, the value whose
closed form is the initial weight ``w_0``: from a zero initialisation this is exactly Algorithm 1 of the
paper (``z = n = 0``); from a non-zero one the ``β/α`` proximal term is centred at ``w_0`` instead of 0, so
the first step is ``w_0 - α·g/(β + |g|)`` rather than a jump towards 0. As in Algorithm 1 only coordinates
with a non-zero gradient are updated (the features present in the batch); the others, e.g. embedding rows
of ids not in the batch and the padding row, keep their value.

How it is chosen: ``lr`` has ``optimizer: adam | ftrl`` and ``ftrl_alpha/ftrl_beta/ftrl_l1/ftrl_l2`` in
its options; the trainer builds ``make_ftrl(model.parameters(), alpha, beta, l1, l2)`` when
``model.options.optimizer == "ftrl"`` (see :func:`optimizer_for`) and Adam otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import Tensor


class FTRL(torch.optim.Optimizer):
    """FTRL-Proximal with per-coordinate learning rates ``α / (β + sqrt(n))`` and L1/L2 regularisation.

    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opt = FTRL([w], alpha=0.1, beta=1.0)
    >>> (2.0 * w).sum().backward(); opt.step()
    >>> round(float(w), 4)  # n = 4, σ = 20, z = 2, w = -2 / ((1 + 2) / 0.1)
    -0.0667
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        alpha: float = 0.05,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 0.0,
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"ftrl: alpha must be > 0, got {alpha}")
        if beta < 0 or l1 < 0 or l2 < 0:
            raise ValueError(f"ftrl: beta, l1, l2 must be >= 0, got {beta}, {l1}, {l2}")
        super().__init__(params, dict(alpha=alpha, beta=beta, l1=l1, l2=l2))

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One FTRL-Proximal update of every parameter with a gradient; ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha, beta, l1, l2 = group["alpha"], group["beta"], group["l1"], group["l2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                state = self.state[p]
                if not state:
                    state["z"] = -(beta / alpha + l2) * p.detach().clone() - l1 * torch.sign(p.detach())
                    state["n"] = torch.zeros_like(p)
                z, n = state["z"], state["n"]
                n_new = n + g * g
                sigma = (n_new.sqrt() - n.sqrt()) / alpha
                z_new = z + g - sigma * p
                w = -(z_new - torch.sign(z_new) * l1) / ((beta + n_new.sqrt()) / alpha + l2)
                w = torch.where(z_new.abs() <= l1, torch.zeros_like(w), w)
                touched = g != 0
                p.copy_(torch.where(touched, w, p))
                z.copy_(torch.where(touched, z_new, z))
                n.copy_(torch.where(touched, n_new, n))
        return loss


def make_ftrl(
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    alpha: float = 0.05,
    beta: float = 1.0,
    l1: float = 0.0,
    l2: float = 0.0,
) -> FTRL:
    """The FTRL-Proximal optimizer over ``params`` (see the module docstring for the update)."""
    return FTRL(params, alpha=alpha, beta=beta, l1=l1, l2=l2)


def optimizer_for(model: torch.nn.Module) -> FTRL | None:
    """``make_ftrl`` from the model's options when it asks for FTRL (``optimizer: ftrl``), else ``None``."""
    opts = getattr(model, "options", None)
    if opts is None or getattr(opts, "optimizer", "adam") != "ftrl":
        return None
    return make_ftrl(model.parameters(), alpha=opts.ftrl_alpha, beta=opts.ftrl_beta, l1=opts.ftrl_l1, l2=opts.ftrl_l2)
