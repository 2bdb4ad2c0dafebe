"""Shared machinery of the learned model generators (ASMG-GRU, ASMG-Linear, SML).

:class:`_LearnedGenerator` keeps the sequence of observed base models (detached snapshots), the meta
parameters and their Adam optimiser, the warm-up, the test-then-train ``learn`` on the next period
(ASMG Algorithm 1) with its timing (``last_learn_seconds``), the sparse-row training speed-up and the
state. The choices it implements are listed in the docstring of :mod:`reloop.update.generators.asmg`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, get_args, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reloop.data.tensors import History, LookAheadError
from reloop.models.base import CTRModel
from reloop.update.generators.base import LearnContext, ModelGenerator, functional_forward, materialize
from reloop.update.generators.param_layout import Params, ParamSpec, param_specs, snapshot

#: How a learned generator starts: ``identity`` (ours: serves Θ_t until trained) or ``glorot`` (the reference).
Init = Literal["identity", "glorot"]
INITS: tuple[str, ...] = get_args(Init)


def _uniform(shape: Sequence[int], limit: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(*shape, generator=generator) * 2.0 - 1.0) * limit


@overload
def _params_to(params: Params, device: torch.device) -> Params: ...


@overload
def _params_to(params: None, device: torch.device) -> None: ...


def _params_to(params: Params | None, device: torch.device) -> Params | None:
    return None if params is None else {name: v.to(device) for name, v in params.items()}


class _LearnedGenerator(ModelGenerator):
    """Shared machinery: model sequence, meta parameters + Adam, warm-up, timing and state.

    Subclasses implement ``_build_meta``, ``_serving_params`` and ``_fit`` and say how many models they
    need (``_min_models``) and keep (``_max_models``; None = all).
    """

    name: ClassVar[str] = ""

    def __init__(self, lr: float, epochs: int, warmup: int, seed: int, sparse_rows: bool = True) -> None:
        self.lr, self.epochs, self.warmup, self.seed = lr, epochs, warmup, seed
        self.sparse_rows = sparse_rows
        self._sparse_ok: bool | None = None  # None: not checked yet (see _train_on_targets)
        self._specs: list[ParamSpec] | None = None
        self._models: list[tuple[int, Params]] = []
        self.meta: nn.ModuleDict | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.n_trained = 0
        self.last_learn_seconds = 0.0
        self._template: CTRModel | None = None

    # ---- hooks -----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "epochs": self.epochs,
            "warmup": self.warmup,
            "seed": self.seed,
            "sparse_rows": self.sparse_rows,
        }

    def _min_models(self) -> int:
        return 1

    def _max_models(self) -> int | None:
        return 1

    def _build_meta(self, specs: list[ParamSpec], generator: torch.Generator) -> nn.ModuleDict:
        raise NotImplementedError

    def _serving_params(self) -> Params:
        raise NotImplementedError

    def _fit(self, history: History, t_next: int, ctx: LearnContext) -> None:
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

    def _init_specs(self, specs: list[ParamSpec]) -> nn.ModuleDict:
        self._specs = specs
        self.meta = self._build_meta(specs, torch.Generator().manual_seed(self.seed))
        return self.meta

    def _layout(self) -> tuple[list[ParamSpec], nn.ModuleDict]:
        """The observed models' parameter specs and the meta modules (set by the first ``observe``)."""
        if self._specs is None or self.meta is None:
            raise RuntimeError(f"{self.name}: no model observed yet; call observe() first")
        return self._specs, self.meta

    def _require_template(self) -> CTRModel:
        if self._template is None:
            raise RuntimeError(f"{self.name}: no model template; call observe() first")
        return self._template

    def _shuffle_rng(self) -> torch.Generator:
        """The generator's own shuffling RNG: drawing from the run's RNG (``ctx.generator``) would
        change every later base update, so an ASMG run's base models would no longer be the IU
        run's, and the comparison would carry that extra noise."""
        if getattr(self, "_rng", None) is None:
            self._rng = torch.Generator().manual_seed(self.seed + 7919)
        return self._rng

    def _place(self, model: CTRModel) -> None:
        """Meta parameters, their Adam state and the stored tensors on ``model``'s device (a no-op when
        they are there already): the generator follows the models it sees, also after ``load_state_dict``
        (whose tensors come from a checkpoint read on the CPU)."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if self.meta is None or next(self.meta.parameters()).device == device:
            return
        self.meta.to(device)
        if self._optimizer is not None:  # Adam's moments follow their parameters
            self._optimizer.load_state_dict(self._optimizer.state_dict())
        self._models = [(t, _params_to(params, device)) for t, params in self._models]
        self._extra_to(device)

    def _extra_to(self, device: torch.device) -> None:
        """Hook: move subclass state (ASMG-GRU's carried ``_h``, SML's ``_prev``) to ``device``."""

    def observe(self, t: int, model: CTRModel) -> None:
        specs = param_specs(model)
        if self._specs is None:
            self._init_specs(specs)
        elif specs != self._specs:
            raise ValueError(f"{self.name}: observed a model whose parameters differ from the first one")
        self._place(model)
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
        self._place(model)
        with torch.no_grad():
            params = self._serving_params()
        return materialize(model, params)

    def learn(self, history: History, t_next: int, ctx: LearnContext) -> None:
        start = time.perf_counter()
        try:
            if history.upto < t_next:
                raise LookAheadError(f"{self.name}: learn(t_next={t_next}) with data known up to {history.upto}")
            if len(self._models) < self._min_models():
                return
            last = self._models[-1][0]
            if t_next != last + 1:
                raise ValueError(f"{self.name}: learn(t_next={t_next}) but the latest model is Θ_{last}")
            self._place(self._require_template())
            self._fit(history, t_next, ctx)
            self.n_trained += 1
        finally:
            self.last_learn_seconds = time.perf_counter() - start

    # ---- training helper -------------------------------------------------------------------------
    def _optim(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self._layout()[1].parameters(), lr=self.lr)
        return self._optimizer

    def _embedding_modules(self) -> dict[str, nn.Embedding]:
        """Embedding-kind parameters owned by an ``nn.Embedding`` of the template (rows can be captured)."""
        out = {}
        template = self._require_template()
        for spec in self._layout()[0]:
            if spec["kind"] != "embedding" or "." not in spec["name"]:
                continue
            owner = template.get_submodule(spec["name"].rpartition(".")[0])
            if isinstance(owner, nn.Embedding):
                out[spec["name"]] = owner
        return out

    def _touched_rows(self, batches: list[dict[str, Tensor]], tables: dict[str, nn.Embedding]) -> dict[str, Tensor]:
        """Rows of each embedding table the template's forward reads on ``batches`` (forward pre-hooks);
        tables whose batches read more than half of their rows are left out (generated in full)."""
        seen: dict[str, list[Tensor]] = {name: [] for name in tables}
        handles = [
            mod.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].reshape(-1)))
            for name, mod in tables.items()
        ]
        template = self._require_template()
        try:
            with torch.no_grad():
                for batch in batches:
                    template(batch)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for name, ids in seen.items():
            rows = (
                torch.unique(torch.cat(ids))
                if ids
                else torch.empty(0, dtype=torch.long, device=tables[name].weight.device)
            )
            if rows.numel() * 2 <= tables[name].num_embeddings:  # else the full table is as cheap
                out[name] = rows
        return out

    def _train_on_targets(
        self,
        history: History,
        ctx: LearnContext,
        targets: list[int],
        weights: Tensor,
        generate: Callable[[list[int], dict[str, Tensor] | None], dict[int, Params]],
    ) -> None:
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
        template = self._require_template()
        device = next((p.device for p in template.parameters()), torch.device("cpu"))
        data = {j: history.period(targets[j]).to(device) for j in active}  # no-op in the protocol
        last = data[active[-1]]
        n_batches = max(1, math.ceil(len(last) / ctx.train.batch_size))
        optimizer = self._optim()
        on_batch = ctx.on_batch
        tables = self._embedding_modules() if self.sparse_rows and self._sparse_ok is not False else {}
        for _ in range(self.epochs):
            # drawn on the CPU (the same batches on every device), moved once per epoch
            splits = {
                j: torch.randperm(len(data[j]), generator=self._shuffle_rng()).to(device).tensor_split(n_batches)
                for j in active
            }
            for b in range(n_batches):
                batches = {
                    j: {key: col[splits[j][b]] for key, col in data[j].data.items()}
                    for j in active
                    if splits[j][b].numel() > 0
                }
                if not batches:
                    continue
                rows = self._touched_rows(list(batches.values()), tables) if tables else None
                outs = generate(active, rows)
                logits = {j: functional_forward(template, outs[j], batch) for j, batch in batches.items()}
                if rows is not None and self._sparse_ok is None:
                    with torch.no_grad():
                        full = generate(active, None)
                        same = all(
                            torch.allclose(
                                logits[j], functional_forward(template, full[j], batch), rtol=1e-4, atol=1e-5
                            )
                            for j, batch in batches.items()
                        )
                    self._sparse_ok = same
                    if not same:
                        warnings.warn(
                            f"{self.name}: the model reads embedding rows its forward hooks do not "
                            "see; generating full tables (slower)",
                            stacklevel=2,
                        )
                        tables = {}
                        outs = generate(active, None)
                        logits = {j: functional_forward(template, outs[j], batch) for j, batch in batches.items()}
                terms = [
                    float(weights[j]) * F.binary_cross_entropy_with_logits(logits[j].float(), batch["label"].float())
                    for j, batch in batches.items()
                ]
                loss = terms[0]  # sum(terms), left to right (``batches`` is not empty)
                for term in terms[1:]:
                    loss = loss + term
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]  # torch: Tensor.backward is unannotated
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
            "rng": self._shuffle_rng().get_state(),
            "extra": self._extra_state(),
        }
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") != self.name:
            raise ValueError(f"{self.name}: state was saved by generator {state.get('generator')!r}")
        if state["config"] != self.config():
            raise ValueError(
                f"{self.name}: state was saved with config {state['config']}, this generator has {self.config()}"
            )
        state = copy.deepcopy(state)
        self._specs, self.meta, self._optimizer = None, None, None
        if state["specs"] is not None:
            self._init_specs(state["specs"]).load_state_dict(state["meta"])
        if state["optim"] is not None:
            self._optim().load_state_dict(state["optim"])
        self._models = [(int(t), params) for t, params in state["models"]]
        self.n_trained = int(state["n_trained"])
        self._shuffle_rng().set_state(state["rng"])
        self._load_extra_state(state["extra"])
