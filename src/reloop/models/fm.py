"""Factorization Machines (Rendle, ICDM 2010)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.layers import Batch, FeatureEmbedding, fm_interaction


@register_model
class FM(CTRModel):
    """``y = w_0 + Σ_i w_i + Σ_{i<j} <v_i, v_j>``.

    ``h = [w_1..w_F, ½((Σ_i v_i)² - Σ_i v_i²)]`` (per-field first-order weights, then the ``d`` values of
    the bi-interaction that sum to the pairwise term), ``[B, F + d]``; the head starts at all-ones weights,
    i.e. exactly FM.
    """

    name = "fm"
    paper = "Rendle, Factorization Machines, ICDM 2010"

    def __init__(self, feature_map: FeatureMap, options: ModelOptions) -> None:
        super().__init__(feature_map, options)
        self.embedding = FeatureEmbedding(feature_map, options.embedding_dim, options.init_std)
        self.linear = FeatureEmbedding(feature_map, 1, options.init_std)
        self.head = nn.Linear(feature_map.num_fields + options.embedding_dim, 1)
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def body(self, batch: Batch) -> Tensor:
        return torch.cat([self.linear(batch).squeeze(-1), fm_interaction(self.embedding(batch))], dim=-1)
