"""Wide & Deep (Cheng et al., DLRS 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.layers import MLP, Batch, FeatureEmbedding


@register_model
class WideDeep(CTRModel):
    """``y = w_wide^T x + w_deep^T a^{(L)} + b``: a wide linear model over the (one-hot) features and a deep
    MLP over their embeddings, trained jointly.

    ``h = [w_1..w_F, a^{(L)}]``, ``[B, F + hidden_units[-1]]`` (per-field wide weights; head starts at ones
    on them). Cross-product transformations are not built here: add them as categorical fields.
    """

    name = "wide_deep"
    paper = "Cheng et al., Wide & Deep Learning for Recommender Systems, DLRS 2016"

    def __init__(self, feature_map: FeatureMap, options: ModelOptions) -> None:
        super().__init__(feature_map, options)
        f = feature_map.num_fields
        self.embedding = FeatureEmbedding(feature_map, options.embedding_dim, options.init_std)
        self.linear = FeatureEmbedding(feature_map, 1, options.init_std)
        self.mlp = MLP(f * options.embedding_dim, options.hidden_units, options.dropout)
        self.head = nn.Linear(f + self.mlp.out_dim, 1)
        with torch.no_grad():
            self.head.weight[0, :f].fill_(1.0)

    def body(self, batch: Batch) -> Tensor:
        return torch.cat([self.linear(batch).squeeze(-1), self.mlp(self.embedding(batch).flatten(1))], dim=-1)
