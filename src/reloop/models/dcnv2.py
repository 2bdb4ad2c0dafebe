"""DCN-V2 (Wang et al., WWW 2021): matrix cross network, optionally low-rank or a mixture of experts."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.interactions import CrossNetMix, CrossNetV2
from reloop.models.layers import MLP, Batch, FeatureEmbedding


class DCNv2Options(ModelOptions):
    """``low_rank: r`` factorises each ``W_l = U_l V_l^T``; ``num_experts > 1`` (needs ``low_rank``) is
    DCN-Mix; ``structure``: cross and deep side by side (``parallel``) or deep on top of cross (``stacked``)."""

    cross_layers: int = Field(default=3, ge=1)
    low_rank: int | None = Field(default=None, ge=1)
    num_experts: int = Field(default=1, ge=1)
    structure: Literal["parallel", "stacked"] = "parallel"

    @model_validator(mode="after")
    def _mixture_needs_rank(self) -> DCNv2Options:
        if self.num_experts > 1 and self.low_rank is None:
            raise ValueError("num_experts > 1 (DCN-Mix) needs low_rank")
        return self


@register_model
class DCNv2(CTRModel):
    """Cross layers ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` on ``x_0 = [v_1..v_F]`` (``W_l = U_l V_l^T``
    with ``low_rank``; DCN-Mix ``x_{l+1} = Σ_i G_i(x_l) x_0 ⊙ (U_i tanh(C_i tanh(V_i^T x_l)) + b_l) + x_l``
    with ``num_experts``). ``h = [x_L, MLP(x_0)]`` (parallel, ``[B, F·d + hidden_units[-1]]``) or
    ``MLP(x_L)`` (stacked, ``[B, hidden_units[-1]]``).
    """

    name = "dcnv2"
    paper = "Wang et al., DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank Systems, WWW 2021"
    Options = DCNv2Options

    def __init__(self, feature_map: FeatureMap, options: DCNv2Options) -> None:
        super().__init__(feature_map, options)
        in_dim = feature_map.num_fields * options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, options.embedding_dim, options.init_std)
        self.cross: CrossNetMix | CrossNetV2
        if options.num_experts > 1:
            assert options.low_rank is not None  # DCNv2Options' validator
            self.cross = CrossNetMix(in_dim, options.cross_layers, options.low_rank, options.num_experts)
        else:
            self.cross = CrossNetV2(in_dim, options.cross_layers, options.low_rank)
        self.stacked = options.structure == "stacked"
        self.mlp = MLP(in_dim, options.hidden_units, options.dropout)
        self.head = nn.Linear(self.mlp.out_dim if self.stacked else in_dim + self.mlp.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        x0 = self.embedding(batch).flatten(1)
        if self.stacked:
            h: Tensor = self.mlp(self.cross(x0))
            return h
        return torch.cat([self.cross(x0), self.mlp(x0)], dim=-1)
