"""Neural Factorization Machines (He & Chua, SIGIR 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.layers import MLP, Batch, FeatureEmbedding, fm_interaction


@register_model
class NFM(CTRModel):
    """``y = w_0 + Σ_i w_i + f(x)``, ``f = MLP(f_BI(V))`` with bi-interaction pooling
    ``f_BI(V) = Σ_{i<j} v_i ⊙ v_j = ½((Σ_i v_i)² - Σ_i v_i²)``.

    ``h = [w_1..w_F, MLP(f_BI)]``, ``[B, F + hidden_units[-1]]``; head starts at ones on the first-order
    part, and the head's weights on the MLP part are the paper's prediction vector ``h``.
    """

    name = "nfm"
    paper = "He & Chua, Neural Factorization Machines for Sparse Predictive Analytics, SIGIR 2017"

    def __init__(self, feature_map: FeatureMap, options: ModelOptions) -> None:
        super().__init__(feature_map, options)
        f = feature_map.num_fields
        self.embedding = FeatureEmbedding(feature_map, options.embedding_dim, options.init_std)
        self.linear = FeatureEmbedding(feature_map, 1, options.init_std)
        self.mlp = MLP(options.embedding_dim, options.hidden_units, options.dropout)
        self.head = nn.Linear(f + self.mlp.out_dim, 1)
        with torch.no_grad():
            self.head.weight[0, :f].fill_(1.0)

    def body(self, batch: Batch) -> Tensor:
        bi = fm_interaction(self.embedding(batch))
        return torch.cat([self.linear(batch).squeeze(-1), self.mlp(bi)], dim=-1)
