"""Deep Interest Evolution Network (Zhou et al., AAAI 2019): GRU interest extraction + AUGRU evolution."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, register_model
from reloop.models.layers import MLP, Batch, FeatureEmbedding
from reloop.models.sequence import InterestEvolution, SequenceOptions, other_fields, resolve_sequence_fields


class DIENOptions(SequenceOptions):
    """``gru_dim``: hidden size of both GRUs (default: ``embedding_dim``)."""

    gru_dim: int | None = Field(default=None, ge=1)


@register_model
class DIEN(CTRModel):
    """Interest extractor ``h_t = GRU(e_t, h_{t-1})``; attention ``a_t = softmax_t(h_t W e_a)`` with the
    target ``e_a``; interest evolution by AUGRU ``h'_t = (1 - a_t u'_t) ∘ h'_{t-1} + a_t u'_t ∘ h̃'_t``;
    the tower is an MLP over ``[all other fields (pooled), h'_T]``. ``h`` = its last hidden layer,
    ``[B, hidden_units[-1]]``.

    The auxiliary loss of the paper (next-behaviour supervision of ``h_t`` with sampled negative behaviours)
    is not included: it needs negative behaviour sequences the data layer does not produce, and it is a
    training-time regulariser only (the served model is the same).
    """

    name = "dien"
    paper = "Zhou et al., Deep Interest Evolution Network for Click-Through Rate Prediction, AAAI 2019"
    Options = DIENOptions
    others: Tensor  # buffer: indices of the fields other than the sequence

    def __init__(self, feature_map: FeatureMap, options: DIENOptions) -> None:
        super().__init__(feature_map, options)
        self.target, self.sequence = resolve_sequence_fields(feature_map, options.target, options.sequence, self.name)
        d = options.embedding_dim
        gru_dim = options.gru_dim or d
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.register_buffer("others", other_fields(feature_map, self.sequence), persistent=False)
        self.interest = InterestEvolution(d, gru_dim)
        self.mlp = MLP(len(self.others) * d + gru_dim, options.hidden_units, options.dropout, activation=nn.PReLU)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        seq, mask = self.embedding.sequence(batch, self.sequence)
        interest = self.interest(self.embedding.lookup(batch, self.target), seq, mask)
        others = self.embedding(batch)[:, self.others].flatten(1)
        h: Tensor = self.mlp(torch.cat([others, interest], dim=-1))
        return h
