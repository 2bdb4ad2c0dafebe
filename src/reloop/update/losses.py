"""Training losses on logits: CE, IncCTR distillation, ReLoop self-correction.

Each loss is ``loss(logits, batch) -> scalar`` and declares the per-row columns it needs in
``needs`` (``y_last``: the previous model's served probability; ``teacher``: the previous model's
logit), which the update strategy attaches to the training rows before training.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from torch import Tensor

from reloop.data.tensors import Batch
from reloop.registry import POSITIVE, UNIT, NoOptions, Registry, Strict, one_of

#: Where ``y_last`` (the prediction the self-correction term compares with) comes from.
YLast = Literal["served", "previous_model", "compensated"]


class Loss:
    """Base class. A loss joins the ``loss:`` choices with ``@LOSSES.register("name")``; its nested
    ``Options`` hold the weight (the shorthand: ``loss: {distill: 0.3}``) and the options written beside
    it (``loss: {distill: 0.3, temperature: 2}``)."""

    needs: ClassVar[frozenset[str]] = frozenset()
    name: ClassVar[str] = "ce"
    Options: ClassVar[type[Strict]] = NoOptions

    @classmethod
    def from_options(cls, options: Strict) -> Self:
        """The loss of validated ``options``."""
        return cls(**dict(options))

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError


#: The ``loss:`` choices (reloop.registry); options may sit beside the name.
LOSSES: Registry[Loss] = Registry("loss", flat=True)


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Binary cross-entropy on logits (numerically stable), mean over the batch."""

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))


@LOSSES.register("distill")
class Distill(Loss):
    """IncCTR knowledge distillation, KD-self (Wang et al. 2020; METHODS.md "Losses").

    L = (1 − β)·CE(ŷ, y) + β·CE(ŷ, σ(z_teacher / T)), student logits also divided by T (T = 1 default),
    teacher = the previous model Θ_{t−1}, its logits precomputed on the training rows (no gradient).
    """

    needs = frozenset({"teacher"})

    class Options(Strict):
        shorthand = "weight"
        search_space = {"weight": [0.1, 0.3, 0.5]}  # β
        weight: Annotated[float, UNIT] = 0.3  # β; `loss: distill` is `{distill: 0.3}`
        temperature: Annotated[float, POSITIVE] = 1.0

    search_space: ClassVar[dict[str, list[Any]]] = Options.search_space

    @classmethod
    def from_options(cls, options: Strict) -> Self:
        assert isinstance(options, Distill.Options)
        return cls(options.weight, options.temperature)

    def __init__(self, beta: float, temperature: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"loss.distill: β must be in [0, 1], got {beta}")
        self.beta, self.temperature = beta, temperature

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        ce = F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))
        soft = torch.sigmoid(batch["teacher"].to(logits.dtype) / self.temperature).detach()
        kd = F.binary_cross_entropy_with_logits(logits / self.temperature, soft)
        return (1.0 - self.beta) * ce + self.beta * kd


def self_correction_term(p: Tensor, y_last: Tensor, y: Tensor) -> Tensor:
    """ReLoop's per-sample L_sc = y·max(ŷ_last − ŷ, 0) + (1 − y)·max(ŷ − ŷ_last, 0) (Cai et al. 2022).

    Active only where the new model does worse than the last one; ``y_last`` is a constant.
    """
    y_last = y_last.detach().to(p.dtype)
    y = y.to(p.dtype)
    return y * torch.relu(y_last - p) + (1.0 - y) * torch.relu(p - y_last)


@LOSSES.register("self_correction")
class SelfCorrection(Loss):
    """ReLoop: L = α·mean(L_sc) + (1 − α)·CE (METHODS.md "ReLoop self-correction").

    ``scale='normalized'`` **(ours)** divides L_sc by the batch's mean |y − ŷ_last| (detached), putting
    it on a unit scale comparable with CE's nats; ``'plain'`` is the paper's convex blend.
    """

    needs = frozenset({"y_last"})

    class Options(Strict):
        shorthand = "weight"
        search_space = {"weight": [0.1, 0.3, 0.5, 0.7]}  # α; paper: 0.1-0.9
        weight: Annotated[float, UNIT] = 0.5  # α; `loss: self_correction` is `{self_correction: 0.5}`
        scale: Annotated[Literal["plain", "normalized"], one_of("plain", "normalized")] = "plain"
        # read by the step engine when it attaches y_last to the training rows
        y_last: Annotated[YLast, one_of("served", "previous_model", "compensated")] = "served"

    search_space: ClassVar[dict[str, list[Any]]] = Options.search_space

    @classmethod
    def from_options(cls, options: Strict) -> Self:
        assert isinstance(options, SelfCorrection.Options)
        return cls(options.weight, options.scale)

    def __init__(self, alpha: float, scale: str = "plain") -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.self_correction: α must be in [0, 1], got {alpha}")
        if scale not in ("plain", "normalized"):
            raise ValueError(f"loss.scale: expected 'plain' or 'normalized', got {scale!r}")
        self.alpha, self.scale = alpha, scale

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        y = batch["label"].to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits, y)
        if self.alpha == 0.0:
            return ce
        sc = self_correction_term(torch.sigmoid(logits), batch["y_last"], y).mean()
        if self.scale == "normalized":
            sc = sc / (y - batch["y_last"].to(logits.dtype)).abs().mean().clamp(min=1e-3).detach()
        return self.alpha * sc + (1.0 - self.alpha) * ce
