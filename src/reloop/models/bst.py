"""Behavior Sequence Transformer (Chen et al., DLP-KDD 2019)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, register_model
from reloop.models.layers import MLP, Batch, FeatureEmbedding
from reloop.models.sequence import (
    SequenceOptions,
    TransformerBlock,
    other_fields,
    recency_positions,
    resolve_sequence_fields,
)


class BSTOptions(SequenceOptions):
    """``num_heads`` (head size ``embedding_dim // num_heads``), ``transformer_layers`` (paper: 1 is best),
    ``ffn_dim`` (default ``4·embedding_dim``)."""

    transformer_layers: int = Field(default=1, ge=1)
    num_heads: int = Field(default=2, ge=1)
    ffn_dim: int | None = Field(default=None, ge=1)


@register_model
class BST(CTRModel):
    """Tokens ``[e_1 + p_1, ..., e_n + p_n, e_target + p_0]`` (behaviours oldest first, then the target item)
    through Transformer layers ``S' = LN(S + MH(S))``, ``F = LN(S' + FFN(S'))`` with
    ``MH = softmax(QK^T/√d_h)V`` over real tokens only; the tower is a LeakyReLU MLP over
    ``[all other fields (pooled), F_target, mean_j F_j]``. ``h`` = its last hidden layer,
    ``[B, hidden_units[-1]]``.

    Positions ``p`` are learned per recency rank (0 = target, 1 = newest behaviour, …): the paper's
    ``pos(v_i) = t(v_t) - t(v_i)`` with ranks standing in for time gaps, which the batch does not carry.
    The behaviour outputs are mean-pooled over real positions instead of concatenated, so ``h`` does not
    depend on ``max_len`` or on padding.
    """

    name = "bst"
    paper = "Chen et al., Behavior Sequence Transformer for E-commerce Recommendation in Alibaba, DLP-KDD 2019"
    Options = BSTOptions
    others: Tensor  # buffer: indices of the fields other than the sequence

    def __init__(self, feature_map: FeatureMap, options: BSTOptions) -> None:
        super().__init__(feature_map, options)
        self.target, self.sequence = resolve_sequence_fields(feature_map, options.target, options.sequence, self.name)
        d = options.embedding_dim
        self.max_len = next(f.max_len for f in feature_map.fields if f.name == self.sequence)
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        self.position = nn.Embedding(self.max_len + 1, d)
        nn.init.normal_(self.position.weight, std=options.init_std)
        self.register_buffer("others", other_fields(feature_map, self.sequence), persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, options.num_heads, options.ffn_dim or 4 * d, options.dropout)
            for _ in range(options.transformer_layers)
        )
        self.mlp = MLP(len(self.others) * d + 2 * d, options.hidden_units, options.dropout, activation=nn.LeakyReLU)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        seq, mask = self.embedding.sequence(batch, self.sequence)  # [B, L, d], [B, L]
        target = self.embedding.lookup(batch, self.target)
        pos = (recency_positions(mask) + 1).clamp(max=self.max_len)
        x = torch.cat([seq + self.position(pos), (target + self.position.weight[0]).unsqueeze(1)], dim=1)
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        for block in self.blocks:
            x = block(x, full_mask)
        weights = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x[:, :-1] * weights).sum(1) / weights.sum(1).clamp(min=1)
        others = self.embedding(batch)[:, self.others].flatten(1)
        h: Tensor = self.mlp(torch.cat([others, x[:, -1], pooled], dim=-1))
        return h
