"""ASMG model generators (Peng et al., RecSys 2021; METHODS.md "Model generators", METHODS-notes §3.4, §3.6).

A meta generator M_ω maps the k most recent base models Θ_{t−k+1..t} to the serving model Θ*_t and is
trained on the *next* period's data with the base models frozen (test-then-train, ASMG Algorithm 1):

    observe(t, Θ_t)  ->  serving_model(Θ_t) = Θ*_t serves D_{t+1}  ->  learn(History(upto=t+1), t+1, ctx)

- :class:`ASMGGRU`: a coordinate-wise GRU (:class:`CoordinateGRU`). Dense (MLP) tensors get one GRU per
  scalar coordinate; an embedding table ``[N, d_e]`` gets one GRU per embedding dimension, shared by
  all N ids. Everything is vectorised: one step of a tensor is a handful of batched matmuls.
- :class:`ASMGLinear`: Θ* = Σ_j softmax(w)_j Θ_{t−k+1+j}, one w per coordinate (per dimension for
  embedding tables), w = 0 at the start (uniform average), trained single-step on D_{t+1}.

Choices that differ from the reference code (``danni9594/ASMG``), each an option:

- ``init='identity'`` **(ours, default)**: residual output θ* = θ_t + w·h' + b with w = 0 and b = 0 at
  the start, so the untrained generator serves exactly the latest base model; the GRU's input and
  recurrent weights start at U(±1/√d) (PyTorch's GRU convention, independent of the tensor size).
  ``init='glorot'`` reproduces the reference: θ* = w·h' + b (no residual) and TF ``glorot_uniform`` on the
  3-D shapes ``[P, a, b]`` (fan_in = a·P, fan_out = b·P), so the untrained output is *not* near θ_t.
- ``gate_bias=True`` **(ours, default)**: r, z and h̃ get biases (zero at the start); the reference has
  none (``gate_bias=False``).
- Warm-up: until the generator was trained ``warmup`` times (default 1) and holds k observed models,
  ``serving_model`` returns the base model unchanged; ``learn`` is a no-op while fewer than k models
  were observed (the reference starts meta-training at the first period with k models, h_0 = 0).
- The padding row (``nn.Embedding.padding_idx``) of generated embedding tables is forced to zero: our
  models pool sequences assuming that row is zero (the TF reference masks instead).
- The meta optimiser (Adam) keeps its state across periods, as IU keeps the base optimiser's.
- The generator trains on plain BCE on logits, whatever loss the base update uses (as the reference).
- Base-model buffers (e.g. batch-norm statistics) are taken from the latest observed model.
- ``sparse_rows=True`` **(ours, speed only)**: during training, embedding tables are generated only on
  the rows the step's batches read (same loss and gradients; checked once against full tables, with a
  fallback). Serving and the hidden-state carry always use full tables.
- ``full`` variant: the window is every model since the first observed one, targets D_{s+1} for each
  Θ_s, linear multi-step weights over the whole window, h_0 = 0.
- Progress: ``ctx.on_batch`` gets the number of rows (over all targets) of each optimisation step.
- ``last_learn_seconds``: wall time of the latest ``learn`` call (≈ 0 when it had nothing to train).

The observed models are snapshotted (detached clones) on ``observe``; the latest observed model object
is kept only as the architecture template for ``functional_forward`` and is not part of the state: a
generator restored with ``load_state_dict`` takes it from the next ``observe`` / ``serving_model`` call.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reloop.data.tensors import History, LookAheadError
from reloop.models.base import CTRModel
from reloop.update.generators.base import ModelGenerator, functional_forward, materialize

VARIANTS = ("multi", "single", "unif", "zero", "full")
INITS = ("identity", "glorot")

Params = dict[str, Tensor]


# --------------------------------------------------------------------------------------------------
# parameter bookkeeping shared by every learned generator (ASMG-GRU, ASMG-Linear, SML)


def param_specs(model: CTRModel) -> list[dict[str, Any]]:
    """One plain dict per parameter: ``name``, ``kind`` (``embedding`` | ``dense``), ``shape``, ``padding_idx``.

    Plain dicts (not dataclasses) so the generator's state loads with ``torch.load(weights_only=True)``.
    """
    groups = model.param_groups()
    specs = []
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


def zero_padding(spec: dict[str, Any], value: Tensor) -> Tensor:
    """Force the padding row of a generated embedding table to zero (differentiable elsewhere)."""
    pad = spec["padding_idx"]
    if spec["kind"] != "embedding" or pad is None:
        return value
    return value.index_fill(0, torch.tensor([pad]), 0.0)


def as_rows(spec: dict[str, Any], value: Tensor) -> Tensor:
    """``[N, P]`` view: embedding tables as they are (P = d_e), dense tensors as one row (P = numel)."""
    return value if spec["kind"] == "embedding" else value.reshape(1, -1)


def n_coords(spec: dict[str, Any]) -> int:
    """P: the number of coordinates that get their own generator weights."""
    return spec["shape"][1] if spec["kind"] == "embedding" else math.prod(spec["shape"])


def module_key(name: str) -> str:
    """``nn.ModuleDict`` keys may not contain dots."""
    return name.replace(".", "__")


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


def _uniform(shape: Sequence[int], limit: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(*shape, generator=generator) * 2.0 - 1.0) * limit


class _LearnedGenerator(ModelGenerator):
    """Shared machinery: model sequence, meta parameters + Adam, warm-up, timing and state.

    Subclasses implement ``_build_meta``, ``_serving_params`` and ``_fit`` and say how many models they
    need (``_min_models``) and keep (``_max_models``; None = all).
    """

    name: ClassVar[str] = ""

    def __init__(self, lr: float, epochs: int, warmup: int, seed: int, sparse_rows: bool = True) -> None:
        if lr <= 0:
            raise ValueError(f"generator.{self.name}.lr: must be > 0, got {lr}")
        if epochs < 1:
            raise ValueError(f"generator.{self.name}.epochs: must be ≥ 1, got {epochs}")
        if warmup < 0:
            raise ValueError(f"generator.{self.name}.warmup: must be ≥ 0, got {warmup}")
        self.lr, self.epochs, self.warmup, self.seed = lr, epochs, warmup, seed
        self.sparse_rows = sparse_rows
        self._sparse_ok: bool | None = None  # None: not checked yet (see _train_on_targets)
        self._specs: list[dict[str, Any]] | None = None
        self._models: list[tuple[int, Params]] = []
        self.meta: nn.ModuleDict | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.n_trained = 0
        self.last_learn_seconds = 0.0
        self._template: CTRModel | None = None

    # ---- hooks -----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "epochs": self.epochs, "warmup": self.warmup, "seed": self.seed,
                "sparse_rows": self.sparse_rows}

    def _min_models(self) -> int:
        return 1

    def _max_models(self) -> int | None:
        return 1

    def _build_meta(self, specs: list[dict[str, Any]], generator: torch.Generator) -> nn.ModuleDict:
        raise NotImplementedError

    def _serving_params(self) -> Params:
        raise NotImplementedError

    def _fit(self, history: History, t_next: int, ctx: Any) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- protocol --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the generated model serves (warm-up over and enough models observed)."""
        return self.n_trained >= self.warmup and len(self._models) >= self._min_models()

    @property
    def observed_periods(self) -> list[int]:
        return [t for t, _ in self._models]

    def _init_specs(self, specs: list[dict[str, Any]]) -> None:
        self._specs = specs
        self.meta = self._build_meta(specs, torch.Generator().manual_seed(self.seed))

    def observe(self, t: int, model: CTRModel) -> None:
        specs = param_specs(model)
        if self._specs is None:
            self._init_specs(specs)
        elif specs != self._specs:
            raise ValueError(f"{self.name}: observed a model whose parameters differ from the first one")
        if self._models and t <= self._models[-1][0]:
            raise ValueError(f"{self.name}: observe(t={t}) after period {self._models[-1][0]}")
        self._template = model
        self._models.append((t, snapshot(model)))
        keep = self._max_models()
        if keep is not None and len(self._models) > keep:
            del self._models[:-keep]

    def serving_model(self, model: CTRModel) -> CTRModel:
        if self._template is None:
            self._template = model
        if not self.ready:
            return model
        with torch.no_grad():
            params = self._serving_params()
        return materialize(model, params)

    def learn(self, history: History, t_next: int, ctx: Any) -> None:
        start = time.perf_counter()
        try:
            if history.upto < t_next:
                raise LookAheadError(f"{self.name}: learn(t_next={t_next}) with data known up to {history.upto}")
            if len(self._models) < self._min_models():
                return
            last = self._models[-1][0]
            if t_next != last + 1:
                raise ValueError(f"{self.name}: learn(t_next={t_next}) but the latest model is Θ_{last}")
            if self._template is None:
                raise RuntimeError(f"{self.name}: no model template; call observe() first")
            self._fit(history, t_next, ctx)
            self.n_trained += 1
        finally:
            self.last_learn_seconds = time.perf_counter() - start

    # ---- training helper -------------------------------------------------------------------------
    def _optim(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.meta.parameters(), lr=self.lr)
        return self._optimizer

    def _embedding_modules(self) -> dict[str, nn.Embedding]:
        """Embedding-kind parameters owned by an ``nn.Embedding`` of the template (rows can be captured)."""
        out = {}
        for spec in self._specs:
            if spec["kind"] != "embedding" or "." not in spec["name"]:
                continue
            owner = self._template.get_submodule(spec["name"].rpartition(".")[0])
            if isinstance(owner, nn.Embedding):
                out[spec["name"]] = owner
        return out

    def _touched_rows(self, batches: list[dict[str, Tensor]], tables: dict[str, nn.Embedding]) -> dict[str, Tensor]:
        """Rows of each embedding table the template's forward reads on ``batches`` (forward pre-hooks);
        tables whose batches read more than half of their rows are left out (generated in full)."""
        seen: dict[str, list[Tensor]] = {name: [] for name in tables}
        handles = [mod.register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].reshape(-1))) for name, mod in tables.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    self._template(batch)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for name, ids in seen.items():
            rows = torch.unique(torch.cat(ids)) if ids else torch.empty(0, dtype=torch.long)
            if rows.numel() * 2 <= tables[name].num_embeddings:  # else the full table is as cheap
                out[name] = rows
        return out

    def _train_on_targets(self, history: History, ctx: Any, targets: list[int], weights: Tensor,
                          generate: Callable[[list[int], dict[str, Tensor] | None], dict[int, Params]]) -> None:
        """Minimise Σ_j weights[j] · BCE(Θ*_j | D_{targets[j]}) over the meta parameters.

        Batching as the reference's BatchLoader2: ceil(|D_last| / batch_size) optimisation steps per epoch;
        every target period is shuffled (``ctx.generator``) and split into that many batches; one step
        feeds one batch of every target. ``generate(active, rows)`` returns the generated parameters of
        the steps in ``active`` (recomputed every step: the meta parameters change).

        ``sparse_rows`` **(ours, a speed-up with the same loss and gradients)**: embedding tables are
        generated only on the rows the step's batches read (captured with forward pre-hooks on the
        template's ``nn.Embedding`` modules; the other rows hold the latest model's values, never read).
        The first step checks the logits against full-table generation and falls back to full tables
        for good if they differ (a model that reads table weights outside ``forward``).
        """
        active = [j for j in range(len(targets)) if float(weights[j]) > 0.0]
        data = {j: history.period(targets[j]) for j in active}
        last = data[active[-1]]
        n_batches = max(1, math.ceil(len(last) / ctx.train.batch_size))
        optimizer = self._optim()
        template = self._template
        on_batch = getattr(ctx, "on_batch", None)
        tables = self._embedding_modules() if self.sparse_rows and self._sparse_ok is not False else {}
        for _ in range(self.epochs):
            splits = {j: torch.randperm(len(data[j]), generator=ctx.generator).tensor_split(n_batches)
                      for j in active}
            for b in range(n_batches):
                batches = {j: {key: col[splits[j][b]] for key, col in data[j].data.items()}
                           for j in active if splits[j][b].numel() > 0}
                if not batches:
                    continue
                rows = self._touched_rows(list(batches.values()), tables) if tables else None
                outs = generate(active, rows)
                logits = {j: functional_forward(template, outs[j], batch) for j, batch in batches.items()}
                if rows is not None and self._sparse_ok is None:
                    with torch.no_grad():
                        full = generate(active, None)
                        same = all(torch.allclose(logits[j], functional_forward(template, full[j], batch),
                                                  rtol=1e-4, atol=1e-5) for j, batch in batches.items())
                    self._sparse_ok = same
                    if not same:
                        warnings.warn(f"{self.name}: the model reads embedding rows its forward hooks do not "
                                      "see; generating full tables (slower)", stacklevel=2)
                        tables = {}
                        outs = generate(active, None)
                        logits = {j: functional_forward(template, outs[j], batch) for j, batch in batches.items()}
                loss = sum(float(weights[j]) * F.binary_cross_entropy_with_logits(
                    logits[j].float(), batch["label"].float()) for j, batch in batches.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if on_batch is not None:
                    on_batch(sum(batch["label"].shape[0] for batch in batches.values()))

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "generator": self.name,
            "config": self.config(),
            "specs": self._specs,
            "models": [[t, params] for t, params in self._models],
            "meta": self.meta.state_dict() if self.meta is not None else None,
            "optim": self._optimizer.state_dict() if self._optimizer is not None else None,
            "n_trained": self.n_trained,
            "extra": self._extra_state(),
        }
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") != self.name:
            raise ValueError(f"{self.name}: state was saved by generator {state.get('generator')!r}")
        if state["config"] != self.config():
            raise ValueError(f"{self.name}: state was saved with config {state['config']}, "
                             f"this generator has {self.config()}")
        state = copy.deepcopy(state)
        self._specs, self.meta, self._optimizer = None, None, None
        if state["specs"] is not None:
            self._init_specs(state["specs"])
            self.meta.load_state_dict(state["meta"])
        if state["optim"] is not None:
            self._optim().load_state_dict(state["optim"])
        self._models = [(int(t), params) for t, params in state["models"]]
        self.n_trained = int(state["n_trained"])
        self._load_extra_state(state["extra"])


