"""The step engine: one period of one run, shared by ``reloop run`` (offline) and ``reloop retrain`` (online).

A run is three independent choices (DESIGN.md): a base update with its loss, a model generator and an
error memory. :class:`RunEngine` owns their objects and the run's random generator for one seed and
drives one period (ASMG Algorithm 1, METHODS.md "The protocol"):

1. ``step(t)``: the base update turns Θ_{t−1} into Θ_t using D_1..D_t only (``History(upto=t)``);
   the generator observes Θ_t and forms Θ*_t; the **guard** checks Θ*_t against Θ_t on D_t (the
   latest labelled period) and serves Θ_t instead when Θ*_t is non-finite or worse by more than the
   stated margin, or when the generated models have done worse than the updated ones *out of sample*
   (each pair Θ*_{s−1}, Θ_{s−1} scored on D_s before either trained on it, over the last
   ``protocol.guard_periods`` periods: :meth:`RunEngine.evidence`). A run whose base update is not
   incremental (BU-w, full retraining, replay), or whose loss is not plain cross-entropy (ReLoop's
   self-correction, IncCTR's distillation: :func:`shadow_needed`), also trains a **shadow IU** chain (plain cross-entropy,
   Θ^IU_t from Θ^IU_{t−1} on D_t, its own random stream), and the guard serves Θ^IU_t when the run's
   model is non-finite or worse than it by the same margin, or has done worse than Θ^IU out of sample
   (the same evidence: the run's choice at s−1 against Θ^IU_{s−1} on D_s). The error memory is
   emptied when the base model changed and ``reset_on_update``.
2. The caller serves D_{t+1} with ``StepResult.serving`` (offline: :func:`reloop.protocol.serving.serve_period`;
   online: the service, batch by batch from live traffic).
3. ``learn(t + 1)``: once D_{t+1}'s labels are known, the generator may learn from it.

Callers only feed data in and persist what comes out (:meth:`RunEngine.state_dict`): the offline
protocol and the service can therefore never disagree on what a config means (the generator's seed,
the memory's reset policy, the guard).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reloop.components import (
    LossSpec,
    build_generator,
    build_loss,
    build_memory,
    build_update,
    memory_key,
    memory_resets_on_update,
)
from reloop.config import Config, RunSpec
from reloop.data.schema import FeatureMap
from reloop.data.tensors import History, PeriodTensors, Stream
from reloop.device import clock
from reloop.memory.compensate import Compensator, rank_auc
from reloop.models.base import CTRModel, build_model
from reloop.update.generators.base import ModelGenerator
from reloop.update.losses import CrossEntropy, Loss
from reloop.update.strategies import Incremental, NoUpdate, UpdateContext, UpdateStrategy
from reloop.update.trainer import predict_rows

#: Rows of D_t the guard scores (the last ones: the most recent behaviour); bounds its cost.
GUARD_ROWS = 8192


@dataclass
class GuardDecision:
    """What the guard found for Θ*_t (``served`` says which model serves D_{t+1})."""

    served: str  # "generated" | "base" | "iu" (the shadow IU model) | "" (nothing to check)
    reason: str = ""
    loss_generated: float | None = None
    loss_base: float | None = None


@dataclass
class StepResult:
    """The outcome of :meth:`RunEngine.step` for period ``t``."""

    t: int
    model: CTRModel  # Θ_t: the base model the next update starts from
    optim_state: dict[str, Any] | None
    serving: CTRModel  # what serves D_{t+1}
    guard: GuardDecision
    seconds: dict[str, float] = field(default_factory=dict)
    shadow: CTRModel | None = None  # Θ^IU_t, the shadow IU model (runs whose update is not incremental)


def logloss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of ``logits`` (``nan`` when any logit is non-finite)."""
    logits, labels = logits.float().cpu(), labels.float().cpu()
    if logits.numel() == 0:
        return float("nan")
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))


