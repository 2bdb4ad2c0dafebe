"""AFN+ (Cheng et al., AAAI 2020): logarithmic neurons for adaptive-order interactions, ensembled with a DNN."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.interactions import LogarithmicTransform
from reloop.models.layers import MLP, Batch, FeatureEmbedding


class AFNOptions(ModelOptions):
    """``log_neurons``: N of the logarithmic layer; ``afn_hidden_units``: the MLP over its output (default:
    ``hidden_units``); ``ensemble_dnn``: AFN+ (True) or plain AFN; ``batch_norm``: the reference
    implementation's batch norm around the log/exp (buffers updated in train mode)."""

    log_neurons: int = Field(default=32, ge=1)
    afn_hidden_units: list[int] | None = None
    ensemble_dnn: bool = True
    batch_norm: bool = True


@register_model
class AFN(CTRModel):
    """AFN: ``y_j = exp(Σ_i w_{ij} ln|e_i|) = Π_i |e_i|^{w_{ij}}`` (N logarithmic neurons, element-wise over
    ``d``), flattened into an MLP; AFN+ adds a DNN over separate embeddings and combines the two outputs
    linearly. ``h = [MLP_AFN(y), MLP_DNN(e')]``, ``[B, afn_hidden[-1] + hidden_units[-1]]`` (the head is the
    paper's ensemble layer composed with each branch's output layer).
    """

    name = "afn"
    paper = "Cheng et al., Adaptive Factorization Network: Learning Adaptive-Order Feature Interactions, AAAI 2020"
    Options = AFNOptions
    options: AFNOptions

    def __init__(self, feature_map: FeatureMap, options: AFNOptions) -> None:
        super().__init__(feature_map, options)
        f, d = feature_map.num_fields, options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.log_layer = LogarithmicTransform(f, options.log_neurons, options.batch_norm)
        afn_units = options.afn_hidden_units if options.afn_hidden_units is not None else options.hidden_units
        self.afn_mlp = MLP(options.log_neurons * d, afn_units, options.dropout)
        h_dim = self.afn_mlp.out_dim
        if options.ensemble_dnn:
            self.dnn_embedding = FeatureEmbedding(feature_map, d, options.init_std)
            self.dnn = MLP(f * d, options.hidden_units, options.dropout)
            h_dim += self.dnn.out_dim
        self.head = nn.Linear(h_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        h: Tensor = self.afn_mlp(self.log_layer(self.embedding(batch)).flatten(1))
        if not self.options.ensemble_dnn:
            return h
        return torch.cat([h, self.dnn(self.dnn_embedding(batch).flatten(1))], dim=-1)
