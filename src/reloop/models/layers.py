"""Shared layers every model is composed from (embedding -> interaction -> MLP -> logit)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from reloop.data.schema import PAD, FeatureMap

Batch = dict[str, Tensor]


def apply_function(fn: type[torch.autograd.Function], *args: object) -> Tensor:
    """``fn.apply(*args)`` for a ``Function`` whose forward returns one tensor, typed (torch leaves
    ``Function.apply`` unannotated)."""
    out: Tensor = fn.apply(*args)  # type: ignore[no-untyped-call]  # torch: Function.apply is unannotated
    return out


class _LookupRows(torch.autograd.Function):
    """Row lookups of several fields in one autograd node: ``[B, n_fields, dim]``.

    Forward is ``index_select`` per field (what ``F.embedding`` does). Backward adds each field's rows
    into its table's gradient with one ``index_add_`` on the flattened table, a sequential loop in row
    order whatever the thread count (deterministic; the same sums in the same order as ``nn.Embedding``),
    and zeroes the ``PAD`` row: exactly ``nn.Embedding(padding_idx=PAD)``'s gradient. On CPU,
    ``nn.Embedding``'s dense backward launches one add kernel per looked-up row (``B x fields`` launches
    per step) and ``index_put_(accumulate=True)`` turns to nondeterministic atomics with several threads;
    this is 3-4x faster than the former. Weights are passed explicitly so that generated weights
    (``functional_call``: ASMG, SML) work.
    """

    @staticmethod
    def forward(ctx: Any, table_of: tuple[int, ...], n_tables: int, *tensors: Tensor) -> Tensor:
        weights, ids = tensors[:n_tables], tensors[n_tables:]
        ctx.table_of = table_of
        ctx.shapes = [(w.shape, w.dtype) for w in weights]
        ctx.save_for_backward(*ids)
        return torch.stack([weights[t].index_select(0, i) for t, i in zip(table_of, ids)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        ids = ctx.saved_tensors
        n_tables = len(ctx.shapes)
        grads: list[Tensor | None] = [None] * n_tables
        for j, (t, i) in enumerate(zip(ctx.table_of, ids)):
            if not ctx.needs_input_grad[2 + t]:
                continue
            shape, dtype = ctx.shapes[t]
            acc = grads[t]
            if acc is None:
                acc = grads[t] = torch.zeros(shape, dtype=dtype, device=grad.device)
            dim = shape[1]
            if dim == 1:
                flat = i
            else:  # element index row * dim + k (int32 while it fits: half the memory traffic)
                wide = i if shape[0] * dim < 2**31 else i.long()
                flat = torch.add(
                    torch.arange(dim, dtype=wide.dtype, device=i.device), wide.unsqueeze(1), alpha=dim
                ).view(-1)
            acc.view(-1).index_add_(0, flat, grad[:, j].to(dtype).reshape(-1))
        for g in grads:
            if g is not None:
                g[PAD] = 0
        return (None, None, *grads, *([None] * len(ids)))


class EmbeddedBatch(dict[str, Tensor]):
    """A batch that carries one ``FeatureEmbedding``'s output for it, so a forward pass reuses exactly
    those embeddings (``CTRModel.forward_key``: the memory key and the prediction come from one
    computation). The carried tensor lives on this per-call object only: no module or global state."""

    def __init__(self, batch: Batch, layer: nn.Module, embeddings: Tensor) -> None:
        super().__init__(batch)
        self.carried = (layer, embeddings)


def _hooked(modules: Sequence[nn.Module]) -> bool:
    from torch.nn.modules import module as _m

    if _m._global_forward_pre_hooks or _m._global_forward_hooks:
        return True
    return any(m._forward_pre_hooks or m._forward_hooks for m in modules)


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
        # Single-id fields are looked up together (one autograd node); see ``_LookupRows``.
        self._cat_fields = [f for f in feature_map.fields if f.kind == "categorical"]
        self._cat_tables = list(dict.fromkeys(f.table for f in self._cat_fields))
        self._cat_table_of = tuple(self._cat_tables.index(f.table) for f in self._cat_fields)
        self._all_categorical = len(self._cat_fields) == len(feature_map.fields)
        numeric = feature_map.of_kind("numeric")
        self.numeric_names = [f.name for f in numeric]
        self.numeric = nn.Parameter(torch.empty(len(numeric), dim)) if numeric else None
        self.reset_parameters(init_std)

    def table(self, name: str) -> nn.Embedding:
        """The embedding table ``name`` (a key of ``feature_map.tables``)."""
        table = self.tables[name]
        assert isinstance(table, nn.Embedding)
        return table

    def reset_parameters(self, init_std: float) -> None:
        for name in self.tables:
            table = self.table(name)
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
        emb: Tensor = self.tables[self._fields[name].table](ids)
        return emb, ids != PAD

    def lookup(self, batch: Batch, name: str) -> Tensor:
        """``[B, dim]`` embedding of a single categorical field."""
        emb: Tensor = self.tables[self._fields[name].table](batch[name])
        return emb

    def _categorical(self, batch: Batch) -> Tensor | None:
        """``[B, n_categorical, dim]`` for the categorical fields, in field order (None if there are none)."""
        if not self._cat_fields:
            return None
        modules = [self.table(t) for t in self._cat_tables]
        weights = [m.weight for m in modules]
        ids = [batch[f.name] for f in self._cat_fields]
        # CUDA's embedding backward is already one kernel; hooks on the tables (ASMG watches the rows
        # read with forward pre-hooks) must see every call: both go through the modules.
        if weights[0].device.type != "cpu" or _hooked(modules) or any(i.dim() != 1 for i in ids):
            return torch.stack([modules[t](i) for t, i in zip(self._cat_table_of, ids)], dim=1)
        return apply_function(_LookupRows, self._cat_table_of, len(weights), *weights, *ids)

    def forward(self, batch: Batch) -> Tensor:
        if type(batch) is EmbeddedBatch and batch.carried[0] is self:
            return batch.carried[1]
        cat = self._categorical(batch)
        if self._all_categorical and cat is not None:
            return cat
        out = []
        num_i = 0
        cat_i = 0
        for f in self.feature_map.fields:
            x = batch[f.name]
            if f.kind == "categorical":
                assert cat is not None  # there is a categorical field
                out.append(cat[:, cat_i])
                cat_i += 1
            elif f.kind == "sequence":
                # Mask explicitly: generated weights (ASMG, SML) need not keep the padding row at zero.
                mask = (x != PAD).unsqueeze(-1).to(self.table(f.table).weight.dtype)
                emb = self.tables[f.table](x) * mask
                out.append(emb.sum(1) / mask.sum(1).clamp(min=1))
            else:
                assert self.numeric is not None  # there is a numeric field
                out.append(x.unsqueeze(-1).to(self.numeric.dtype) * self.numeric[num_i])
                num_i += 1
        return torch.stack(out, dim=1)


class MLP(nn.Module):
    """Dense tower: Linear -> activation (-> dropout) per hidden layer; output = last hidden layer."""

    def __init__(
        self,
        in_dim: int,
        hidden_units: list[int],
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden_units:
            linear = nn.Linear(d, h)
            # Biases start at zero: with small embedding inits every row's input is nearly the same, so
            # random biases would switch each ReLU on or off for all rows alike, and a narrow layer
            # can start (and stay) all off — emb_mlp [40, 20, 10] seed 3 on MovieLens-100K did.
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def fm_interaction(emb: Tensor) -> Tensor:
    """Bi-interaction pooling of FM (Rendle 2010): 0.5 * ((sum_i v_i)^2 - sum_i v_i^2), ``[B, d]``.

    Summing the result over d gives the FM second-order term sum_{i<j} <v_i, v_j>.
    """
    if torch.is_grad_enabled() and emb.requires_grad:
        return apply_function(_FMInteraction, emb)
    s = emb.sum(1)
    return 0.5 * (s * s - (emb * emb).sum(1))


class _FMInteraction(torch.autograd.Function):
    """``fm_interaction`` with the same forward and a one-pass backward, ``dL/dv_i = g * s - g * v_i``
    (autograd's per-op backward multiplies the broadcast gradient into ``[B, F, d]`` twice more, on a
    slow broadcasting path; this was the largest non-matmul cost of a DeepFM step on CPU)."""

    @staticmethod
    def forward(ctx: Any, emb: Tensor) -> Tensor:
        s = emb.sum(1)
        ctx.save_for_backward(emb, s)
        return 0.5 * (s * s - (emb * emb).sum(1))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        emb, s = ctx.saved_tensors
        g = grad.to(emb.dtype)
        return torch.addcmul((g * s).unsqueeze(1), emb, g.unsqueeze(1), value=-1)  # g*s - g*v_i, one pass


class CrossNet(nn.Module):
    """DCN cross network (Wang et al. 2017): x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l."""

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.randn(in_dim) * 0.01) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(in_dim)) for _ in range(num_layers)])

    def forward(self, x0: Tensor) -> Tensor:
        ws, bs = list(self.w), list(self.b)
        if (
            torch.is_grad_enabled()
            and x0.device.type == "cpu"
            and (x0.requires_grad or any(t.requires_grad for t in ws + bs))
        ):
            return apply_function(_CrossLayers, len(ws), x0, *ws, *bs)
        return _cross_forward(x0, ws, bs)[0]


def _cross_forward(x0: Tensor, ws: list[Tensor], bs: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``x_{l+1} = (x0 * (x_l . w_l) + b_l) + x_l``; also returns the layer inputs x_l and the s_l."""
    x = x0
    inputs: list[Tensor] = []
    scales: list[Tensor] = []
    for w, b in zip(ws, bs):
        s = (x @ w).unsqueeze(-1)
        inputs.append(x)
        scales.append(s)
        # (b + x0 * s) + x, the reference's order, in one multiply-add pass instead of two elementwise
        # passes (the multiply-add may round once where two ops round twice)
        x = torch.addcmul(b, x0, s).add_(x)
    return x, inputs, scales


