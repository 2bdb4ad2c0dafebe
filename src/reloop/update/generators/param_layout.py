"""How the learned generators (ASMG-GRU, ASMG-Linear, SML) see a CTR model's parameters.

Each parameter tensor is described by a plain spec dict (name, kind, shape, padding row) and read as
coordinate rows ``[N, P]``: an embedding table ``[N, d_e]`` as it is (P = d_e coordinates, shared by
its N ids), a dense tensor as one row of P = numel coordinates (METHODS.md "Model generators",
METHODS-notes §3.4: ASMG's generator is applied coordinate-wise).
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch
from torch import Tensor

from reloop.models.base import CTRModel

Params = dict[str, Tensor]


class ParamSpec(TypedDict):
    """One parameter of a model as the generators see it (a plain dict at run time)."""

    name: str
    kind: str  # "embedding" (rows indexed by id) | "dense"
    shape: list[int]
    padding_idx: int | None


def param_specs(model: CTRModel) -> list[ParamSpec]:
    """One plain dict per parameter: ``name``, ``kind`` (``embedding`` | ``dense``), ``shape``, ``padding_idx``.

    Plain dicts (not dataclasses) so the generator's state loads with ``torch.load(weights_only=True)``.
    """
    groups = model.param_groups()
    specs: list[ParamSpec] = []
    for name, p in model.named_parameters():
        kind = groups.get(name, "dense")
        pad = None
        if kind == "embedding":
            if p.dim() != 2:
                raise ValueError(f"embedding parameter {name!r} must be 2-D [ids, dim], got {tuple(p.shape)}")
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            pad = getattr(owner, "padding_idx", None)
        specs.append({"name": name, "kind": kind, "shape": list(p.shape), "padding_idx": pad})
    return specs


def snapshot(model: CTRModel) -> Params:
    """Detached copies of every parameter of ``model``."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def zero_padding(spec: ParamSpec, value: Tensor) -> Tensor:
    """Force the padding row of a generated embedding table to zero (differentiable elsewhere)."""
    pad = spec["padding_idx"]
    if spec["kind"] != "embedding" or pad is None:
        return value
    return value.index_fill(0, torch.tensor([pad], device=value.device), 0.0)


def as_rows(spec: ParamSpec, value: Tensor) -> Tensor:
    """``[N, P]`` view: embedding tables as they are (P = d_e), dense tensors as one row (P = numel)."""
    return value if spec["kind"] == "embedding" else value.reshape(1, -1)


def n_coords(spec: ParamSpec) -> int:
    """P: the number of coordinates that get their own generator weights."""
    return spec["shape"][1] if spec["kind"] == "embedding" else math.prod(spec["shape"])


def module_key(name: str) -> str:
    """``nn.ModuleDict`` keys may not contain dots."""
    return name.replace(".", "__")
