"""The coordinate-wise GRU of ASMG-GRU (Peng et al. 2021), vectorised over all coordinates.

One GRU cell with a scalar input and hidden size d per coordinate p of a parameter tensor, all P cells
run at once on ``[N, P]`` inputs with batched matmuls (einsum over ``[P, d, d]`` weights); METHODS.md
"Model generators", METHODS-notes §3.4 (``gru_parallel`` of the reference code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reloop.update.generators.learned import INITS, _uniform


class CoordinateGRU(nn.Module):
    """P independent GRU cells with hidden size d and a scalar input, run on ``[N, P]`` inputs.

    For every coordinate p (parameters ``[p]`` of each tensor below), with input x and state h ∈ R^d:
        z  = σ(x·u_z + h @ W_z + b_z)
        r  = σ(x·u_r + h @ W_r + b_r)
        h̃  = tanh(x·u_h + (r ⊙ h) @ W_h + b_h)
        h' = (1 − z) ⊙ h + z ⊙ h̃
        θ* = w·h' + b_out            (+ x when ``residual``)
    The N rows share the weights (N = ids of an embedding table, N = 1 for a dense tensor).
    """

    def __init__(
        self,
        n_coords: int,
        hidden: int,
        gate_bias: bool = True,
        init: str = "identity",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        P, d = n_coords, hidden
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.n_coords, self.hidden, self.residual = P, d, init == "identity"
        if init == "glorot":  # TF glorot_uniform on [P, a, b]: fan_in = a·P, fan_out = b·P
            lim_u = math.sqrt(6.0 / (P * (1 + d)))
            lim_w = math.sqrt(6.0 / (P * 2 * d))
            u = _uniform((3, P, d), lim_u, g)
            w_zr = torch.cat([_uniform((P, d, d), lim_w, g), _uniform((P, d, d), lim_w, g)], dim=-1)
            w_h = _uniform((P, d, d), lim_w, g)
            w_out = _uniform((P, d), math.sqrt(6.0 / (P * (d + 1))), g)
            b_out = _uniform((P,), math.sqrt(3.0 / P), g)
        else:  # ours: PyTorch-GRU-like weights, zero output layer (θ* = θ_t at the start)
            lim = 1.0 / math.sqrt(d)
            u = _uniform((3, P, d), lim, g)
            w_zr = _uniform((P, d, 2 * d), lim, g)
            w_h = _uniform((P, d, d), lim, g)
            w_out = torch.zeros(P, d)
            b_out = torch.zeros(P)
        self.u = nn.Parameter(u)  # input weights of z, r, h̃: [3, P, d]
        self.w_zr = nn.Parameter(w_zr)  # recurrent weights of z | r: [P, d, 2d]
        self.w_h = nn.Parameter(w_h)  # recurrent weights of h̃: [P, d, d]
        self.bias = nn.Parameter(torch.zeros(3, P, d)) if gate_bias else None
        self.w_out = nn.Parameter(w_out)  # [P, d]
        self.b_out = nn.Parameter(b_out)  # [P]

    def init_state(self, n_rows: int) -> Tensor:
        return torch.zeros(n_rows, self.n_coords, self.hidden, device=self.u.device)

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        """One GRU step: x ``[N, P]``, h ``[N, P, d]`` -> h' ``[N, P, d]``."""
        d = self.hidden
        xe = x.unsqueeze(-1)
        hw = torch.einsum("npi,pij->npj", h, self.w_zr)
        pre_z = xe * self.u[0] + hw[..., :d]
        pre_r = xe * self.u[1] + hw[..., d:]
        pre_h = xe * self.u[2]
        if self.bias is not None:
            pre_z, pre_r, pre_h = pre_z + self.bias[0], pre_r + self.bias[1], pre_h + self.bias[2]
        z = torch.sigmoid(pre_z)
        r = torch.sigmoid(pre_r)
        h_tilde = torch.tanh(pre_h + torch.einsum("npi,pij->npj", r * h, self.w_h))
        return h + z * (h_tilde - h)

    def output(self, x: Tensor, h: Tensor) -> Tensor:
        """Generated coordinates ``[N, P]`` from the input ``[N, P]`` and the new state ``[N, P, d]``."""
        y = (h * self.w_out).sum(-1) + self.b_out
        return x + y if self.residual else y
