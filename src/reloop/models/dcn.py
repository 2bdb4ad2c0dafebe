"""Deep & Cross Network (Wang et al., ADKDD 2017)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.layers import MLP, Batch, CrossNet, FeatureEmbedding


class DCNOptions(ModelOptions):
    cross_layers: int = Field(default=3, ge=1)


@register_model
class DCN(CTRModel):
    """Cross network ``x_{l+1} = x_0 x_l^T w_l + b_l + x_l`` and a deep MLP in parallel on
    ``x_0 = [v_1..v_F]``; ``h = [x_L, MLP(x_0)]``, ``[B, F·d + hidden_units[-1]]`` (the paper's combination
    layer is the head).
    """

    name = "dcn"
    paper = "Wang et al., Deep & Cross Network for Ad Click Predictions, ADKDD 2017"
    Options = DCNOptions

    def __init__(self, feature_map: FeatureMap, options: DCNOptions) -> None:
        super().__init__(feature_map, options)
        in_dim = feature_map.num_fields * options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, options.embedding_dim, options.init_std)
        self.cross = CrossNet(in_dim, options.cross_layers)
        self.mlp = MLP(in_dim, options.hidden_units, options.dropout)
        self.head = nn.Linear(in_dim + self.mlp.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        x0 = self.embedding(batch).flatten(1)
        return torch.cat([self.cross(x0), self.mlp(x0)], dim=-1)
