"""DeepFM (Guo et al., IJCAI 2017): first-order + FM second-order + deep tower, one logit."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.layers import MLP, Batch, FeatureEmbedding, fm_interaction


@register_model
class DeepFM(CTRModel):
    """``h = [Σ_i w_i, bi-interaction(v) (d values summing to the FM term), MLP(v)]``.

    The output layer is linear in ``h``: with head weights fixed to 1 on the first ``1 + d`` entries it
    is exactly DeepFM's ``y = w_0 + Σ w_i + Σ_{i<j} <v_i, v_j> + y_DNN``; the head learns those weights.
    """

    name = "deepfm"
    paper = "Guo et al., DeepFM: A Factorization-Machine based Neural Network for CTR Prediction, IJCAI 2017"

    def __init__(self, feature_map: FeatureMap, options: ModelOptions) -> None:
        super().__init__(feature_map, options)
        d = options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.linear = FeatureEmbedding(feature_map, 1, options.init_std)
        self.mlp = MLP(feature_map.num_fields * d, options.hidden_units, options.dropout)
        self.head = nn.Linear(1 + d + self.mlp.out_dim, 1)
        with torch.no_grad():  # start as the textbook DeepFM: unit weights on first- and second-order
            self.head.weight[0, : 1 + d].fill_(1.0)

    def body(self, batch: Batch) -> Tensor:
        emb = self.embedding(batch)
        first = self.linear(batch).sum(dim=(1, 2)).unsqueeze(-1)
        return torch.cat([first, fm_interaction(emb), self.mlp(emb.flatten(1))], dim=-1)
