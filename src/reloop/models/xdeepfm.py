"""xDeepFM (Lian et al., KDD 2018): linear + CIN + DNN."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.interactions import CIN
from reloop.models.layers import MLP, Batch, FeatureEmbedding


class XDeepFMOptions(ModelOptions):
    cin_layer_units: list[int] = Field(default_factory=lambda: [16, 16, 16], min_length=1)


@register_model
class XDeepFM(CTRModel):
    """``y = σ(w_lin^T a + w_dnn^T x_dnn + w_cin^T p^+ + b)`` with the CIN
    ``X^k_{h,*} = Σ_{i,j} W^{k,h}_{ij} (X^{k-1}_{i,*} ∘ X^0_{j,*})``, ``p^+`` its sum-pooled feature maps.

    ``h = [w_1..w_F, x_dnn, p^+]``, ``[B, F + hidden_units[-1] + Σ cin_layer_units]`` (head starts at ones on
    the per-field linear weights).
    """

    name = "xdeepfm"
    paper = (
        "Lian et al., xDeepFM: Combining Explicit and Implicit Feature Interactions for Recommender Systems, KDD 2018"
    )
    Options = XDeepFMOptions

    def __init__(self, feature_map: FeatureMap, options: XDeepFMOptions) -> None:
        super().__init__(feature_map, options)
        f, d = feature_map.num_fields, options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.linear = FeatureEmbedding(feature_map, 1, options.init_std)
        self.cin = CIN(f, options.cin_layer_units)
        self.mlp = MLP(f * d, options.hidden_units, options.dropout)
        self.head = nn.Linear(f + self.mlp.out_dim + self.cin.out_dim, 1)
        with torch.no_grad():
            self.head.weight[0, :f].fill_(1.0)

    def body(self, batch: Batch) -> Tensor:
        emb = self.embedding(batch)
        return torch.cat([self.linear(batch).squeeze(-1), self.mlp(emb.flatten(1)), self.cin(emb)], dim=-1)
