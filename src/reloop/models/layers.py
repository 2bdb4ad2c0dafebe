"""Shared layers every model is composed from (embedding -> interaction -> MLP -> logit)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from reloop.data.schema import PAD, FeatureMap

Batch = dict[str, Tensor]


class FeatureEmbedding(nn.Module):
    """One ``dim``-vector per field: ``[B, F, dim]``.

    categorical -> table row; sequence -> masked mean of its rows (padding index 0 is masked and its
    row stays zero); numeric -> the (normalised) value times a learned per-field vector.
    Tables are keyed by ``EncodedField.table`` so a history field can share the item table.
    """

    def __init__(self, feature_map: FeatureMap, dim: int, init_std: float = 1e-2) -> None:
        super().__init__()
        self.feature_map = feature_map
        self.dim = dim
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(size, dim, padding_idx=PAD) for name, size in feature_map.tables.items()}
        )
        self._fields = {f.name: f for f in feature_map.fields}
        numeric = feature_map.of_kind("numeric")
        self.numeric_names = [f.name for f in numeric]
        self.numeric = nn.Parameter(torch.empty(len(numeric), dim)) if numeric else None
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float) -> None:
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
            with torch.no_grad():
                table.weight[PAD].zero_()
        if self.numeric is not None:
            nn.init.normal_(self.numeric, std=init_std)

    @property
    def num_fields(self) -> int:
        return self.feature_map.num_fields

    def sequence(self, batch: Batch, name: str) -> tuple[Tensor, Tensor]:
        """Unpooled sequence embeddings ``[B, L, dim]`` and mask ``[B, L]`` (True = real item)."""
        ids = batch[name]
        return self.tables[self._fields[name].table](ids), ids != PAD

    def lookup(self, batch: Batch, name: str) -> Tensor:
        """``[B, dim]`` embedding of a single categorical field."""
        return self.tables[self._fields[name].table](batch[name])

    def forward(self, batch: Batch) -> Tensor:
        out = []
        num_i = 0
        for f in self.feature_map.fields:
            x = batch[f.name]
            if f.kind == "categorical":
                out.append(self.tables[f.table](x))
            elif f.kind == "sequence":
                # Mask explicitly: generated weights (ASMG, SML) need not keep the padding row at zero.
                mask = (x != PAD).unsqueeze(-1).to(self.tables[f.table].weight.dtype)
                emb = self.tables[f.table](x) * mask
                out.append(emb.sum(1) / mask.sum(1).clamp(min=1))
            else:
                out.append(x.unsqueeze(-1).to(self.numeric.dtype) * self.numeric[num_i])
                num_i += 1
        return torch.stack(out, dim=1)


class MLP(nn.Module):
    """Dense tower: Linear -> activation (-> dropout) per hidden layer; output = last hidden layer."""

    def __init__(self, in_dim: int, hidden_units: list[int], dropout: float = 0.0,
                 activation: type[nn.Module] = nn.ReLU, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden_units:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def fm_interaction(emb: Tensor) -> Tensor:
    """Bi-interaction pooling of FM (Rendle 2010): 0.5 * ((sum_i v_i)^2 - sum_i v_i^2), ``[B, d]``.

    Summing the result over d gives the FM second-order term sum_{i<j} <v_i, v_j>.
    """
    s = emb.sum(1)
    return 0.5 * (s * s - (emb * emb).sum(1))


class CrossNet(nn.Module):
    """DCN cross network (Wang et al. 2017): x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l."""

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.randn(in_dim) * 0.01) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(in_dim)) for _ in range(num_layers)])

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for w, b in zip(self.w, self.b):
            x = x0 * (x @ w).unsqueeze(-1) + b + x
        return x
