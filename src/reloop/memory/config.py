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

Unknown keys are errors, reported with their dotted path (``memory.sketch.bitz: ...``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from reloop.memory.base import ErrorMemory, ErrorMemoryOptions
from reloop.memory.compensate import DEFAULT_EPS, DEFAULT_GRID, Compensator, LambdaTuner
from reloop.memory.exact import ExactMemory
from reloop.memory.sketch import MAX_BITS, SketchMemory


class SketchConfig(BaseModel):
    """LSH sketch: K arrays of 2^L buckets (paper: K = 70 to 180)."""

    model_config = ConfigDict(extra="forbid")
    #: tuned on the valid periods by ``reloop tune`` (reloop.protocol.tune); paper: K = 70-180, L up to 10
    search_space: ClassVar[dict[str, list[Any]]] = {"bits": [6, 8, 10]}
    arrays: int = Field(default=64, ge=1)
    bits: int = Field(default=8, ge=0, le=MAX_BITS)
    similarity: Literal["density", "centroid"] = "density"
    hash_dtype: Literal["float32", "bfloat16"] = "float32"  # ours: bfloat16 hashes ~2x faster
    project: int | None = Field(default=None, ge=1)  # ours: hash a fixed random projection to this width


class ExactConfig(BaseModel):
    """Ring buffer of the last ``size`` samples with cosine top-``top_k`` retrieval."""

    model_config = ConfigDict(extra="forbid")
    search_space: ClassVar[dict[str, list[Any]]] = {"top_k": [16, 64]}
    size: int = Field(default=10000, ge=1)
    top_k: int = Field(default=64, ge=1)

    @field_validator("top_k")
    @classmethod
    def _top_k_fits(cls, v: int, info: ValidationInfo) -> int:
        size = info.data.get("size")
        if size is not None and v > size:
            raise ValueError(f"must be <= size ({size}), got {v}")
        return v


class AdaptConfig(BaseModel):
    """``memory.adapt`` (with ``lambda: auto``): learn λ online by Hedge over a grid (``LambdaTuner``)."""

    model_config = ConfigDict(extra="forbid")
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


class MemoryConfig(BaseModel):
    """Validated ``memory:`` block. ``lambda`` is exposed as the attribute ``lam`` (a float, or ``"auto"``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    #: ``reloop tune``'s candidates (keys as written in YAML); the paper's λ range is 0.4-0.9
    search_space: ClassVar[dict[str, list[Any]]] = {
        "lambda": [0.1, 0.3, 0.5, 0.8, "auto"],
        "key": ["hidden", "embeddings"],
        "reset_on_update": [True, False],
    }
    sketch: SketchConfig | None = None
    exact: ExactConfig | None = None
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

    @model_validator(mode="after")
    def _one_kind(self) -> MemoryConfig:
        if (self.sketch is None) == (self.exact is None):
            raise ValueError("exactly one of 'sketch' or 'exact' must be given")
        return self

    @property
    def adaptive(self) -> bool:
        """Whether λ is learnt online (``lambda: auto``)."""
        return self.lam == "auto"

    @property
    def kind(self) -> str:
        return "sketch" if self.sketch is not None else "exact"

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> MemoryConfig:
        """Validate ``{memory: {...}}`` or the inner mapping; errors name the dotted key.

        Raises:
            ValueError: ``"memory.<key>: <problem>"`` for every problem found.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"memory: expected a mapping, got {type(data).__name__}")
        if set(data) == {"memory"}:
            data = data["memory"]
            if not isinstance(data, Mapping):
                raise ValueError(f"memory: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ValueError(format_errors(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """The inner mapping in the YAML shape (``lambda``, only the chosen kind)."""
        return self.model_dump(by_alias=True, exclude_none=True)


def format_errors(e: ValidationError, prefix: str = "memory") -> str:
    """One ``prefix.dotted.key: message`` per pydantic error, joined by ``; ``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


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
    if cfg.sketch is not None:
        return SketchMemory(
            dim,
            arrays=cfg.sketch.arrays,
            bits=cfg.sketch.bits,
            similarity=cfg.sketch.similarity,
            seed=seed,
            hash_dtype=getattr(torch, cfg.sketch.hash_dtype),
            project=cfg.sketch.project,
            **common,
        )
    assert cfg.exact is not None
    return ExactMemory(dim, size=cfg.exact.size, top_k=cfg.exact.top_k, seed=seed, **common)


def build_memory(
    cfg: MemoryConfig | Mapping[str, Any], dim: int, seed: int, device: str | torch.device = "cpu"
) -> Compensator:
    """Build the ``Compensator`` (memory + λ) a config describes; a mapping is parsed first."""
    if not isinstance(cfg, MemoryConfig):
        cfg = MemoryConfig.parse(cfg)
    memory = make_memory(cfg, dim, seed, device)
    if cfg.lam == "auto":
        tuner = (cfg.adapt or AdaptConfig()).build(eps=DEFAULT_EPS)
        return Compensator(memory, reset_on_update=cfg.reset_on_update, key=cfg.key, tuner=tuner)
    return Compensator(memory, cfg.lam, reset_on_update=cfg.reset_on_update, key=cfg.key)
