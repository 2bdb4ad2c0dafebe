"""Product-based Neural Network, inner-product variant IPNN (Qu et al., ICDM 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.interactions import InnerProduct
from reloop.models.layers import MLP, Batch, FeatureEmbedding


@register_model
class PNN(CTRModel):
    """IPNN: product layer ``[z, p]`` with ``z = [v_1..v_F]`` (linear signals) and ``p_{ij} = <v_i, v_j>``
    (``i < j``), then an MLP. The first MLP layer is ``l_1 = ReLU(W_z z + W_p p + b_1)``: the paper's
    product layer with full-rank ``W_p`` (its rank-1 ``θθ^T`` factorisation is an efficiency device only).

    ``h`` = the last hidden layer, ``[B, hidden_units[-1]]``.
    """

    name = "pnn"
    paper = "Qu et al., Product-based Neural Networks for User Response Prediction, ICDM 2016"

    def __init__(self, feature_map: FeatureMap, options: ModelOptions) -> None:
        super().__init__(feature_map, options)
        f, d = feature_map.num_fields, options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.product = InnerProduct(f)
        self.mlp = MLP(f * d + self.product.out_dim, options.hidden_units, options.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        emb = self.embedding(batch)
        h: Tensor = self.mlp(torch.cat([emb.flatten(1), self.product(emb)], dim=-1))
        return h
