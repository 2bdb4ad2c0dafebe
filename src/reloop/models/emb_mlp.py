"""Embedding&MLP: the ASMG base model (Peng et al., RecSys 2021, §4.1.2)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.layers import MLP, Batch, FeatureEmbedding


class EmbMLPOptions(ModelOptions):
    embedding_dim: int = Field(default=8, ge=1)
    hidden_units: list[int] = Field(default_factory=lambda: [20, 10])


@register_model
class EmbMLP(CTRModel):
    """Concatenated field embeddings -> MLP -> logit; ``h`` = the last hidden layer."""

    name = "emb_mlp"
    paper = "Peng et al., Learning an Adaptive Meta Model-Generator for Incrementally Updating Recommender Systems, RecSys 2021"
    Options = EmbMLPOptions

    def __init__(self, feature_map: FeatureMap, options: EmbMLPOptions) -> None:
        super().__init__(feature_map, options)
        self.embedding = FeatureEmbedding(feature_map, options.embedding_dim, options.init_std)
        self.mlp = MLP(feature_map.num_fields * options.embedding_dim, options.hidden_units, options.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        h: Tensor = self.mlp(self.embedding(batch).flatten(1))
        return h