class RunEngine:
    """One run (``spec``) under one seed: the update strategy, loss, generator, error memory, RNG and guard.

    Args:
        cfg: the experiment config (model, training settings, protocol).
        spec: the run's choices.
        seed: the run's seed; the update strategy, generator and memory are all seeded from it, online
            and offline alike.
        feature_map: the encoded data's feature map (for fresh models and the memory's key width).
        key_dim: the width of the memory key (``CTRModel.key_dim(memory_key)``); ``None`` builds no memory.
        device: where models, rows and the memory live.
    """

    def __init__(
        self,
        cfg: Config,
        spec: RunSpec,
        seed: int,
        feature_map: FeatureMap,
        key_dim: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.seed = int(seed)
        self.feature_map = feature_map
        self.device = torch.device(device)
        self.strategy: UpdateStrategy = build_update(spec.update, seed=seed)
        self.loss_spec: LossSpec = build_loss(spec.loss)
        self.generator: ModelGenerator = build_generator(spec.generator, run_seed=seed)
        self.memory_key: str = memory_key(spec.memory)
        self.resets_memory: bool = memory_resets_on_update(spec.memory)
        self.compensator: Compensator | None = (
            build_memory(spec.memory, dim=key_dim, seed=seed, device=self.device) if key_dim is not None else None
        )
        self.rng = torch.Generator().manual_seed(self.seed)
        self.guard_margin: float = float(cfg.protocol.guard_margin)
        # The shadow IU chain (see the module docstring): for updates other than IU and "none", and for
        # an incremental run whose loss is not plain cross-entropy (ReLoop's self-correction, IncCTR's
        # distillation); its own random stream, so the run's own models are those it would train without.
        self.shadow_iu: bool = shadow_needed(self.strategy, self.loss_spec.loss)
        self.shadow_model: CTRModel | None = None  # Θ^IU_{t−1}; None before the first step (= Θ_0)
        self.shadow_optim: dict[str, Any] | None = None
        self.shadow_rng = torch.Generator().manual_seed(self.seed)
        # The out-of-sample check (``protocol.guard_periods``): Θ*_{t−1} when it differed from Θ_{t−1},
        # and per labelled period s the gap of Θ*_{s−1} behind Θ_{s−1} on D_s (:meth:`_with_gap`), newest last.
        self.guard_periods: int = int(cfg.protocol.guard_periods)
        self.guard_metric: str = cfg.protocol.guard_metric
        self.last_generated: CTRModel | None = None
        self.gaps: list[float] = []
        # The same evidence for the shadow comparison: what the run chose to serve at t−1 (before the
        # shadow check) against Θ^IU_{t−1}, each scored on D_t.
        self.last_run_model: CTRModel | None = None
        self.shadow_gaps: list[float] = []

    # --- one period -------------------------------------------------------------------------------

    def fresh_model(self) -> CTRModel:
        """A new, untrained model of the run's architecture on the run's device."""
        return build_model(self.cfg.model, self.feature_map).to(self.device)

    def context(
        self,
        stream: Stream,
        t: int,
        served: Tensor | None,
        model: CTRModel,
        on_batch: Callable[[int], None] | None = None,
        upto: int | None = None,
    ) -> UpdateContext:
        """What a strategy or generator may use at period ``t``: data through ``History(upto)`` only.

        ``served`` holds one prediction per global row (NaN where never served): the serving model's
        base prediction, or the compensated one when the loss asks for ``y_last: compensated``.
        """
        y_last = self.loss_spec.y_last
        return UpdateContext(
            history=History(stream, upto=t if upto is None else upto),
            t=t,
            loss=self.loss_spec.loss,
            train=self.cfg.train,
            generator=self.rng,
            fresh_model=self.fresh_model,
            model=model,
            served=served,
            y_last_source="previous_model" if y_last == "previous_model" else "served",
            on_batch=on_batch,
        )

    def step(
        self,
        model: CTRModel,
        optim_state: dict[str, Any] | None,
        stream: Stream,
        t: int,
        served: Tensor | None,
        on_batch: Callable[[int], None] | None = None,
        release: bool = False,
    ) -> StepResult:
        """Update on D_t, generate Θ*_t, guard it, reset the memory when the model changed.

        ``release``: the caller gives up ``model`` and ``optim_state`` (it keeps the returned ones only),
        so the update may train them in place (``UpdateContext.owned``) — except at the shadow IU chain's
        first step, which starts from them after the update.
        """
        ctx = self.context(stream, t, served, model, on_batch)
        ctx.owned = release and not (self.shadow_iu and self.shadow_model is None)
        latest = ctx.history.period(t)
        t0 = clock(self.device)
        # the previous pairs, on D_t before anything trains on it (the update may train Θ_{t−1} in place)
        if self.last_generated is not None:
            self.gaps = self._with_gap(self.gaps, self.last_generated, model, latest)
        if self.last_run_model is not None and self.shadow_model is not None:
            self.shadow_gaps = self._with_gap(self.shadow_gaps, self.last_run_model, self.shadow_model, latest)
        t_scored = clock(self.device)
        new, new_optim = self.strategy.update(model, optim_state, ctx)
        t1 = clock(self.device)
        self.generator.observe(t, new)
        candidate = self.generator.serving_model(new)
        t2 = clock(self.device)
        decision = self.guard(candidate, new, latest)
        if decision.served == "generated":
            decision = self.evidence(decision)
        serving = new if decision.served == "base" else candidate
        self.last_generated = None if candidate is new else candidate
        shadow = self._shadow_step(model, optim_state, stream, t) if self.shadow_iu else None
        if shadow is not None:
            versus = self.guard(serving, shadow, latest, what="run's model", other="shadow IU model")
            if versus.served == "generated":
                versus = self.evidence(versus, self.shadow_gaps, what="run's model", other="shadow IU model")
            self.last_run_model = serving
            if versus.served == "base":
                decision, serving = GuardDecision("iu", versus.reason, versus.loss_generated, versus.loss_base), shadow
        t4 = clock(self.device)
        if self.compensator is not None and self.strategy.trains and self.resets_memory:
            self.compensator.on_model_update()
        seconds = {"update_s": t1 - t_scored, "generate_s": t2 - t1, "guard_s": t_scored - t0 + t4 - t2}
        return StepResult(t, new, new_optim, serving, decision, seconds, shadow)

    def _shadow_step(self, model: CTRModel, optim_state: dict[str, Any] | None, stream: Stream, t: int) -> CTRModel:
        """Θ^IU_t: plain IU (cross-entropy on D_t from Θ^IU_{t−1}), kept in the engine. At its first step
        the chain starts where the run stands (Θ_0 and its optimizer state offline)."""
        if self.shadow_model is None:
            start, self.shadow_optim = model, optim_state
        else:
            start = self.shadow_model
        ctx = dataclasses.replace(
            self.context(stream, t, None, start),
            loss=CrossEntropy(),
            generator=self.shadow_rng,
            extras={"shadow": True},  # marks the guard's own chain (spies on the run's updates skip it)
        )
        self.shadow_model, self.shadow_optim = Incremental().update(start, self.shadow_optim, ctx)
        return self.shadow_model

    def learn(
        self,
        stream: Stream,
        t_next: int,
        served: Tensor | None,
        model: CTRModel,
        on_batch: Callable[[int], None] | None = None,
    ) -> float:
        """The generator learns from D_{t_next}, which was served and whose labels are now known.

        Returns the wall seconds it took (ASMG Table 3 reports the generator's training time).
        """
        ctx = self.context(stream, t_next - 1, served, model, on_batch, upto=t_next)
        t0 = clock(self.device)
        self.generator.learn(ctx.history, t_next, ctx)
        return clock(self.device) - t0

    def guard(
        self,
        candidate: CTRModel,
        base: CTRModel,
        latest: PeriodTensors,
        what: str = "generated model",
        other: str = "updated model",
    ) -> GuardDecision:
        """Serve Θ*_t only when it is finite and not worse than Θ_t on the latest labelled period.

        Rule: on the last ``GUARD_ROWS`` rows of D_t, with L the mean log loss,
        serve Θ_t when ``L(Θ*_t)`` is non-finite or ``L(Θ*_t) > (1 + margin) · L(Θ_t)``
        (``protocol.guard_margin``; ``inf`` disables the comparison but not the finiteness check).
        Θ_t was trained on D_t, so the comparison leans towards Θ_t: the margin must cover that
        in-sample advantage, and only a generated model that is clearly worse (e.g. SML diverging) is
        held back. The same rule compares a non-incremental run's model with the shadow IU model
        (``what``/``other`` name the two in the reason).
        """
        if candidate is base:
            return GuardDecision("")
        rows = _guard_rows(latest)
        labels = rows.data["label"]
        batch = self.cfg.train.eval_batch_size
        l_gen = logloss(predict_rows(candidate, rows, batch, hidden=False)[0], labels)
        l_base = logloss(predict_rows(base, rows, batch, hidden=False)[0], labels)
        if not math.isfinite(l_gen):
            reason = f"{what} gives non-finite scores on the latest period; the {other} serves"
            return GuardDecision("base", reason, None, _finite(l_base))
        if math.isfinite(l_base) and l_gen > (1.0 + self.guard_margin) * l_base:
            return GuardDecision(
                "base",
                f"{what}'s log loss {l_gen:.4f} > (1 + {self.guard_margin}) × "
                f"{l_base:.4f} (the {other}'s) on the latest period",
                l_gen,
                l_base,
            )
        return GuardDecision("generated", "", l_gen, _finite(l_base))

    def _with_gap(self, gaps: list[float], candidate: CTRModel, base: CTRModel, latest: PeriodTensors) -> list[float]:
        """``gaps`` plus the candidate's shortfall on D_t, the last ``guard_periods`` kept.

        ``protocol.guard_metric``: ``logloss`` appends ``L(candidate; D_t) − L(base; D_t)`` (mean log
        loss), ``auc`` appends ``AUC(base; D_t) − AUC(candidate; D_t)``; either way a positive gap means
        the candidate did worse. Both models were trained on D_1..D_{t−1} only (the caller scores them
        before step t trains). A non-finite candidate counts as a gap of ``ln 2`` nats a row (log loss)
        or 0.5 (AUC), so one divergence weighs heavily without blocking the candidate forever. Rows with
        one class only give no AUC gap.
        """
        if self.guard_periods == 0:
            return gaps
        rows = _guard_rows(latest)
        batch = self.cfg.train.eval_batch_size
        labels = rows.data["label"]
        z_cand = predict_rows(candidate, rows, batch, hidden=False)[0]
        z_base = predict_rows(base, rows, batch, hidden=False)[0]
        diverged = not bool(torch.isfinite(z_cand).all())
        if self.guard_metric == "auc":
            a_base = rank_auc(z_base.float().cpu(), labels.cpu())
            gap = 0.5 if diverged else a_base - rank_auc(z_cand.float().cpu(), labels.cpu())
            gap = gap if math.isfinite(a_base) else float("nan")  # one class only: no evidence
        else:
            l_base = logloss(z_base, labels)
            gap = math.log(2.0) if diverged else logloss(z_cand, labels) - l_base
            gap = gap if math.isfinite(l_base) else float("nan")
        return [*gaps, gap][-self.guard_periods :] if math.isfinite(gap) else gaps

    def evidence(
        self,
        decision: GuardDecision,
        gaps: list[float] | None = None,
        what: str = "generated model",
        other: str = "updated model",
    ) -> GuardDecision:
        """The out-of-sample check: keep serving the candidate only if it has beaten the fallback.

        Rule: with ``g_s`` the gap of :meth:`_with_gap` (how far Θ*_{s−1} fell behind Θ_{s−1} on D_s's
        last ``GUARD_ROWS`` rows, in ``protocol.guard_metric``; both trained on D_1..D_{s−1} only),
        Θ*_t serves iff the last ``protocol.guard_periods`` gaps exist and their mean is < 0. Until a
        candidate has been scored on a period it had not seen, the fallback serves. ``guard_periods = 0``
        skips it. ``gaps`` defaults to the generator's (Θ*_t vs Θ_t); the shadow check passes the run's
        against Θ^IU's.
        """
        gaps = self.gaps if gaps is None else gaps
        if self.guard_periods == 0:
            return decision
        if not gaps:
            return GuardDecision(
                "base",
                f"no {what} has been scored out of sample yet; the {other} serves",
                decision.loss_generated,
                decision.loss_base,
            )
        gap = sum(gaps) / len(gaps)
        over = "on the last period" if len(gaps) == 1 else f"mean over the last {len(gaps)} periods"
        if gap >= 0.0:
            metric = "AUC fell short of" if self.guard_metric == "auc" else "log loss exceeded"
            return GuardDecision(
                "base",
                f"the {what}s' out-of-sample {metric} the {other}s' by {gap:+.4f} ({over}); the {other} serves",
                decision.loss_generated,
                decision.loss_base,
            )
        return decision

    # --- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the run's models: strategy, generator, memory, RNG state and the shadow IU
        chain (plain tensors/dicts)."""
        return {
            "strategy": self.strategy.state_dict(),
            "generator": self.generator.state_dict(),
            "memory": self.compensator.state_dict() if self.compensator is not None else None,
            "rng": self.rng.get_state(),
            "shadow": self._shadow_state(),
            "guard": {
                "gaps": list(self.gaps),
                "last_generated": None if self.last_generated is None else self.last_generated.state_dict(),
                "shadow_gaps": list(self.shadow_gaps),
                "last_run_model": None if self.last_run_model is None else self.last_run_model.state_dict(),
            },
        }

    def _shadow_state(self) -> dict[str, Any] | None:
        if self.shadow_model is None:
            return None
        return {"model": self.shadow_model.state_dict(), "optim": self.shadow_optim, "rng": self.shadow_rng.get_state()}

    def _load_shadow(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.shadow_model = self.shadow_optim = None
            return
        self.shadow_model = self.fresh_model()
        self.shadow_model.load_state_dict(state["model"])
        self.shadow_optim = state["optim"]
        self.shadow_rng.set_state(state["rng"])

    def version_state(self, optim_state: dict[str, Any] | None, run: str) -> dict[str, Any]:
        """What a service version stores beside its models (``state.pt``): the optimizer state and the
        engine's state without the memory (the service rebuilds its memory from the log)."""
        state = self.state_dict()
        return {
            "optim": optim_state,
            "strategy": state["strategy"],
            "generator": state["generator"],
            "rng": state["rng"],
            "shadow": state["shadow"],
            "guard": state["guard"],
            "run": run,
        }

    def load_state_dict(self, state: dict[str, Any], memory: bool = True) -> None:
        """Restore :meth:`state_dict`'s output (``memory=False`` leaves the memory as it is)."""
        self.strategy.load_state_dict(state["strategy"])
        self.generator.load_state_dict(state["generator"])
        if memory and self.compensator is not None and state.get("memory") is not None:
            self.compensator.load_state_dict(state["memory"])  # the memory and a self-tuning λ
        self.rng.set_state(state["rng"])
        self._load_shadow(state.get("shadow"))  # absent from states written before the shadow IU
        guard = state.get("guard") or {}  # absent from states written before the out-of-sample check
        self.gaps = [float(g) for g in guard.get("gaps", [])]
        self.shadow_gaps = [float(g) for g in guard.get("shadow_gaps", [])]
        self.last_generated = self._model_from(guard.get("last_generated"))
        self.last_run_model = self._model_from(guard.get("last_run_model"))

    def _model_from(self, state: dict[str, Any] | None) -> CTRModel | None:
        if state is None:
            return None
        model = self.fresh_model()
        model.load_state_dict(state)
        return model


def shadow_needed(strategy: UpdateStrategy, loss: Loss) -> bool:
    """Whether a run trains the shadow IU chain: its models may differ from plain IU's, and nothing else
    in the run is Θ^IU to fall back to. True for a base update other than IU and "none" (BU-w, full
    retraining, replay) and for IU under another loss than cross-entropy (SC, KD)."""
    if isinstance(strategy, NoUpdate):
        return False
    return type(strategy) is not Incremental or type(loss) is not CrossEntropy


def _guard_rows(latest: PeriodTensors) -> PeriodTensors:
    """The last ``GUARD_ROWS`` rows of a period: the guard's sample of the most recent behaviour."""
    n = len(latest)
    return latest.slice(max(0, n - GUARD_ROWS), n)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