# --------------------------------------------------------------------------------------------------
# ASMG-GRU


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

    def __init__(self, n_coords: int, hidden: int, gate_bias: bool = True, init: str = "identity",
                 generator: torch.Generator | None = None) -> None:
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
        self.u = nn.Parameter(u)            # input weights of z, r, h̃: [3, P, d]
        self.w_zr = nn.Parameter(w_zr)      # recurrent weights of z | r: [P, d, 2d]
        self.w_h = nn.Parameter(w_h)        # recurrent weights of h̃: [P, d, d]
        self.bias = nn.Parameter(torch.zeros(3, P, d)) if gate_bias else None
        self.w_out = nn.Parameter(w_out)    # [P, d]
        self.b_out = nn.Parameter(b_out)    # [P]

    def init_state(self, n_rows: int) -> Tensor:
        return torch.zeros(n_rows, self.n_coords, self.hidden)

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


class ASMGGRU(_LearnedGenerator):
    """ASMG-GRU: coordinate-wise GRU over the k most recent models (see the module docstring).

    Variants: ``multi`` (default: step j judged on the period after its model, weights j/Σj, hidden
    state carried), ``single`` (last step only), ``unif`` (equal weights), ``zero`` (h_0 = 0 every
    period), ``full`` (every model since the first observed, h_0 = 0, multi weights).

    Hidden-state carry: the window of period t+1's training is Θ_{t−k+1..t} started from h_{t−k}; after
    training the window is re-run with the updated GRU from the same start and the state after its
    first step, h_{t−k+1}, is kept: it precedes the next window.
    """

    name = "asmg_gru"

    def __init__(self, k: int = 3, hidden: int = 4, variant: str = "multi", lr: float = 1e-2,
                 epochs: int = 1, gate_bias: bool = True, init: str = "identity", warmup: int = 1,
                 seed: int = 0, sparse_rows: bool = True) -> None:
        super().__init__(lr=lr, epochs=epochs, warmup=warmup, seed=seed, sparse_rows=sparse_rows)
        if k < 1:
            raise ValueError(f"generator.asmg_gru.k: must be ≥ 1, got {k}")
        if hidden < 1:
            raise ValueError(f"generator.asmg_gru.hidden: must be ≥ 1, got {hidden}")
        if variant not in VARIANTS:
            raise ValueError(f"generator.asmg_gru.variant: expected one of {VARIANTS}, got {variant!r}")
        if init not in INITS:
            raise ValueError(f"generator.asmg_gru.init: expected one of {INITS}, got {init!r}")
        self.k, self.hidden, self.variant = k, hidden, variant
        self.gate_bias, self.init = gate_bias, init
        self._h: Params | None = None  # carried state preceding the current window's first model

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "hidden": self.hidden, "variant": self.variant,
                "gate_bias": self.gate_bias, "init": self.init}

    def _min_models(self) -> int:
        return self.k

    def _max_models(self) -> int | None:
        return None if self.variant == "full" else self.k

    def _build_meta(self, specs: list[dict[str, Any]], generator: torch.Generator) -> nn.ModuleDict:
        return nn.ModuleDict({
            module_key(s["name"]): CoordinateGRU(n_coords(s), self.hidden, self.gate_bias, self.init, generator)
            for s in specs
        })

    # ---- the generator itself ----------------------------------------------------------------------
    def window(self) -> list[tuple[int, Params]]:
        """The models the next generation runs over (k most recent; every model for ``full``)."""
        return list(self._models) if self.variant == "full" else self._models[-self.k:]

    def initial_state(self) -> Params | None:
        """h before the window's first model (None = zeros)."""
        return None if self.variant in ("zero", "full") else self._h

    def generate(self, models: Sequence[Params], h0: Params | None = None,
                 outputs: Sequence[int] | None = None,
                 rows: dict[str, Tensor] | None = None) -> tuple[dict[int, Params], list[Params]]:
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
        for spec in self._specs:
            name = spec["name"]
            gru: CoordinateGRU = self.meta[module_key(name)]
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

    def _fit(self, history: History, t_next: int, ctx: Any) -> None:
        window = self.window()
        models = [p for _, p in window]
        targets = [t + 1 for t, _ in window]
        weights = loss_weights(self.variant, len(models))
        h0 = self.initial_state()
        self._train_on_targets(history, ctx, targets, weights,
                               lambda active, rows: self.generate(models, h0, active, rows)[0])
        if self.variant in ("zero", "full"):
            self._h = None
            return
        with torch.no_grad():
            _, states = self.generate(models, h0, outputs=[])
        self._h = {name: h.detach().clone() for name, h in states[0].items()}

    def _extra_state(self) -> dict[str, Any]:
        return {"h": self._h}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._h = state["h"]


