"""FmFM: Field-matrixed Factorization Machines (Sun et al., WWW 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.interactions import FieldMatrixInteraction
from reloop.models.layers import Batch, FeatureEmbedding


@register_model
class FmFM(CTRModel):
    """``y = w_0 + Σ_i w_i + Σ_{i<j} <v_i M_{F(i),F(j)}, v_j>`` with one ``d×d`` matrix per field pair.

    ``h = [w_1..w_F, Σ_{i<j} (v_i M_{ij}) ⊙ v_j]``, ``[B, F + d]``; the head starts at ones and the matrices
    at the identity, i.e. exactly FM at initialisation.
    """

    name = "fmfm"
    paper = "Sun et al., FM^2: Field-matrixed Factorization Machines for Recommender Systems, WWW 2021"

    def __init__(self, feature_map: FeatureMap, options: ModelOptions) -> None:
        super().__init__(feature_map, options)
        f, d = feature_map.num_fields, options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.linear = FeatureEmbedding(feature_map, 1, options.init_std)
        self.interaction = FieldMatrixInteraction(f, d)
        self.head = nn.Linear(f + d, 1)
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def body(self, batch: Batch) -> Tensor:
        return torch.cat([self.linear(batch).squeeze(-1), self.interaction(self.embedding(batch))], dim=-1)
