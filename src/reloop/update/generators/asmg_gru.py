"""ASMG-GRU: the meta generator over the k most recent base models (Peng et al. 2021, Algorithm 1).

Θ*_t = GRU(Θ_{t−k+1..t}) run coordinate-wise (:class:`CoordinateGRU`), trained on the periods after
its window's models with the loss weights of the variant (:func:`loss_weights`), the hidden state
carried across periods (METHODS.md "Model generators", METHODS-notes §3.4; the choices that differ from
the reference code are listed in the docstring of :mod:`reloop.update.generators.asmg`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.tensors import History
from reloop.registry import Strict
from reloop.update.generators.base import GENERATORS, LearnContext
from reloop.update.generators.coordinate_gru import CoordinateGRU
from reloop.update.generators.learned import Init, _LearnedGenerator, _params_to
from reloop.update.generators.param_layout import Params, ParamSpec, as_rows, module_key, n_coords, zero_padding

Variant = Literal["multi", "single", "unif", "zero", "full"]
VARIANTS: tuple[str, ...] = get_args(Variant)


def loss_weights(variant: str, n: int) -> Tensor:
    """Weights of the n steps of the window: step j's output is judged on the period after its model.

    ``multi`` / ``zero`` / ``full``: j / Σ_{j'=1..n} j' (later steps weigh more; 1/6, 2/6, 3/6 for n = 3);
    ``unif``: 1/n each; ``single``: only the last step.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ASMG variant {variant!r}; choose one of {VARIANTS}")
    if n < 1:
        raise ValueError("need at least one step")
    if variant == "single":
        w = torch.zeros(n, dtype=torch.float64)
        w[-1] = 1.0
        return w
    if variant == "unif":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    j = torch.arange(1, n + 1, dtype=torch.float64)
    return j / j.sum()


@GENERATORS.register("asmg_gru")
class ASMGGRU(_LearnedGenerator):
    """ASMG-GRU: coordinate-wise GRU over the k most recent models (see the module docstring).

    Variants: ``multi`` (default: step j judged on the period after its model, weights j/Σj, hidden
    state carried), ``single`` (last step only), ``unif`` (equal weights), ``zero`` (h_0 = 0 every
    period), ``full`` (every model since the first observed, h_0 = 0, multi weights).

    Hidden-state carry: the window of period t+1's training is Θ_{t−k+1..t} started from h_{t−k}; after
    training the window is re-run with the updated GRU from the same start and the state after its
    first step, h_{t−k+1}, is kept: it precedes the next window.
    """

    class Options(Strict):
        """``generator: {asmg_gru: {...}}``."""

        search_space = {"k": [2, 3, 4], "variant": ["multi", "single"]}
        k: int = Field(default=3, ge=1)
        hidden: int = Field(default=4, ge=1)
        variant: Variant = "multi"
        lr: float = Field(default=1e-2, gt=0)
        epochs: int = Field(default=1, ge=1)
        gate_bias: bool = True
        init: Init = "identity"
        warmup: int = Field(default=1, ge=0)
        seed: int = 0
        sparse_rows: bool = True

    def __init__(
        self,
        k: int = 3,
        hidden: int = 4,
        variant: str = "multi",
        lr: float = 1e-2,
        epochs: int = 1,
        gate_bias: bool = True,
        init: str = "identity",
        warmup: int = 1,
        seed: int = 0,
        sparse_rows: bool = True,
    ) -> None:
        super().__init__(lr=lr, epochs=epochs, warmup=warmup, seed=seed, sparse_rows=sparse_rows)
        self.k, self.hidden, self.variant = k, hidden, variant
        self.gate_bias, self.init = gate_bias, init
        self._h: Params | None = None  # carried state preceding the current window's first model

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "k": self.k,
            "hidden": self.hidden,
            "variant": self.variant,
            "gate_bias": self.gate_bias,
            "init": self.init,
        }

    def _min_models(self) -> int:
        return self.k

    def _max_models(self) -> int | None:
        return None if self.variant == "full" else self.k

    def _build_meta(self, specs: list[ParamSpec], generator: torch.Generator) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                module_key(s["name"]): CoordinateGRU(n_coords(s), self.hidden, self.gate_bias, self.init, generator)
                for s in specs
            }
        )

    # ---- the generator itself ----------------------------------------------------------------------
    def window(self) -> list[tuple[int, Params]]:
        """The models the next generation runs over (k most recent; every model for ``full``)."""
        return list(self._models) if self.variant == "full" else self._models[-self.k :]

    def initial_state(self) -> Params | None:
        """h before the window's first model (None = zeros)."""
        return None if self.variant in ("zero", "full") else self._h

    def generate(
        self,
        models: Sequence[Params],
        h0: Params | None = None,
        outputs: Sequence[int] | None = None,
        rows: dict[str, Tensor] | None = None,
    ) -> tuple[dict[int, Params], list[Params]]:
        """Run the GRU over ``models`` (oldest first) from ``h0``.

        Returns the generated parameters of the steps in ``outputs`` (default: the last step) and the
        hidden state after every step (``[N, P, d]`` per tensor). ``rows`` (embedding parameter -> row
        ids) restricts a table's GRU to those rows: the other rows of its output hold the latest model's
        values and its hidden states cover only those rows (training speed-up, see ``_train_on_targets``).
        """
        n = len(models)
        want = [n - 1] if outputs is None else list(outputs)
        outs: dict[int, Params] = {j: {} for j in want}
        states: list[Params] = [{} for _ in range(n)]
        specs, meta = self._layout()
        for spec in specs:
            name = spec["name"]
            gru = meta[module_key(name)]
            assert isinstance(gru, CoordinateGRU)
            idx = rows.get(name) if rows is not None else None
            h = h0[name] if h0 is not None else None
            if idx is not None and h is not None:
                h = h[idx]
            for j, params in enumerate(models):
                x = as_rows(spec, params[name])
                if idx is not None:
                    x = x[idx]
                if h is None:
                    h = gru.init_state(x.shape[0])
                h = gru.step(x, h)
                states[j][name] = h
                if j in outs:
                    y = gru.output(x, h)
                    if idx is not None:
                        y = models[-1][name].index_put((idx,), y)
                    outs[j][name] = zero_padding(spec, y.reshape(spec["shape"]))
        return outs, states

    def _serving_params(self) -> Params:
        models = [p for _, p in self.window()]
        outs, _ = self.generate(models, self.initial_state())
        return outs[len(models) - 1]

    def _fit(self, history: History, t_next: int, ctx: LearnContext) -> None:
        window = self.window()
        models = [p for _, p in window]
        targets = [t + 1 for t, _ in window]
        weights = loss_weights(self.variant, len(models))
        h0 = self.initial_state()
        self._train_on_targets(
            history, ctx, targets, weights, lambda active, rows: self.generate(models, h0, active, rows)[0]
        )
        if self.variant in ("zero", "full"):
            self._h = None
            return
        with torch.no_grad():
            _, states = self.generate(models, h0, outputs=[])
        self._h = {name: h.detach().clone() for name, h in states[0].items()}

    def _extra_state(self) -> dict[str, Any]:
        return {"h": self._h}

    def _extra_to(self, device: torch.device) -> None:
        self._h = _params_to(self._h, device)

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._h = state["h"]