# --------------------------------------------------------------------------------------------------
# ASMG-Linear


class LinearMix(nn.Module):
    """Per-coordinate convex combination of k models: softmax(w)_j over the last axis, w = 0 at start."""

    def __init__(self, shape: Sequence[int], k: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(*shape, k))

    def forward(self, stacked: Tensor) -> Tensor:
        """``stacked``: ``[..., k]`` (embedding tables ``[N, d_e, k]`` broadcast against w ``[d_e, k]``)."""
        return (stacked * torch.softmax(self.w, dim=-1)).sum(-1)


class ASMGLinear(_LearnedGenerator):
    """ASMG-Linear: Θ* = Σ_j softmax(w)_j Θ_{t−k+1+j}; w ``[d_e, k]`` per embedding table (shared over
    ids), ``[shape..., k]`` per dense tensor; trained single-step on D_{t+1} (METHODS-notes §3.6)."""

    name = "asmg_linear"

    def __init__(self, k: int = 3, lr: float = 1e-2, epochs: int = 1, warmup: int = 1, seed: int = 0,
                 sparse_rows: bool = True) -> None:
        super().__init__(lr=lr, epochs=epochs, warmup=warmup, seed=seed, sparse_rows=sparse_rows)
        if k < 1:
            raise ValueError(f"generator.asmg_linear.k: must be ≥ 1, got {k}")
        self.k = k

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k}

    def _min_models(self) -> int:
        return self.k

    def _max_models(self) -> int | None:
        return self.k

    def _build_meta(self, specs: list[dict[str, Any]], generator: torch.Generator) -> nn.ModuleDict:
        return nn.ModuleDict({
            module_key(s["name"]): LinearMix([s["shape"][1]] if s["kind"] == "embedding" else s["shape"], self.k)
            for s in specs
        })

    def generate(self, models: Sequence[Params], rows: dict[str, Tensor] | None = None) -> Params:
        """The mix of ``models``; ``rows`` restricts embedding tables to those rows (see ``ASMGGRU.generate``)."""
        out = {}
        for spec in self._specs:
            name = spec["name"]
            idx = rows.get(name) if rows is not None else None
            stacked = torch.stack([m[name] if idx is None else m[name][idx] for m in models], dim=-1)
            y = self.meta[module_key(name)](stacked)
            if idx is not None:
                y = models[-1][name].index_put((idx,), y)
            out[name] = zero_padding(spec, y)
        return out

    def _serving_params(self) -> Params:
        return self.generate([p for _, p in self._models])

    def _fit(self, history: History, t_next: int, ctx: Any) -> None:
        models = [p for _, p in self._models]
        self._train_on_targets(history, ctx, [t_next], torch.ones(1, dtype=torch.float64),
                               lambda active, rows: {0: self.generate(models, rows)})
