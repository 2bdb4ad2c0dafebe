"""Feature-interaction layers of the zoo, on field embeddings ``emb`` of shape ``[B, F, d]``.

Each layer is stateless in ``forward`` (no buffers updated, no Python state), so models built from
them work under ``torch.func.functional_call``. Formulas are in each docstring; ``F`` = fields,
``d`` = embedding dimension, ``P = F(F-1)/2`` field pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def pair_indices(num_fields: int) -> tuple[Tensor, Tensor]:
    """Row and column indices ``(i, j)`` of the ``P`` field pairs ``i < j``."""
    i, j = torch.triu_indices(num_fields, num_fields, offset=1)
    return i, j


class InnerProduct(nn.Module):
    """All pairwise inner products ``p_{ij} = <v_i, v_j>`` for ``i < j``: ``[B, P]`` (PNN, Qu et al. 2016)."""

    i: Tensor  # buffers: row and column of each field pair
    j: Tensor

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        i, j = pair_indices(num_fields)
        self.register_buffer("i", i, persistent=False)
        self.register_buffer("j", j, persistent=False)
        self.out_dim = len(i)

    def forward(self, emb: Tensor) -> Tensor:
        return (emb[:, self.i] * emb[:, self.j]).sum(-1)


class FieldMatrixInteraction(nn.Module):
    """FmFM field-matrixed interaction (Sun et al., WWW 2021): ``Σ_{i<j} (v_i M_{F(i),F(j)}) ⊙ v_j``, ``[B, d]``.

    Summed over ``d`` this is the FmFM term ``Σ_{i<j} <v_i M_{F(i),F(j)}, v_j>``; one ``d×d`` matrix per
    field pair, initialised to the identity so the layer starts as FM's bi-interaction.
    """

    i: Tensor  # buffers: row and column of each field pair
    j: Tensor

    def __init__(self, num_fields: int, dim: int) -> None:
        super().__init__()
        i, j = pair_indices(num_fields)
        self.register_buffer("i", i, persistent=False)
        self.register_buffer("j", j, persistent=False)
        self.matrices = nn.Parameter(torch.eye(dim).repeat(len(i), 1, 1))  # [P, d, d]

    def forward(self, emb: Tensor) -> Tensor:
        left = torch.einsum("bpd,pde->bpe", emb[:, self.i], self.matrices)
        return (left * emb[:, self.j]).sum(1)


class CIN(nn.Module):
    """Compressed Interaction Network of xDeepFM (Lian et al., KDD 2018).

    ``X^k_{h,*} = Σ_{i≤H_{k-1}} Σ_{j≤F} W^{k,h}_{ij} (X^{k-1}_{i,*} ∘ X^0_{j,*})`` with ``X^0`` = the field
    embeddings; each layer is sum-pooled over ``d`` (``p^k_h = Σ_d X^k_{h,d}``) and the output is
    ``p^+ = [p^1, ..., p^K]``, ``[B, Σ_k H_k]``. Every feature map feeds the next layer and the output (no
    split-half); a bias per feature map as in the reference code, identity activation as in the paper.
    """

    def __init__(self, num_fields: int, layer_units: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        h_prev = num_fields
        for h in layer_units:
            self.layers.append(nn.Linear(h_prev * num_fields, h))
            h_prev = h
        self.out_dim = sum(layer_units)

    def forward(self, emb: Tensor) -> Tensor:
        b, f, d = emb.shape
        x, pooled = emb, []
        for layer in self.layers:
            z = torch.einsum("bhd,bmd->bhmd", x, emb).reshape(b, -1, d)  # [B, H*F, d]
            x = layer(z.transpose(1, 2)).transpose(1, 2)  # [B, H_k, d]
            pooled.append(x.sum(-1))
        return torch.cat(pooled, dim=-1)


class LogarithmicTransform(nn.Module):
    """AFN's logarithmic transformation layer (Cheng et al., AAAI 2020): ``[B, N, d]``.

    ``y_j = exp(Σ_i w_{ij} ln|e_i|) = Π_i |e_i|^{w_{ij}}`` for ``N`` logarithmic neurons, element-wise over
    ``d``, so each neuron learns an arbitrary-order (even fractional) cross feature. ``|e|`` is clamped to
    ``eps``; with ``batch_norm`` (reference implementation) the log inputs and the exp outputs are batch
    normalised, which keeps ``exp`` in range.
    """

    def __init__(self, num_fields: int, num_neurons: int, batch_norm: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.coefficient = nn.Linear(num_fields, num_neurons, bias=False)
        self.log_norm = nn.BatchNorm1d(num_fields) if batch_norm else nn.Identity()
        self.exp_norm = nn.BatchNorm1d(num_neurons) if batch_norm else nn.Identity()

    def forward(self, emb: Tensor) -> Tensor:
        log_emb = self.log_norm(torch.log(emb.abs().clamp(min=self.eps)))  # [B, F, d]
        out = torch.exp(self.coefficient(log_emb.transpose(1, 2)).transpose(1, 2))  # [B, N, d]
        normed: Tensor = self.exp_norm(out)
        return normed


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over tokens ``x`` ``[B, T, in_dim]`` -> ``[B, T, heads*head_dim]``.

    ``head_m = softmax(Q_m K_m^T / s) V_m`` with ``Q_m = x W^Q_m`` etc., heads concatenated (then ``W^O``
    when ``out_dim`` is given). ``s = sqrt(head_dim)`` when ``scale`` (Transformer, BST) else 1 (AutoInt).
    ``mask`` ``[B, T]`` (True = real token) removes padded keys; every row needs one real key.
    """

    def __init__(
        self,
        in_dim: int,
        head_dim: int,
        num_heads: int,
        scale: bool = True,
        out_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim) if scale else 1.0
        self.qkv = nn.Linear(in_dim, 3 * num_heads * head_dim, bias=False)
        self.out = nn.Linear(num_heads * head_dim, out_dim) if out_dim is not None else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = out_dim if out_dim is not None else num_heads * head_dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # [B, heads, T, T]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        att = self.dropout(torch.softmax(scores, dim=-1))
        out = (att @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        projected: Tensor = self.out(out)
        return projected


class GeneralizedInteraction(nn.Module):
    """One generalized interaction layer of AOANet (Lang et al., KDD 2021).

    ``b^{l}_k = ((W^{l}_k ⊙ Σ_{(j,m)} α^{l}_{(j,m),k} e_j ⊗ b^{l-1}_m) h^{l}_k)``, ``k = 1..S`` subspaces:
    outer products of every field ``e_j`` with every previous-layer subspace ``b^{l-1}_m``, fused by ``α``,
    weighted element-wise by ``W_k`` (``d×d``, init identity) and projected by ``h_k`` (init ones), so at
    initialisation ``b_k = Σ α e_j ⊙ b_m`` (a weighted Hadamard interaction).
    """

    def __init__(self, in_subspaces: int, out_subspaces: int, num_fields: int, dim: int) -> None:
        super().__init__()
        self.in_subspaces, self.num_fields = in_subspaces, num_fields
        self.W = nn.Parameter(torch.eye(dim).repeat(out_subspaces, 1, 1))  # [S, d, d]
        self.alpha = nn.Parameter(torch.ones(in_subspaces * num_fields, out_subspaces))
        self.h = nn.Parameter(torch.ones(out_subspaces, dim, 1))

    def forward(self, b0: Tensor, bi: Tensor) -> Tensor:
        left = b0.repeat(1, self.in_subspaces, 1)  # [B, M*F, d]  (e_j for each m)
        right = bi.repeat_interleave(self.num_fields, dim=1)  # [B, M*F, d]  (b_m for each j)
        weighted = torch.einsum("bnx,nk->bkxn", left, self.alpha)  # [B, S, d, M*F]
        fused = torch.matmul(weighted, right.unsqueeze(1))  # Σ_n α_{n,k} e_n ⊗ b_n: [B, S, d, d]
        return torch.matmul(self.W * fused, self.h).squeeze(-1)  # [B, S, d]


class GeneralizedInteractionNet(nn.Module):
    """AOANet's interaction tower: ``L`` generalized interaction layers from ``b^0`` = the field embeddings.

    Output ``[B, S*d]`` (the last layer's subspaces, flattened).
    """

    def __init__(self, num_fields: int, dim: int, num_layers: int, num_subspaces: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            GeneralizedInteraction(num_fields if i == 0 else num_subspaces, num_subspaces, num_fields, dim)
            for i in range(num_layers)
        )
        self.out_dim = num_subspaces * dim

    def forward(self, emb: Tensor) -> Tensor:
        b = emb
        for layer in self.layers:
            b = layer(emb, b)
        return b.flatten(1)


class CrossNetV2(nn.Module):
    """DCN-V2 matrix cross network (Wang et al., WWW 2021): ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l``.

    With ``low_rank = r``: ``W_l = U_l V_l^T`` (``U, V`` of shape ``D×r``).
    """

    def __init__(self, in_dim: int, num_layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        if low_rank is None:
            self.layers = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(num_layers))
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(in_dim, low_rank, bias=False), nn.Linear(low_rank, in_dim))
                for _ in range(num_layers)
            )

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class CrossNetMix(nn.Module):
    """DCN-Mix, the mixture of low-rank cross experts of DCN-V2 (Wang et al., WWW 2021, Eq. 4).

    ``x_{l+1} = Σ_i G_i(x_l) E_i(x_l) + x_l``, ``E_i(x_l) = x_0 ⊙ (U_i g(C_i g(V_i^T x_l)) + b_l)`` with
    ``g = tanh`` and gates ``G = softmax_i(w_i^T x_l)``.
    """

    def __init__(self, in_dim: int, num_layers: int, low_rank: int, num_experts: int) -> None:
        super().__init__()

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(nn.init.xavier_normal_(torch.empty(*shape)))

        self.U = nn.ParameterList(p(num_experts, in_dim, low_rank) for _ in range(num_layers))
        self.V = nn.ParameterList(p(num_experts, in_dim, low_rank) for _ in range(num_layers))
        self.C = nn.ParameterList(p(num_experts, low_rank, low_rank) for _ in range(num_layers))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(in_dim)) for _ in range(num_layers))
        self.gates = nn.ModuleList(nn.Linear(in_dim, num_experts, bias=False) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for U, V, C, b, gate in zip(self.U, self.V, self.C, self.b, self.gates):
            v = torch.tanh(torch.einsum("bd,edr->ber", x, V))
            v = torch.tanh(torch.einsum("ber,ers->bes", v, C))
            experts = x0.unsqueeze(1) * (torch.einsum("bes,eds->bed", v, U) + b)  # [B, E, D]
            weights = torch.softmax(gate(x), dim=-1)  # [B, E]
            x = (weights.unsqueeze(-1) * experts).sum(1) + x
        return x
