"""SML transfer generator (Zhang et al., SIGIR 2020) as in the ASMG reference code (METHODS-notes §3.6).

A transfer module f combines the previous model W_prev with the new candidate W_hat, per parameter
tensor: Θ* = f(W_prev, W_hat). Per row of an embedding table (weights shared across rows) and on each
flattened dense tensor (own weights), the channels ``[w_prev, w_hat, w_prev ⊙ w_hat / ||w_prev||]``
(``[N, 3, D]``) go through
    conv 3→n1 (a 3×1 filter across the channels) → GELU → conv n1→n2 (1×1) → GELU → flatten (n2·D)
    → FC l1 → GELU → FC D.
Sizes (reference): embeddings n1 = 10, n2 = 5, l1 = 20; dense n1 = 5, n2 = 3, l1 per tensor (ML/Tmall:
fc1 kernel 80, bias 40, fc2 kernel 40, bias 20, fc3 kernel 20, bias 2, i.e. 2 × the tensor's last
dimension in PyTorch layout, our default rule).

Composition with our protocol **(ours, deviation)**: the reference trains W_hat on D_t *through* the
transfer output (f frozen) and then sets W_prev := f(W_prev, W_hat), so its base chain is the SML chain.
Here the base update (any: IU, BU, replay, ...) already produced Θ_t from Θ_{t−1} on D_t, and SML reuses
it as W_hat:
    observe(t, Θ_t):    W_hat := Θ_t            (W_prev := Θ_t at the first observation)
    serving_model:      Θ*_t = f(W_prev, Θ_t)
    learn(.., t+1, ..): train f on D_{t+1} (Adam, W_prev and Θ_t frozen), then W_prev := f(W_prev, Θ_t)
                        with the updated f (detached).
So SML composes with every base update, and the base chain is not altered by the transfer.

Further choices: ``init='identity'`` **(ours, default)**: residual output Θ* = W_hat + FC(...) with the
last FC zero at the start (serves Θ_t untrained); ``init='glorot'``: the reference's non-residual output
with glorot-uniform weights (fans of each 2-D weight) and zero biases. ``||w_prev||`` is clamped at 1e-12
(the padding row is zero). Warm-up, padding rows, Adam state and the BCE loss as in ``asmg.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from reloop.data.tensors import History
from reloop.models.base import CTRModel
from reloop.registry import Strict
from reloop.update.generators.base import GENERATORS, LearnContext
from reloop.update.generators.learned import INITS, Init, _LearnedGenerator, _params_to, _uniform
from reloop.update.generators.param_layout import Params, ParamSpec, as_rows, module_key, zero_padding


def _glorot(fan_in: int, fan_out: int, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return _uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)), g)


class TransferCNN(nn.Module):
    """f(W_prev, W_hat) on ``[N, D]`` rows (N = ids of a table, or 1 for a flattened dense tensor)."""

    def __init__(
        self, dim: int, n1: int, n2: int, l1: int, init: str = "identity", generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.dim, self.residual = dim, init == "identity"
        self.conv1 = nn.Parameter(_glorot(3, n1, (n1, 3), g))
        self.conv1_b = nn.Parameter(torch.zeros(n1))
        self.conv2 = nn.Parameter(_glorot(n1, n2, (n2, n1), g))
        self.conv2_b = nn.Parameter(torch.zeros(n2))
        self.fc1 = nn.Parameter(_glorot(n2 * dim, l1, (n2 * dim, l1), g))
        self.fc1_b = nn.Parameter(torch.zeros(l1))
        fc2 = torch.zeros(l1, dim) if self.residual else _glorot(l1, dim, (l1, dim), g)
        self.fc2 = nn.Parameter(fc2)
        self.fc2_b = nn.Parameter(torch.zeros(dim))

    def forward(self, prev: Tensor, hat: Tensor) -> Tensor:
        norm = prev.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        x = torch.stack([prev, hat, prev * hat / norm], dim=1)  # [N, 3, D]
        a = F.gelu(torch.einsum("ncd,fc->nfd", x, self.conv1) + self.conv1_b[:, None])
        a = F.gelu(torch.einsum("nfd,gf->ngd", a, self.conv2) + self.conv2_b[:, None])
        a = F.gelu(a.flatten(1) @ self.fc1 + self.fc1_b)
        y = a @ self.fc2 + self.fc2_b
        return hat + y if self.residual else y


@GENERATORS.register("sml")
class SML(_LearnedGenerator):
    """SML transfer Θ*_t = f(W_prev, Θ_t) (see the module docstring for the composition)."""

    class Options(Strict):
        """``generator: sml`` or ``generator: {sml: {...}}``."""

        search_space = {"lr": [1e-4, 1e-3]}
        lr: float = Field(default=1e-3, gt=0)
        epochs: int = Field(default=1, ge=1)
        warmup: int = Field(default=1, ge=0)
        init: Init = "identity"
        emb_n1: int = Field(default=10, ge=1)
        emb_n2: int = Field(default=5, ge=1)
        emb_l1: int = Field(default=20, ge=1)
        dense_n1: int = Field(default=5, ge=1)
        dense_n2: int = Field(default=3, ge=1)
        dense_l1: int | None = Field(default=None, ge=1)
        seed: int = 0
        sparse_rows: bool = True

    def __init__(
        self,
        lr: float = 1e-3,
        epochs: int = 1,
        warmup: int = 1,
        init: str = "identity",
        emb_n1: int = 10,
        emb_n2: int = 5,
        emb_l1: int = 20,
        dense_n1: int = 5,
        dense_n2: int = 3,
        dense_l1: int | None = None,
        seed: int = 0,
        sparse_rows: bool = True,
    ) -> None:
        super().__init__(lr=lr, epochs=epochs, warmup=warmup, seed=seed, sparse_rows=sparse_rows)
        self.init = init
        self.emb = (emb_n1, emb_n2, emb_l1)
        self.dense = (dense_n1, dense_n2, dense_l1)
        self._prev: Params | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "init": self.init, "emb": list(self.emb), "dense": list(self.dense)}

    def dense_l1(self, shape: list[int]) -> int:
        return self.dense[2] if self.dense[2] is not None else 2 * shape[-1]

    def _build_meta(self, specs: list[ParamSpec], generator: torch.Generator) -> nn.ModuleDict:
        mods = {}
        for s in specs:
            if s["kind"] == "embedding":
                n1, n2, l1 = self.emb
                dim = s["shape"][1]
            else:
                n1, n2, _ = self.dense
                l1, dim = self.dense_l1(s["shape"]), math.prod(s["shape"])
            mods[module_key(s["name"])] = TransferCNN(dim, n1, n2, l1, self.init, generator)
        return nn.ModuleDict(mods)

    def observe(self, t: int, model: CTRModel) -> None:
        super().observe(t, model)
        if self._prev is None:
            self._prev = {name: p.clone() for name, p in self._models[-1][1].items()}

    def transfer(self, prev: Params, hat: Params, rows: dict[str, Tensor] | None = None) -> Params:
        """f(W_prev, W_hat) per tensor; ``rows`` restricts embedding tables to those rows (the others keep
        W_hat's values; training speed-up, see ``_train_on_targets`` in ``asmg.py``)."""
        out = {}
        specs, meta = self._layout()
        for spec in specs:
            name = spec["name"]
            idx = rows.get(name) if rows is not None else None
            p, h = as_rows(spec, prev[name]), as_rows(spec, hat[name])
            if idx is not None:
                p, h = p[idx], h[idx]
            y = meta[module_key(name)](p, h)
            if idx is not None:
                y = hat[name].index_put((idx,), y)
            out[name] = zero_padding(spec, y.reshape(spec["shape"]))
        return out

    def _previous(self) -> Params:
        """W_prev (set by the first ``observe``)."""
        if self._prev is None:
            raise RuntimeError(f"{self.name}: no model observed yet; call observe() first")
        return self._prev

    def _serving_params(self) -> Params:
        return self.transfer(self._previous(), self._models[-1][1])

    def _fit(self, history: History, t_next: int, ctx: LearnContext) -> None:
        prev, hat = self._previous(), self._models[-1][1]
        self._train_on_targets(
            history,
            ctx,
            [t_next],
            torch.ones(1, dtype=torch.float64),
            lambda active, rows: {0: self.transfer(prev, hat, rows)},
        )
        with torch.no_grad():
            self._prev = {name: v.detach().clone() for name, v in self.transfer(prev, hat).items()}

    def _extra_state(self) -> dict[str, Any]:
        return {"prev": self._prev}

    def _extra_to(self, device: torch.device) -> None:
        self._prev = _params_to(self._prev, device)

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._prev = state["prev"]
