"""The ``memory:`` block of a run config, and building a ``Compensator`` from it.

Exactly one of ``sketch`` or ``exact``, plus the keys both share::

    memory:
      sketch: {arrays: 64, bits: 8, similarity: density}     # or: exact: {size: 10000, top_k: 64}
      lambda: 0.5           # or: auto (self-tuning λ; options in adapt:)
      adapt: {grid: [0, 0.1, ..., 1], eta: 1.0, share: 0.0, select: mix}   # only with lambda: auto
      gamma: 1.0
      temperature: 0.1
      write: all            # all | errors
      error_threshold: 0.0  # σ for write: errors
      decay: 1.0
      reset_on_update: true

The kinds (``sketch``, ``exact``, any other ``MEMORIES`` registers) declare their own ``Options`` beside
their classes; this module holds the shared keys. Unknown keys are errors, reported with their dotted path
(``memory.sketch.bitz: ...``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, overload

import torch
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from reloop.errors import ConfigError, problems_of
from reloop.memory.base import MEMORIES, ErrorMemory, ErrorMemoryOptions
from reloop.memory.compensate import DEFAULT_EPS, DEFAULT_GRID, Compensator, LambdaTuner
from reloop.memory.exact import ExactMemory
from reloop.memory.sketch import SketchMemory
from reloop.registry import Choice, Problem, Strict

#: The options of each kind, under the names the package exported before the registry.
SketchConfig = SketchMemory.Options
ExactConfig = ExactMemory.Options


class AdaptConfig(Strict):
    """``memory.adapt`` (with ``lambda: auto``): learn λ online by Hedge over a grid (``LambdaTuner``)."""

    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID), min_length=1)
    eta: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    share: float = Field(default=0.0, ge=0.0, lt=1.0)
    select: Literal["mix", "leader", "auc"] = "mix"
    window: int = Field(default=8192, ge=1)  # select: auc — the labelled rows λ* is chosen on
    min_rows: int = Field(default=1024, ge=1)  # select: auc — λ = 0 until this many rows arrived
    margin: float = Field(default=0.001, ge=0.0, le=1.0)  # select: auc — AUC gain needed over λ = 0

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"values must lie in [0, 1], got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        return v

    def build(self, eps: float) -> LambdaTuner:
        return LambdaTuner(
            self.grid,
            eta=self.eta,
            share=self.share,
            select=self.select,
            eps=eps,
            window=self.window,
            min_rows=self.min_rows,
            margin=self.margin,
        )


class MemoryConfig(Strict):
    """Validated ``memory:`` block: the chosen kind (``store``, a ``MEMORIES`` choice) and the shared keys.
    ``lambda`` is exposed as the attribute ``lam`` (a float, or ``"auto"``). Built by :meth:`parse` only."""

    model_config = ConfigDict(populate_by_name=True)
    #: ``reloop tune``'s candidates (keys as written in YAML); the paper's λ range is 0.4-0.9
    search_space: ClassVar[dict[str, list[Any]]] = {
        "lambda": [0.1, 0.3, 0.5, 0.8, "auto"],
        "key": ["hidden", "embeddings"],
        "reset_on_update": [True, False],
    }
    lam: float | Literal["auto"] = Field(default=0.5, alias="lambda")
    adapt: AdaptConfig | None = None
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    temperature: float = Field(default=0.1, gt=0.0)
    write: Literal["all", "errors"] = "all"
    error_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    decay: float = Field(default=1.0, gt=0.0, le=1.0)
    reset_on_update: bool = True
    center: bool = False  # ours: centre keys on the first written batch's mean (see ErrorMemory)
    # ours: which representation is the key (CTRModel.forward_key); the paper uses a hidden layer
    key: Literal["hidden", "embeddings"] = "embeddings"
    _store: Choice[ErrorMemory] | None = PrivateAttr(default=None)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("lam", mode="before")
    @classmethod
    def _lam(cls, v: Any) -> Any:
        if v == "auto":
            return v
        try:  # numbers, and numeric strings as pydantic's lax float accepted them before `auto`
            x = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"must be a number in [0, 1] or 'auto', got {v!r}")
        return x

    @field_validator("adapt")
    @classmethod
    def _adapt_needs_auto(cls, v: AdaptConfig | None, info: ValidationInfo) -> AdaptConfig | None:
        if v is not None and info.data.get("lam", "auto") != "auto":
            raise ValueError("only with lambda: auto (a fixed lambda is never tuned)")
        return v

    @property
    def store(self) -> Choice[ErrorMemory]:
        """The chosen memory kind and its validated options."""
        if self._store is None:
            raise ValueError("memory: a MemoryConfig is built by MemoryConfig.parse")
        return self._store

    @property
    def adaptive(self) -> bool:
        """Whether λ is learnt online (``lambda: auto``)."""
        return self.lam == "auto"

    @property
    def kind(self) -> str:
        return self.store.name

    def __getattr__(self, name: str) -> Any:
        """``cfg.sketch``: the options of that kind when the block chose it, else ``None``."""
        if name in MEMORIES:
            return self.store.options if self.store.name == name else None
        return super().__getattr__(name)  # type: ignore[misc]

    @classmethod
    def read(cls, data: Any) -> MemoryConfig | None | list[Problem]:
        """A ``memory:`` value (``None``: no memory) -> the config, or its problems (paths inside the block)."""
        if data is None or isinstance(data, MemoryConfig):
            return data
        if isinstance(data, Mapping) and set(data) == {"memory"}:
            data = data["memory"]
        if not isinstance(data, Mapping):
            return [("", f"expected a mapping, got {type(data).__name__}")]
        kinds = [k for k in data if k in MEMORIES]
        if len(kinds) != 1:
            names = " or ".join(repr(n) for n in MEMORIES.names())
            return [("", f"exactly one of {names} must be given")]
        store = MEMORIES._parse({kinds[0]: data[kinds[0]]})
        problems = store if isinstance(store, list) else []
        try:
            cfg = cls.model_validate({k: v for k, v in data.items() if k != kinds[0]})
        except ValidationError as e:
            problems = problems + problems_of(e)
        if problems:
            return problems
        assert not isinstance(store, list)
        cfg._store, cfg._raw = store, copy.deepcopy(dict(data))  # the config owns its YAML form
        return cfg

    @classmethod
    def parse(cls, data: Any, where: str = "memory") -> MemoryConfig:
        """Validate ``{memory: {...}}`` or the inner mapping (a ``MemoryConfig`` passes through).

        Raises:
            ConfigError: ``"memory.<key>: <problem>"`` for every problem found.
        """
        cfg = cls.read(data)
        if cfg is None:
            cfg = [("", "expected a mapping, got NoneType")]
        if isinstance(cfg, list):
            raise ConfigError("; ".join(f"{where}.{p}: {m}" if p else f"{where}: {m}" for p, m in cfg))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The inner mapping in the canonical YAML shape (the kind first, every option, ``lambda``)."""
        return {self.kind: self.store.options.model_dump(), **self.model_dump(by_alias=True, exclude_none=True)}

    def dump(self) -> dict[str, Any]:
        """The block as it was written (what configs and checkpoint fingerprints record)."""
        return copy.deepcopy(self._raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            try:
                other = MemoryConfig.parse(other)
            except ValueError:
                return False
        if not isinstance(other, MemoryConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def make_memory(cfg: MemoryConfig, dim: int, seed: int = 0, device: str | torch.device = "cpu") -> ErrorMemory:
    """The bare ``ErrorMemory`` described by ``cfg`` for keys of width ``dim``, its state on ``device``."""
    common: ErrorMemoryOptions = {
        "temperature": cfg.temperature,
        "gamma": cfg.gamma,
        "write_policy": cfg.write,
        "error_threshold": cfg.error_threshold,
        "decay": cfg.decay,
        "center": cfg.center,
        "device": device,
    }
    return MEMORIES.build(cfg.store, "memory", dim=dim, seed=seed, **common)


@overload
def build_memory(
    cfg: MemoryConfig | Mapping[str, Any], dim: int, seed: int, device: str | torch.device = ..., where: str = ...
) -> Compensator: ...


@overload
def build_memory(
    cfg: MemoryConfig | Mapping[str, Any] | None,
    dim: int,
    seed: int,
    device: str | torch.device = ...,
    where: str = ...,
) -> Compensator | None: ...


def build_memory(
    cfg: MemoryConfig | Mapping[str, Any] | None,
    dim: int,
    seed: int,
    device: str | torch.device = "cpu",
    where: str = "memory",
) -> Compensator | None:
    """The serving adapter (ReLoop2) a ``memory:`` block describes: a ``Compensator`` (memory + λ) on
    ``device``, or ``None`` without a block. A mapping is parsed first (problems name ``<where>.<key>``)."""
    if cfg is None:
        return None
    cfg = MemoryConfig.parse(cfg, where)
    memory = make_memory(cfg, dim, seed, device)
    if cfg.lam == "auto":
        tuner = (cfg.adapt or AdaptConfig()).build(eps=DEFAULT_EPS)
        return Compensator(memory, reset_on_update=cfg.reset_on_update, key=cfg.key, tuner=tuner)
    return Compensator(memory, cfg.lam, reset_on_update=cfg.reset_on_update, key=cfg.key)


def memory_key(value: MemoryConfig | Mapping[str, Any] | None) -> str:
    """The representation a run's memory is keyed on (``CTRModel.forward_key``); ``hidden`` without one."""
    return MemoryConfig.parse(value).key if value is not None else "hidden"


def memory_resets_on_update(value: MemoryConfig | Mapping[str, Any] | None) -> bool:
    """Whether the run's memory is emptied when the base model is updated (``reset_on_update``)."""
    return value is not None and MemoryConfig.parse(value).reset_on_update
