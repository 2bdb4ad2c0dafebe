"""ASMG-Linear (Peng et al. 2021; METHODS-notes §3.6): a learned per-coordinate convex mix of k models.

Θ* = Σ_j softmax(w)_j Θ_{t−k+1+j}, w = 0 at the start (the uniform average), trained single-step on D_{t+1}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.tensors import History
from reloop.registry import Strict
from reloop.update.generators.base import GENERATORS, LearnContext
from reloop.update.generators.learned import _LearnedGenerator
from reloop.update.generators.param_layout import Params, ParamSpec, module_key, zero_padding


class LinearMix(nn.Module):
    """Per-coordinate convex combination of k models: softmax(w)_j over the last axis, w = 0 at start."""

    def __init__(self, shape: Sequence[int], k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(*shape, k))

    def forward(self, stacked: Tensor) -> Tensor:
        """``stacked``: ``[..., k]`` (embedding tables ``[N, d_e, k]`` broadcast against w ``[d_e, k]``)."""
        return (stacked * torch.softmax(self.w, dim=-1)).sum(-1)


@GENERATORS.register("asmg_linear")
class ASMGLinear(_LearnedGenerator):
    """ASMG-Linear: Θ* = Σ_j softmax(w)_j Θ_{t−k+1+j}; w ``[d_e, k]`` per embedding table (shared over
    ids), ``[shape..., k]`` per dense tensor; trained single-step on D_{t+1} (METHODS-notes §3.6)."""

    class Options(Strict):
        """``generator: {asmg_linear: {...}}``."""

        search_space = {"k": [2, 3, 4]}
        k: int = Field(default=3, ge=1)
        lr: float = Field(default=1e-2, gt=0)
        epochs: int = Field(default=1, ge=1)
        warmup: int = Field(default=1, ge=0)
        seed: int = 0
        sparse_rows: bool = True

    def __init__(
        self, k: int = 3, lr: float = 1e-2, epochs: int = 1, warmup: int = 1, seed: int = 0, sparse_rows: bool = True
    ) -> None:
        super().__init__(lr=lr, epochs=epochs, warmup=warmup, seed=seed, sparse_rows=sparse_rows)
        self.k = k

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k}

    def _min_models(self) -> int:
        return self.k

    def _max_models(self) -> int | None:
        return self.k

    def _build_meta(self, specs: list[ParamSpec], generator: torch.Generator) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                module_key(s["name"]): LinearMix([s["shape"][1]] if s["kind"] == "embedding" else s["shape"], self.k)
                for s in specs
            }
        )

    def generate(self, models: Sequence[Params], rows: dict[str, Tensor] | None = None) -> Params:
        """The mix of ``models``; ``rows`` restricts embedding tables to those rows (see ``ASMGGRU.generate``)."""
        out = {}
        specs, meta = self._layout()
        for spec in specs:
            name = spec["name"]
            idx = rows.get(name) if rows is not None else None
            stacked = torch.stack([m[name] if idx is None else m[name][idx] for m in models], dim=-1)
            y = meta[module_key(name)](stacked)
            if idx is not None:
                y = models[-1][name].index_put((idx,), y)
            out[name] = zero_padding(spec, y)
        return out

    def _serving_params(self) -> Params:
        return self.generate([p for _, p in self._models])

    def _fit(self, history: History, t_next: int, ctx: LearnContext) -> None:
        models = [p for _, p in self._models]
        self._train_on_targets(
            history,
            ctx,
            [t_next],
            torch.ones(1, dtype=torch.float64),
            lambda active, rows: {0: self.generate(models, rows)},
        )