class _CrossLayers(torch.autograd.Function):
    """The cross network in one autograd node (CPU): the same forward, a hand-fused backward.

    For ``x_{l+1} = x0 * s_l + b_l + x_l`` with ``s_l = x_l . w_l`` and ``g = dL/dx_{l+1}``:
    ``dL/ds_l = g . x0``, ``dL/db_l = sum_B g``, ``dL/dw_l = x_l^T dL/ds_l``, ``dL/dx0 += g * s_l`` and
    ``dL/dx_l = g + dL/ds_l w_l^T`` (updated in place). About half the passes over ``[B, F*d]`` that
    autograd's per-op backward makes (the DCN step is dominated by them on CPU). Gradients equal
    autograd's up to float summation order.
    """

    @staticmethod
    def forward(ctx: Any, n: int, x0: Tensor, *params: Tensor) -> Tensor:
        ws, bs = list(params[:n]), list(params[n:])
        out, inputs, scales = _cross_forward(x0, ws, bs)
        ctx.n = n
        ctx.save_for_backward(x0, *ws, *inputs, *scales)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.n
        saved = ctx.saved_tensors
        x0, ws, inputs, scales = saved[0], saved[1 : 1 + n], saved[1 + n : 1 + 2 * n], saved[1 + 2 * n :]
        g = grad.to(x0.dtype, copy=True)  # updated in place below
        gx0 = torch.zeros_like(x0)
        gws: list[Tensor | None] = [None] * n
        gbs: list[Tensor | None] = [None] * n
        for layer in reversed(range(n)):
            ds = torch.linalg.vecdot(g, x0)  # dL/ds_l, [B]
            gbs[layer] = g.sum(0)
            gx0.addcmul_(g, scales[layer].to(g.dtype))
            gws[layer] = torch.mv(inputs[layer].to(g.dtype).t(), ds).to(ws[layer].dtype)
            g.addr_(ds, ws[layer].to(g.dtype))  # dL/dx_l = g + ds w_l^T
        gx0.add_(g)  # x_0 is x0
        return (None, gx0, *gws, *gbs)
