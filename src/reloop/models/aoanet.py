"""AOANet (Lang et al., KDD 2021): DNN + generalized interaction network."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.interactions import GeneralizedInteractionNet
from reloop.models.layers import MLP, Batch, FeatureEmbedding


class AOANetOptions(ModelOptions):
    num_interaction_layers: int = Field(default=3, ge=1)
    num_subspaces: int = Field(default=2, ge=1)


@register_model
class AOANet(CTRModel):
    """Generalized interaction layers
    ``b^l_k = (W^l_k ⊙ Σ_{(j,m)} α^l_{(j,m),k} e_j ⊗ b^{l-1}_m) h^l_k`` (``b^0`` = field embeddings,
    ``S`` subspaces per layer) beside a DNN; ``h = [MLP(e), b^L_1..b^L_S]``,
    ``[B, hidden_units[-1] + S·d]`` (the head is the fusion layer).
    """

    name = "aoanet"
    paper = "Lang et al., Architecture and Operation Adaptive Network for Online Recommendations, KDD 2021"
    Options = AOANetOptions

    def __init__(self, feature_map: FeatureMap, options: AOANetOptions) -> None:
        super().__init__(feature_map, options)
        f, d = feature_map.num_fields, options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.mlp = MLP(f * d, options.hidden_units, options.dropout)
        self.gin = GeneralizedInteractionNet(f, d, options.num_interaction_layers, options.num_subspaces)
        self.head = nn.Linear(self.mlp.out_dim + self.gin.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        emb = self.embedding(batch)
        return torch.cat([self.mlp(emb.flatten(1)), self.gin(emb)], dim=-1)
