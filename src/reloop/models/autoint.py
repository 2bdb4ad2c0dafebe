"""AutoInt+ (Song et al., CIKM 2019): stacked multi-head self-attention over fields, plus a DNN."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.base import CTRModel, ModelOptions, register_model
from reloop.models.interactions import MultiHeadSelfAttention
from reloop.models.layers import MLP, Batch, FeatureEmbedding


class AutoIntOptions(ModelOptions):
    """``attention_dim`` is per head; ``dnn: false`` gives plain AutoInt; ``use_scale`` divides scores by
    ``sqrt(attention_dim)`` (not in the paper)."""

    attention_layers: int = Field(default=3, ge=1)
    num_heads: int = Field(default=2, ge=1)
    attention_dim: int = Field(default=8, ge=1)
    use_residual: bool = True
    use_scale: bool = False
    dnn: bool = True


class InteractingLayer(nn.Module):
    """``e^Res_m = ReLU(⊕_h Σ_k softmax_k(<W_Q^h e_m, W_K^h e_k>) W_V^h e_k + W_Res e_m)``."""

    def __init__(self, in_dim: int, head_dim: int, num_heads: int, residual: bool, scale: bool) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(in_dim, head_dim, num_heads, scale=scale)
        self.residual = nn.Linear(in_dim, num_heads * head_dim, bias=False) if residual else None
        self.out_dim = num_heads * head_dim

    def forward(self, x: Tensor) -> Tensor:
        out = self.attention(x)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)


@register_model
class AutoInt(CTRModel):
    """Interacting layers ``e^Res_m = ReLU(⊕_h Σ_k α^h_{m,k} W_V^h e_k + W_Res e_m)`` with
    ``α^h_{m,k} = softmax_k(<W_Q^h e_m, W_K^h e_k>)``, stacked; AutoInt+ adds a DNN on the embeddings.
    ``h = [e^Res_1..e^Res_F, MLP(e)]``, ``[B, F·heads·attention_dim + hidden_units[-1]]``.
    """

    name = "autoint"
    paper = "Song et al., AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural Networks, CIKM 2019"
    Options = AutoIntOptions
    options: AutoIntOptions

    def __init__(self, feature_map: FeatureMap, options: AutoIntOptions) -> None:
        super().__init__(feature_map, options)
        f, d = feature_map.num_fields, options.embedding_dim
        self.embedding = FeatureEmbedding(feature_map, d, options.init_std)
        layers, in_dim = [], d
        for _ in range(options.attention_layers):
            layers.append(
                InteractingLayer(
                    in_dim, options.attention_dim, options.num_heads, options.use_residual, options.use_scale
                )
            )
            in_dim = layers[-1].out_dim
        self.interacting = nn.Sequential(*layers)
        h_dim = f * in_dim
        if options.dnn:
            self.mlp = MLP(f * d, options.hidden_units, options.dropout)
            h_dim += self.mlp.out_dim
        self.head = nn.Linear(h_dim, 1)

    def body(self, batch: Batch) -> Tensor:
        emb = self.embedding(batch)
        att = self.interacting(emb).flatten(1)
        return torch.cat([att, self.mlp(emb.flatten(1))], dim=-1) if self.options.dnn else att
