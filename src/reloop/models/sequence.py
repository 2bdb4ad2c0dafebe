"""Layers of the user-behaviour-sequence models (DIN, DIEN, BST) and how they find their fields.

Sequences are ``[B, L]`` id tensors, oldest first, with ``0`` = padding anywhere in the row. Every layer
here masks padding explicitly, so outputs do not depend on how many padding columns a batch carries or
where they sit (only the order of the real items matters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import ModelOptions
from reloop.models.interactions import MultiHeadSelfAttention
from reloop.models.layers import MLP


class SequenceOptions(ModelOptions):
    """Options of the sequence models: which categorical field is the ``target`` and which sequence
    field is the behaviour ``sequence`` attended with it. Left unset, the first sequence field that shares
    its embedding table with a categorical field is the sequence and that categorical field the target
    (``history`` with ``vocab: item_id`` -> sequence ``history``, target ``item_id``).
    """

    target: str | None = None
    sequence: str | None = None


def resolve_sequence_fields(
    feature_map: FeatureMap, target: str | None, sequence: str | None, model: str
) -> tuple[str, str]:
    """``(target, sequence)`` field names for a sequence model; a clear ``ValueError`` when there are none."""
    fields = {f.name: f for f in feature_map.fields}
    categorical = [f for f in feature_map.fields if f.kind == "categorical"]
    sequences = [f for f in feature_map.fields if f.kind == "sequence"]
    if target is not None and (target not in fields or fields[target].kind != "categorical"):
        raise ValueError(
            f"model.target: {model} needs a categorical field, got {target!r}; "
            f"categorical fields: {[f.name for f in categorical]}"
        )
    if sequence is not None and (sequence not in fields or fields[sequence].kind != "sequence"):
        raise ValueError(
            f"model.sequence: {model} needs a sequence field, got {sequence!r}; "
            f"sequence fields: {[f.name for f in sequences]}"
        )
    if sequence is None:
        tables = {fields[target].table} if target is not None else {f.table for f in categorical}
        sequence = next((f.name for f in sequences if f.table in tables), None)
    if target is None and sequence is not None:
        target = next((f.name for f in categorical if f.table == fields[sequence].table), None)
    if target is None or sequence is None:
        raise ValueError(
            f"model: {model} needs a behaviour sequence field that shares its embedding table with a "
            f"categorical target field (e.g. a 'history' sequence with vocab: item_id), or model.target and "
            f"model.sequence set explicitly; this feature map has categorical fields "
            f"{[f.name for f in categorical]} and sequence fields "
            f"{[(f.name, 'table=' + f.table) for f in sequences]}"
        )
    return target, sequence


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over the real positions of ``mask`` (True = real); all-padding rows give all zeros."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.where(mask, torch.softmax(scores, dim=dim), torch.zeros((), dtype=scores.dtype))


def recency_positions(mask: Tensor) -> Tensor:
    """Position of each real item counted from the most recent one (0 = newest), ``[B, L]`` long.

    Independent of where padding sits; padded positions get the rank of the next real item (masked later).
    """
    return (mask.flip(-1).long().cumsum(-1).flip(-1) - 1).clamp(min=0)


class TargetAttention(nn.Module):
    """DIN's local activation unit (Zhou et al., KDD 2018): ``v_U = Σ_j a(e_j, v_A) e_j``.

    ``a(e_j, v_A) = MLP([v_A, e_j, v_A - e_j, v_A ⊙ e_j])`` (the reference code's form of the paper's
    out-product input), PReLU hidden units, and — as in the paper — no softmax normalisation of the
    weights unless ``softmax=True`` (then a masked softmax). Padding positions get weight 0.
    """

    def __init__(self, dim: int, hidden_units: list[int], softmax: bool = False) -> None:
        super().__init__()
        self.mlp = MLP(4 * dim, hidden_units, activation=nn.PReLU)
        self.score = nn.Linear(self.mlp.out_dim, 1)
        self.softmax = softmax

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.score(self.mlp(torch.cat([q, keys, q - keys, q * keys], dim=-1))).squeeze(-1)
        weights = masked_softmax(scores, mask) if self.softmax else scores * mask.to(scores.dtype)
        return (weights.unsqueeze(-1) * keys).sum(1)


class MaskedGRU(nn.Module):
    """DIEN's interest extractor: a GRU over the behaviour sequence, ``[B, L, H]`` states.

    At a padding position the state is carried over unchanged, so padding never moves the state.
    """

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.cell = nn.GRUCell(in_dim, hidden_dim)
        self.hidden_dim = hidden_dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], self.hidden_dim)
        states = []
        for t in range(x.shape[1]):
            h = torch.where(mask[:, t, None], self.cell(x[:, t], h), h)
            states.append(h)
        return torch.stack(states, dim=1)


class AUGRU(nn.Module):
    """GRU with attentional update gate (DIEN, Zhou et al., AAAI 2019), final state ``[B, H]``.

    ``u'_t = a_t · u_t``; ``h'_t = (1 - u'_t) ∘ h'_{t-1} + u'_t ∘ h̃'_t`` with the GRU's reset gate and
    candidate state; ``a_t`` is the attention of step ``t``. Padding steps keep the state.
    """

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.x_proj = nn.Linear(in_dim, 3 * hidden_dim)
        self.h_proj = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.hidden_dim = hidden_dim

    def forward(self, x: Tensor, att: Tensor, mask: Tensor) -> Tensor:
        xs = self.x_proj(x)  # [B, L, 3H]
        h = x.new_zeros(x.shape[0], self.hidden_dim)
        for t in range(x.shape[1]):
            x_r, x_u, x_h = xs[:, t].chunk(3, dim=-1)
            h_r, h_u, h_h = self.h_proj(h).chunk(3, dim=-1)
            r = torch.sigmoid(x_r + h_r)
            u = att[:, t, None] * torch.sigmoid(x_u + h_u)
            candidate = torch.tanh(x_h + r * h_h)
            h = torch.where(mask[:, t, None], (1 - u) * h + u * candidate, h)
        return h


class InterestEvolution(nn.Module):
    """DIEN's interest extractor + evolving layers: GRU states ``h_t``, attention
    ``a_t = softmax_t(h_t W e_a)`` with the target ``e_a``, then AUGRU; returns the final state ``h'_T``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.extractor = MaskedGRU(dim, hidden_dim)
        self.attention = nn.Linear(dim, hidden_dim, bias=False)  # W: target -> state space
        self.evolution = AUGRU(hidden_dim, hidden_dim)

    def forward(self, target: Tensor, seq: Tensor, mask: Tensor) -> Tensor:
        states = self.extractor(seq, mask)
        att = masked_softmax((states * self.attention(target).unsqueeze(1)).sum(-1), mask)
        evolved: Tensor = self.evolution(states, att, mask)
        return evolved


class TransformerBlock(nn.Module):
    """The Transformer layer of BST (Chen et al., DLP-KDD 2019), post-norm:

    ``S' = LayerNorm(S + Dropout(MH(S)))``, ``F = LayerNorm(S' + Dropout(LeakyReLU(S' W1 + b1) W2 + b2))``.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(
            dim, max(1, dim // num_heads), num_heads, scale=True, out_dim=dim, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.LeakyReLU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, mask)))
        normed: Tensor = self.norm2(x + self.dropout(self.ffn(x)))
        return normed


def other_fields(feature_map: FeatureMap, exclude: str) -> Tensor:
    """Indices of the fields other than ``exclude`` (the attended sequence), for ``emb[:, idx]``."""
    return torch.tensor([i for i, f in enumerate(feature_map.fields) if f.name != exclude], dtype=torch.long)
