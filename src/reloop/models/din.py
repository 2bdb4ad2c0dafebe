"""Deep Interest Network (Zhou et al., KDD 2018): target attention over the behaviour sequence."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, register_model
from reloop.models.layers import MLP, Batch, FeatureEmbedding
from reloop.models.sequence import SequenceOptions, TargetAttention, other_fields, resolve_sequence_fields


class DINOptions(SequenceOptions):
    """``attention_hidden_units``: the activation unit's MLP (paper: 36 units); ``attention_softmax``:
    normalise the weights (the paper deliberately does not)."""

    attention_hidden_units: list[int] = Field(default_factory=lambda: [36], min_length=1)
    attention_softmax: bool = False


@register_model
class DIN(CTRModel):
    """User interest ``v_U(A) = Σ_j a(e_j, v_A) e_j`` over the behaviour embeddings ``e_j`` with the target
    (candidate) embedding ``v_A``, ``a = MLP([v_A, e_j, v_A - e_j, v_A ⊙ e_j])``; the tower is an MLP over
    ``[all other fields (pooled), v_U]`` with PReLU (the paper's Dice needs batch statistics).
    ``h`` = the last hidden layer, ``[B, hidden_units[-1]]``.
    """

    name = "din"
    paper = "Zhou et al., Deep Interest Network for Click-Through Rate Prediction, KDD 2018"
    Options = DINOptions
    others: Tensor  # buffer: indices of the fields other than the sequence

    def __init__(self, feature_map: FeatureMap, options: DINOptions) -> None:
        super().__init__(feature_map, options)
        self.target, self.sequence = resolve_sequence_fields(feature_map, options.target, options.sequence, self.name)
        d = options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.register_buffer("others", other_fields(feature_map, self.sequence), persistent=False)
        self.attention = TargetAttention(d, options.attention_hidden_units, options.attention_softmax)
        self.mlp = MLP(len(self.others) * d + d, options.hidden_units, options.dropout, activation=nn.PReLU)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        seq, mask = self.embedding.sequence(batch, self.sequence)
        interest = self.attention(self.embedding.lookup(batch, self.target), seq, mask)
        others = self.embedding(batch)[:, self.others].flatten(1)
        h: Tensor = self.mlp(torch.cat([others, interest], dim=-1))
        return h
