"""Error compensation: ``ŷ' = clip(ŷ_q + λ·ê, ε, 1 − ε)`` (ReLoop2, KDD 2023, §3.2, Eqs. 8-9).

The paper clamps to [0, 1]; we clamp to [ε, 1 − ε] so LogLoss stays finite. ``Compensator`` is the
one object the offline protocol and the online service share: they hand it hidden representations
and base predictions, it knows nothing about models.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reloop.memory.base import ErrorMemory

DEFAULT_EPS = 1e-6


def compensate(y_hat: Tensor, e_hat: Tensor, lam: float, eps: float = DEFAULT_EPS) -> Tensor:
    """``clip(ŷ + λ·ê, ε, 1 − ε)``, strictly inside (0, 1).

    Computed in at least float32: in half precision ``1 − 1e-6`` rounds to 1.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps: must be in (0, 0.5), got {eps}")
    dtype = torch.promote_types(torch.promote_types(y_hat.dtype, e_hat.dtype), torch.float32)
    out = y_hat.to(dtype) + lam * e_hat.to(dtype)
    return out.clamp_(eps, 1.0 - eps)


class Compensator:
    """An error memory plus the compensation weight λ.

    ``predict`` reads only; ``feedback`` writes labelled samples once their labels are known. The
    paper's slot protocol is ``predict(slot t+1)`` after ``feedback(slot t)``.

    Args:
        memory: any ``ErrorMemory``.
        lam: λ; 0 gives back the (clipped) base model. Paper: 0.4 to 0.9.
        eps: clip margin.
        reset_on_update: whether ``on_model_update`` empties the memory (the stored ŷ belong to the
            old model, so its errors no longer describe the new one).
        key: which representation callers pass as ``h`` (``CTRModel.forward_key``): ``"hidden"`` or
            ``"embeddings"``. The compensator only carries it, so protocol and service agree.
    """

    def __init__(self, memory: ErrorMemory, lam: float = 0.5, *, eps: float = DEFAULT_EPS,
                 reset_on_update: bool = True, key: str = "hidden") -> None:
        if not isinstance(memory, ErrorMemory):
            raise TypeError(f"memory: expected an ErrorMemory, got {type(memory).__name__}")
        if not lam >= 0.0:
            raise ValueError(f"lam: must be >= 0, got {lam}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps: must be in (0, 0.5), got {eps}")
        self.memory = memory
        self.lam = float(lam)
        self.eps = float(eps)
        self.reset_on_update = bool(reset_on_update)
        self.key = str(key)

    @torch.no_grad()
    def predict_with_support(self, h: Tensor, y_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(ŷ', ê, support)`` for queries ``h [B, d]`` with base predictions ``ŷ [B]``."""
        e_hat, support = self.memory.estimate(h, y_hat)
        return compensate(y_hat.detach(), e_hat, self.lam, self.eps), e_hat, support

    @torch.no_grad()
    def predict(self, h: Tensor, y_hat: Tensor) -> Tensor:
        """Compensated probabilities ``[B]``, strictly inside (0, 1)."""
        return self.predict_with_support(h, y_hat)[0]

    def feedback(self, h: Tensor, y: Tensor, y_hat: Tensor) -> None:
        """Write labelled samples; ``y_hat`` must be the *base* prediction, not the compensated one."""
        self.memory.write(h, y, y_hat)

    def on_model_update(self) -> None:
        """Call after the base model changes; resets the memory when ``reset_on_update``."""
        if self.reset_on_update:
            self.memory.reset()

    def reset(self) -> None:
        self.memory.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, "eps": self.eps, "reset_on_update": self.reset_on_update,
                "key": self.key, "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the memory; λ and the other settings must match (a mismatch raises ValueError)."""
        mine = {"lambda": self.lam, "eps": self.eps, "reset_on_update": self.reset_on_update, "key": self.key}
        bad = [f"{k}: state has {state.get(k)!r}, this compensator has {v!r}"
               for k, v in mine.items() if state.get(k) != v]
        if bad:
            raise ValueError("Compensator.load_state_dict: " + "; ".join(bad))
        self.memory.load_state_dict(state["memory"])

    def __repr__(self) -> str:
        return f"Compensator(lam={self.lam}, key={self.key!r}, memory={self.memory!r})"
