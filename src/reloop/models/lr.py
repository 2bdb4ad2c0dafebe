"""Logistic regression, ReLoop's LR baseline (trained with Adam or FTRL-Proximal, McMahan et al., KDD 2013)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.layers import Batch, FeatureEmbedding


class LROptions(ModelOptions):
    """``optimizer: ftrl`` asks the trainer for :func:`reloop.models.ftrl.make_ftrl` with the ``ftrl_*``
    hyper-parameters (α, β, λ1, λ2 of McMahan et al. 2013) instead of Adam."""

    optimizer: Literal["adam", "ftrl"] = "adam"
    ftrl_alpha: float = Field(default=0.05, gt=0.0)
    ftrl_beta: float = Field(default=1.0, ge=0.0)
    ftrl_l1: float = Field(default=0.0, ge=0.0)
    ftrl_l2: float = Field(default=0.0, ge=0.0)


@register_model
class LR(CTRModel):
    """``y = w_0 + Σ_i w_{i,x_i}``: one weight per id (per-field ``nn.Embedding`` of dim 1; a numeric
    field contributes ``w_i · x_i``). ``h = [w_{1,x_1}, ..., w_{F,x_F}]``, ``[B, F]``; the head starts at
    all-ones weights so the logit is exactly the sum (the head may then reweight fields).
    """

    name = "lr"
    paper = "McMahan et al., Ad Click Prediction: a View from the Trenches, KDD 2013"
    Options = LROptions

    def __init__(self, feature_map: FeatureMap, options: LROptions) -> None:
        super().__init__(feature_map, options)
        self.linear = FeatureEmbedding(feature_map, 1, options.init_std)
        self.head = nn.Linear(feature_map.num_fields, 1)
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def body(self, batch: Batch) -> Tensor:
        h: Tensor = self.linear(batch).squeeze(-1)
        return h
