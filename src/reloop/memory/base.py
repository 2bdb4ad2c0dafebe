"""The error-memory contract and the estimator shared by every memory (ReLoop2, KDD 2023, §3.2).

A memory stores labelled samples ``(h, y, ŷ)``: ``h`` a hidden representation of the base model,
``y`` the label, ``ŷ`` the base model's predicted probability when the sample was served. For a
query ``h_q`` with base prediction ``ŷ_q`` it retrieves K neighbours ``(s_i, y_i, ŷ_i)`` and
estimates the base model's current error (paper §3.2.1, Eqs. 10-14, rebuilt in METHODS-notes §1.4)::

    a_i    = softmax_i(s_i / τ + log w_i)     invalid neighbours masked out; w_i = 1 unless the
                                              memory weights by age (ExactMemory with decay < 1)
    ȳ      = Σ a_i y_i,    ȳ_base = Σ a_i ŷ_i
    ê      = γ·(ȳ − ŷ_q) + (1 − γ)·(ȳ − ȳ_base)

``γ = 1`` (the paper's setting) makes the compensated prediction ``(1 − λ)·ŷ_q + λ·ȳ``. A query with
no valid neighbour gets ``ê = 0`` (the base model is left alone) and support 0.

Subclasses implement ``_retrieve`` (neighbours plus optional log-weights), ``_store`` and the state
plumbing; writing policy, decay ticks, estimation and state validation live here so every memory
behaves the same.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple, Self, TypedDict, Unpack

import torch
from torch import Tensor

from reloop.registry import NoOptions, Registry, Strict

StateValue = Tensor | int | float | str
WRITE_POLICIES = ("all", "errors")


class Neighbours(NamedTuple):
    """K retrieved neighbours per query, each ``[B, K]``; ``valid`` marks real (non-empty) ones."""

    s: Tensor
    y: Tensor
    y_base: Tensor
    valid: Tensor


class ErrorMemoryOptions(TypedDict, total=False):
    """The keyword options every ``ErrorMemory`` takes (see its docstring); subclasses pass them on."""

    temperature: float
    gamma: float
    write_policy: str
    error_threshold: float
    decay: float
    center: bool
    device: str | torch.device


class ErrorMemory(ABC):
    """Non-parametric store of recent labelled samples that estimates the base model's error.

    Args:
        dim: width ``d`` of the keys ``h``.
        temperature: τ of the attention softmax (paper example 0.1).
        gamma: γ mixing the two error measures; 1.0 is the paper's setting.
        write_policy: ``"all"`` stores every written sample; ``"errors"`` only those with
            ``|y − ŷ| > error_threshold`` (the paper's σ filter, §3.2.2).
        error_threshold: σ for ``write_policy="errors"``.
        decay: ρ in (0, 1]. Every ``write`` call is one tick; a sample written t ticks ago counts
            with weight ρ^t. 1.0 disables decay. See the subclasses for how each applies it.
        center: (ours) subtract a fixed centre μ from every key before storing or querying it. μ is
            the mean key of the first batch written after construction or ``reset``, then frozen
            until the next reset, so stored and query keys stay comparable. Hidden layers after a
            ReLU live in one orthant, where every pair of keys has a high cosine: SimHash planes
            through the origin then split nothing and cosine top-k ranks poorly. Centring fixes
            both; it costs d floats.
        device: where the state tensors live; inputs are moved there.
    """

    #: The kind's name in the ``memory:`` block, set by ``@MEMORIES.register("<kind>")``.
    name: ClassVar[str] = ""
    #: The kind's own options (``memory: {<kind>: {...}}``); the shared ones are ``MemoryConfig``'s.
    Options: ClassVar[type[Strict]] = NoOptions

    @classmethod
    def from_options(cls, options: Strict, dim: int, seed: int = 0, **common: Unpack[ErrorMemoryOptions]) -> Self:
        """The memory of validated kind ``options`` for keys of width ``dim``; ``common``: the shared options."""
        return cls(dim, **dict(options), seed=seed, **common)  # type: ignore[call-arg]

    def __init__(
        self,
        dim: int,
        *,
        temperature: float = 0.1,
        gamma: float = 1.0,
        write_policy: str = "all",
        error_threshold: float = 0.0,
        decay: float = 1.0,
        center: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: must be a finite number > 0, got {temperature}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma: must be in [0, 1], got {gamma}")
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy: must be one of {WRITE_POLICIES}, got {write_policy!r}")
        if not 0.0 <= error_threshold <= 1.0:
            raise ValueError(f"error_threshold: must be in [0, 1], got {error_threshold}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay: must be in (0, 1], got {decay}")
        self.dim = int(dim)
        self.temperature = float(temperature)
        self.gamma = float(gamma)
        self.write_policy = write_policy
        self.error_threshold = float(error_threshold)
        self.decay = float(decay)
        self.device = torch.device(device)
        self.center = bool(center)
        self._mu = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        self._mu_set = False
        self._n_written = 0
        self._tick = 0
        self._block_rows = 1024  # queries per estimation block; subclasses size it to their K

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _store(self, h: Tensor, y: Tensor, y_hat: Tensor) -> None:
        """Add ``n >= 1`` already-filtered samples (h float32 ``[n, d]``, y/ŷ float64 ``[n]``)."""

    @abstractmethod
    def _retrieve(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``(s, y, y_base, valid, log_w)`` for float32 queries ``[B, d]``; ``log_w`` may be None."""

    def _on_tick(self) -> None:  # noqa: B027  (an optional hook: most memories do nothing here)
        """Called once per ``write`` call before storing; memories that fade in place do it here."""

    @abstractmethod
    def _clear(self) -> None:
        """Zero the state tensors in place (their bytes stay allocated)."""

    @abstractmethod
    def _config(self) -> dict[str, StateValue]:
        """Structural configuration: a state is only loadable into a memory with the same one."""

    @abstractmethod
    def _tensors(self) -> dict[str, Tensor]:
        """The state tensors by name (the live objects, not copies)."""

    def _scalars(self) -> dict[str, int | float]:
        return {"n_written": self._n_written, "tick": self._tick, "mu_set": int(self._mu_set)}

    def _set_scalars(self, state: dict[str, Any]) -> None:
        self._n_written = int(state["n_written"])
        self._tick = int(state["tick"])
        self._mu_set = bool(state["mu_set"])

    def _all_tensors(self) -> dict[str, Tensor]:
        return {**self._tensors(), "mu": self._mu} if self.center else self._tensors()

    def _centred(self, h: Tensor) -> Tensor:
        return h - self._mu if self.center else h

    # ------------------------------------------------------------------ public API
    @property
    def n_written(self) -> int:
        """Samples stored since construction or the last ``reset`` (after the write policy)."""
        return self._n_written

    @property
    def nbytes(self) -> int:
        """Bytes of all state tensors; fixed at construction whatever is written."""
        return sum(t.numel() * t.element_size() for t in self._all_tensors().values())

    def config(self) -> dict[str, StateValue]:
        """Every constructor setting (structure and estimator), as stored in ``state_dict``."""
        return {
            "kind": self.name,
            "dim": self.dim,
            **self._config(),
            "temperature": self.temperature,
            "gamma": self.gamma,
            "write_policy": self.write_policy,
            "error_threshold": self.error_threshold,
            "decay": self.decay,
            "center": self.center,
        }

    @torch.no_grad()
    def write(self, h: Tensor, y: Tensor, y_hat: Tensor) -> None:
        """Store a labelled batch: ``h [B, d]``, labels ``y [B]`` and base predictions ``ŷ [B]``.

        One call is one decay tick, even when the write policy keeps none of the samples, because
        ticks measure time on the feedback stream, not the amount stored.
        """
        h = self._check_h(h)
        y = self._check_prob(y, "y", h.shape[0])
        y_hat = self._check_prob(y_hat, "y_hat", h.shape[0])
        self._tick += 1
        if self.center:
            if not self._mu_set and h.shape[0]:
                self._mu.copy_(h.mean(0))
                self._mu_set = True
            h = h - self._mu
        if self.decay < 1.0:
            self._on_tick()
        if self.write_policy == "errors":
            keep = (y - y_hat).abs() > self.error_threshold
            h, y, y_hat = h[keep], y[keep], y_hat[keep]
        if h.shape[0]:
            self._store(h, y, y_hat)
            self._n_written += int(h.shape[0])

    @torch.no_grad()
    def neighbours(self, h: Tensor) -> Neighbours:
        """The K neighbours of each query ``h [B, d]``: similarities, labels, base predictions."""
        h = self._centred(self._check_h(h))
        r = self._block_rows
        if h.shape[0] <= r:
            return Neighbours(*self._retrieve(h)[:4])
        parts = [self._retrieve(h[a : a + r])[:4] for a in range(0, h.shape[0], r)]
        return Neighbours(*(torch.cat(p) for p in zip(*parts)))

    @torch.no_grad()
    def estimate(self, h: Tensor, y_hat_q: Tensor) -> tuple[Tensor, Tensor]:
        """Estimated error ``ê [B]`` of the base predictions ``ŷ_q`` and the support ``[B]``.

        Support is the number of valid (non-empty) neighbours, an int64 in ``[0, K]``; ``ê`` is 0
        where it is 0. ``ê`` has ``y_hat_q``'s dtype when that is floating point, else float32.
        Reads never write: a batch's own labels cannot leak into its estimate.
        """
        h = self._centred(self._check_h(h))
        out_dtype = y_hat_q.dtype if y_hat_q.is_floating_point() else torch.float32
        y_q = self._check_prob(y_hat_q, "y_hat_q", h.shape[0])
        B = h.shape[0]
        e_hat = torch.empty(B, dtype=torch.float64, device=self.device)
        support = torch.empty(B, dtype=torch.int64, device=self.device)
        # Row blocks keep every [rows, K] temporary cache-sized; whole-batch temporaries of a few
        # MB cost more in page faults and memory traffic than the arithmetic itself.
        for a in range(0, B, self._block_rows):
            b = min(B, a + self._block_rows)
            e_hat[a:b], support[a:b] = self._estimate_block(h[a:b], y_q[a:b])
        return e_hat.to(out_dtype), support

    def _estimate_block(self, h: Tensor, y_q: Tensor) -> tuple[Tensor, Tensor]:
        s, y, y_base, valid, log_w = self._retrieve(h)
        logits = s.to(torch.float64) / self.temperature
        if log_w is not None:
            logits = logits + log_w
        # A warm memory usually has every neighbour valid: then the masking passes are skipped.
        invalid = None if bool(valid.all()) else ~valid
        if invalid is not None:
            logits.masked_fill_(invalid, float("-inf"))
        a = torch.softmax(logits, dim=-1)
        if invalid is not None:
            a.masked_fill_(invalid, 0.0)  # also turns all-masked rows (softmax NaN) into zeros
        y_bar = (a * y).sum(-1)
        support = valid.sum(-1)
        if self.gamma == 1.0:  # the paper's setting; skips a pass over the neighbours
            e_hat = y_bar - y_q
        else:
            y_bar_base = (a * y_base).sum(-1)
            e_hat = self.gamma * (y_bar - y_q) + (1.0 - self.gamma) * (y_bar - y_bar_base)
        if invalid is not None:
            e_hat.masked_fill_(support == 0, 0.0)
        return e_hat, support

    def reset(self) -> None:
        """Forget everything (e.g. when the base model is replaced); bytes stay allocated."""
        self._clear()
        self._mu.zero_()
        self._mu_set = False
        self._n_written = 0
        self._tick = 0

    def state_dict(self) -> dict[str, StateValue]:
        """Config entries, counters and (cloned) state tensors; ``load_state_dict`` takes it back."""
        state: dict[str, StateValue] = dict(self.config())
        state.update(self._scalars())
        state.update({k: t.detach().clone() for k, t in self._all_tensors().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; any difference in configuration or tensor shape raises ValueError.

        The state tensors are copied in place, so ``nbytes`` is unchanged.
        """
        name = type(self).__name__
        expected = set(self.config()) | set(self._scalars()) | set(self._all_tensors())
        missing, extra = expected - set(state), set(state) - expected
        if missing or extra:
            raise ValueError(f"{name}.load_state_dict: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
        mismatched = [
            f"{k}: state has {state[k]!r}, this memory has {v!r}" for k, v in self.config().items() if state[k] != v
        ]
        if mismatched:
            raise ValueError(
                f"{name}.load_state_dict: state comes from another configuration: " + "; ".join(mismatched)
            )
        for key, t in self._all_tensors().items():
            src = state[key]
            if not isinstance(src, Tensor) or src.shape != t.shape or src.dtype != t.dtype:
                got = f"{tuple(src.shape)} {src.dtype}" if isinstance(src, Tensor) else type(src).__name__
                raise ValueError(f"{name}.load_state_dict: {key}: expected {tuple(t.shape)} {t.dtype}, got {got}")
        self._check_fixed(state)
        for key, t in self._all_tensors().items():
            t.copy_(state[key])
        self._set_scalars(state)

    def _check_fixed(self, state: dict[str, Any]) -> None:  # noqa: B027  (an optional hook)
        """Hook: validate tensors that must match exactly (e.g. hash planes) before loading."""

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({cfg}; n_written={self._n_written}, nbytes={self.nbytes})"

    # ------------------------------------------------------------------ input checks
    def _check_h(self, h: Tensor) -> Tensor:
        if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[1] != self.dim:
            shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"h: expected a tensor [B, {self.dim}], got {shape}")
        return h.detach().to(device=self.device, dtype=torch.float32)

    def _check_prob(self, v: Tensor, what: str, batch: int) -> Tensor:
        v = torch.as_tensor(v).detach()
        if v.shape != (batch,):
            raise ValueError(f"{what}: expected shape [{batch}], got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=torch.float64)
        # Written as a negation so that NaN is rejected too.
        if batch and not bool(((v >= 0) & (v <= 1)).all()):
            raise ValueError(f"{what}: values must lie in [0, 1]")
        return v


#: The memory kinds of a ``memory:`` block (``sketch``, ``exact``; reloop.registry).
MEMORIES: Registry[ErrorMemory] = Registry("memory")
