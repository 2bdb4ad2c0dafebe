"""SPMF replay (Wang et al., SIGIR 2018) as in the ASMG reference code, strategy 2 (METHODS-notes §3.6).

Two reservoirs, positives and negatives, hold *global row ids* (every row carries its index in the
stream in the ``row`` column); rows are fetched back through ``History`` (periods 1..t are one contiguous
slice, indexed by ``row − first_row``), so nothing beyond period t is ever read.

At its first update (period t) each reservoir is initialised by uniform sampling, without replacement,
of ``reservoir`` × (number of positives, resp. negatives) of the pretraining periods 1..t−1. Each update:
  1. score the positive reservoir with the current model; rank r = 0 is the highest score; weight
     exp(r / |R|) (low-scored positives, i.e. the ones the model gets wrong, are likelier); normalise;
  2. sample round(ratio × #positives of D_t) positives without replacement by these weights and
     round(ratio × #negatives of D_t) negatives uniformly (capped at the reservoir sizes);
  3. train on the sampled rows (in time order) followed by D_t, **not shuffled** (``shuffle=False``, as
     the reference), from Θ_{t−1};
  4. classic reservoir sampling absorbs D_t, per label: the j-th new sample (0-based) is accepted with
     probability |R| / (n_seen + j + 1) and replaces a uniformly chosen member (later acceptances win
     when two pick the same slot, as a sequential pass would); n_seen counts the same-label rows of
     periods before t.
Random draws use ``ctx.generator`` (or a private generator seeded by ``seed``, whose state is saved).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Self

import torch
from torch import Tensor

from reloop.data.tensors import History, PeriodTensors
from reloop.models.base import CTRModel
from reloop.registry import Strict, number
from reloop.update.strategies import UPDATES, UpdateContext, UpdateStrategy
from reloop.update.trainer import predict_rows


def fetch_rows(history: History, t: int, row_ids: Tensor) -> PeriodTensors:
    """Rows with the given global ids, all from periods ≤ t (the stream's rows are contiguous)."""
    current = history.period(t)
    row_ids = row_ids.long().to(current.device)  # the reservoirs live on the CPU, the rows may not
    if row_ids.numel() == 0:
        return current.take(row_ids)
    upto = history.periods(1, t)
    first = int(upto.data["row"][0])
    out = upto.take(row_ids - first)
    if not torch.equal(out.data["row"], row_ids):
        raise RuntimeError("replay: the 'row' column is not the contiguous global row index")
    return out


def rank_weights(scores: Tensor) -> Tensor:
    """Sampling probabilities ∝ exp(r / |R|) with r the rank by descending score (r = 0: highest)."""
    n = scores.numel()
    order = torch.argsort(scores, descending=True, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    w = torch.exp(ranks / max(n, 1))
    return w / w.sum()


def reservoir_absorb(reservoir: Tensor, new_ids: Tensor, n_seen: int, generator: torch.Generator) -> Tensor:
    """Classic reservoir sampling of ``new_ids`` (in order) into a fixed-size ``reservoir`` (vectorised)."""
    size, n_new = reservoir.numel(), new_ids.numel()
    if size == 0 or n_new == 0:
        return reservoir
    j = torch.arange(n_new, dtype=torch.float64)
    accept = torch.rand(n_new, generator=generator, dtype=torch.float64) < size / (n_seen + j + 1)
    slots = torch.randint(size, (n_new,), generator=generator)
    acc = accept.nonzero().squeeze(-1)
    if acc.numel() == 0:
        return reservoir
    acc_slots = slots[acc]
    last = torch.full((size,), -1, dtype=torch.long)
    last = last.scatter_reduce(0, acc_slots, torch.arange(acc.numel()), reduce="amax")
    hit = last >= 0
    out = reservoir.clone()
    out[hit] = new_ids[acc[last[hit]]]
    return out


@UPDATES.register("replay")
class Replay(UpdateStrategy):
    """SPMF replay: IU on D_t plus rows replayed from a reservoir (see the module docstring);
    ``update: {replay: {reservoir: 0.3, ratio: 0.5}}``, its draws seeded by the run's seed."""

    class Options(Strict):
        search_space = {"reservoir": [0.1, 0.3], "ratio": [0.3, 0.5, 1.0]}
        reservoir: Annotated[float, number("a number in (0, 1]", lambda x: 0.0 < x <= 1.0)] = 0.3
        ratio: Annotated[float, number("a number ≥ 0", lambda x: x >= 0.0)] = 0.5

    search_space = Options.search_space

    @classmethod
    def from_options(cls, options: Strict, seed: int = 0) -> Self:
        assert isinstance(options, Replay.Options)
        return cls(options.reservoir, options.ratio, seed=seed)

    def __init__(
        self, reservoir: float = 0.3, ratio: float = 0.5, seed: int | None = None, shuffle: bool = False
    ) -> None:
        self.reservoir, self.ratio, self.seed, self.shuffle = reservoir, ratio, seed, shuffle
        self._rng = torch.Generator().manual_seed(seed) if seed is not None else None
        self.pos: Tensor | None = None
        self.neg: Tensor | None = None
        self.seen_pos = 0
        self.seen_neg = 0
        self.last_sampled: Tensor | None = None  # global row ids replayed at the latest update

    def _gen(self, ctx: UpdateContext) -> torch.Generator:
        return self._rng if self._rng is not None else ctx.generator

    def _init_reservoir(self, ctx: UpdateContext) -> tuple[Tensor, Tensor]:
        g = self._gen(ctx)
        if ctx.t <= 1:
            self.pos = torch.empty(0, dtype=torch.long)
            self.neg = torch.empty(0, dtype=torch.long)
            return self.pos, self.neg
        past = ctx.history.periods(1, ctx.t - 1)
        # Reservoir bookkeeping stays on the CPU (same draws on every device; device-neutral state).
        labels, rows = past.data["label"].cpu(), past.data["row"].long().cpu()
        res = []
        for mask in (labels > 0.5, labels <= 0.5):
            ids = rows[mask]
            n = int(round(self.reservoir * ids.numel()))
            res.append(ids[torch.randperm(ids.numel(), generator=g)[:n]].sort().values)
        self.pos, self.neg = res
        self.seen_pos = int((labels > 0.5).sum())
        self.seen_neg = int(labels.numel() - self.seen_pos)
        return self.pos, self.neg

    def _reservoirs(self) -> tuple[Tensor, Tensor]:
        """The positive and negative reservoirs (global row ids), once drawn."""
        if self.pos is None or self.neg is None:
            raise RuntimeError("replay: the reservoirs are drawn by sample(), which has not run")
        return self.pos, self.neg

    def sample(self, model: CTRModel, ctx: UpdateContext) -> Tensor:
        """Global row ids replayed at period t (sorted: time order), drawn from the current reservoirs."""
        pos, neg = self._init_reservoir(ctx) if self.pos is None else self._reservoirs()
        g = self._gen(ctx)
        labels = ctx.history.period(ctx.t).data["label"]
        n_pos_new = int((labels > 0.5).sum())
        m_pos = min(int(round(self.ratio * n_pos_new)), pos.numel())
        m_neg = min(int(round(self.ratio * (labels.numel() - n_pos_new))), neg.numel())
        picked = []
        if m_pos > 0:
            logits, _ = predict_rows(
                model, fetch_rows(ctx.history, ctx.t - 1, pos), ctx.train.eval_batch_size, hidden=False
            )  # logits on the CPU
            probs = rank_weights(logits)
            picked.append(pos[torch.multinomial(probs, m_pos, replacement=False, generator=g)])
        if m_neg > 0:
            picked.append(neg[torch.randperm(neg.numel(), generator=g)[:m_neg]])
        if not picked:
            return torch.empty(0, dtype=torch.long)
        return torch.cat(picked).sort().values

    def training_rows(self, ctx: UpdateContext) -> PeriodTensors:
        if ctx.model is None:
            raise RuntimeError("replay: training_rows needs the current model (UpdateContext.model)")
        return self.rows_for(ctx.model, ctx)

    def rows_for(self, model: CTRModel, ctx: UpdateContext) -> PeriodTensors:
        """The rows period t trains on: the replayed rows (time order) followed by D_t."""
        current = ctx.history.period(ctx.t)
        self.last_sampled = self.sample(model, ctx)
        if self.last_sampled.numel() == 0:
            return current
        replayed = fetch_rows(ctx.history, ctx.t - 1, self.last_sampled)
        return PeriodTensors.concat([replayed, current])

    def shuffles(self, ctx: UpdateContext) -> bool:
        return self.shuffle

    def after_update(self, ctx: UpdateContext) -> None:
        """The reservoirs absorb D_t."""
        g = self._gen(ctx)
        current = ctx.history.period(ctx.t)
        labels, rows = current.data["label"].cpu(), current.data["row"].long().cpu()
        is_pos = labels > 0.5
        pos, neg = self._reservoirs()
        self.pos = reservoir_absorb(pos, rows[is_pos], self.seen_pos, g)
        self.neg = reservoir_absorb(neg, rows[~is_pos], self.seen_neg, g)
        self.seen_pos += int(is_pos.sum())
        self.seen_neg += int((~is_pos).sum())

    def config(self) -> dict[str, Any]:
        return {"reservoir": self.reservoir, "ratio": self.ratio, "seed": self.seed, "shuffle": self.shuffle}

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "config": self.config(),
                "pos": self.pos,
                "neg": self.neg,
                "seen_pos": self.seen_pos,
                "seen_neg": self.seen_neg,
                "rng": self._rng.get_state() if self._rng is not None else None,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config():
            raise ValueError(
                f"replay: state was saved with config {state.get('config')}, this strategy has {self.config()}"
            )
        self.pos = None if state["pos"] is None else state["pos"].clone()
        self.neg = None if state["neg"] is None else state["neg"].clone()
        self.seen_pos, self.seen_neg = int(state["seen_pos"]), int(state["seen_neg"])
        if self._rng is not None and state["rng"] is not None:
            self._rng.set_state(state["rng"])
