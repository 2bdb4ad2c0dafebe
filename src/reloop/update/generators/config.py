"""``generator:`` config section -> a :class:`ModelGenerator`.

Accepted forms::

    generator: identity
    generator: sml                       # defaults
    generator: {sml: {lr: 0.001}}
    generator: {asmg_gru: {k: 3, hidden: 4, variant: multi, lr: 0.01, epochs: 1,
                           gate_bias: true, init: identity, warmup: 1}}
    generator: {asmg_linear: {k: 3, lr: 0.01}}

Unknown keys and bad values are errors naming the dotted key (``generator.asmg_gru.<key>``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reloop.update.generators.asmg import ASMGGRU, ASMGLinear
from reloop.update.generators.base import Identity, ModelGenerator
from reloop.update.generators.sml import SML


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentityConfig(_Strict):
    search_space: ClassVar[dict[str, list[Any]]] = {}


class ASMGGRUConfig(_Strict):
    search_space: ClassVar[dict[str, list[Any]]] = {"k": [2, 3, 4], "variant": ["multi", "single"]}
    k: int = Field(default=3, ge=1)
    hidden: int = Field(default=4, ge=1)
    variant: Literal["multi", "single", "unif", "zero", "full"] = "multi"
    lr: float = Field(default=1e-2, gt=0)
    epochs: int = Field(default=1, ge=1)
    gate_bias: bool = True
    init: Literal["identity", "glorot"] = "identity"
    warmup: int = Field(default=1, ge=0)
    seed: int = 0
    sparse_rows: bool = True


class ASMGLinearConfig(_Strict):
    search_space: ClassVar[dict[str, list[Any]]] = {"k": [2, 3, 4]}
    k: int = Field(default=3, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    epochs: int = Field(default=1, ge=1)
    warmup: int = Field(default=1, ge=0)
    seed: int = 0
    sparse_rows: bool = True


class SMLConfig(_Strict):
    search_space: ClassVar[dict[str, list[Any]]] = {"lr": [1e-4, 1e-3]}
    lr: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=1, ge=1)
    warmup: int = Field(default=1, ge=0)
    init: Literal["identity", "glorot"] = "identity"
    emb_n1: int = Field(default=10, ge=1)
    emb_n2: int = Field(default=5, ge=1)
    emb_l1: int = Field(default=20, ge=1)
    dense_n1: int = Field(default=5, ge=1)
    dense_n2: int = Field(default=3, ge=1)
    dense_l1: int | None = Field(default=None, ge=1)
    seed: int = 0
    sparse_rows: bool = True


GENERATORS: dict[str, tuple[type[_Strict], type[ModelGenerator]]] = {
    "identity": (IdentityConfig, Identity),
    "sml": (SMLConfig, SML),
    "asmg_gru": (ASMGGRUConfig, ASMGGRU),
    "asmg_linear": (ASMGLinearConfig, ASMGLinear),
}


def parse_generator(cfg: object) -> tuple[str, _Strict]:
    """``generator:`` value -> (name, validated options). ``None`` means identity."""
    if cfg is None:
        cfg = "identity"
    name: object
    options: object
    if isinstance(cfg, str):
        name, options = cfg, {}
    elif isinstance(cfg, dict):
        if len(cfg) != 1:
            raise ValueError(f"generator: expected one key among {sorted(GENERATORS)}, got {sorted(cfg)}")
        ((name, options),) = cfg.items()
        options = {} if options is None else options
    else:
        raise ValueError(f"generator: expected a name or a one-key mapping, got {cfg!r}")
    if not isinstance(options, dict):
        raise ValueError(f"generator.{name}: expected a mapping of options, got {options!r}")
    if not isinstance(name, str) or name not in GENERATORS:
        raise ValueError(f"generator: unknown generator {name!r}; choose one of {sorted(GENERATORS)}")
    schema, _ = GENERATORS[name]
    try:
        parsed = schema(**options)
    except ValidationError as e:
        problems = "; ".join(f"generator.{name}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(problems) from None
    return name, parsed


def build_generator(cfg: object, run_seed: int = 0) -> ModelGenerator:
    """Build the generator described by a ``generator:`` config value.

    ``run_seed`` (the protocol's seed) is added to the configured ``seed``, so each protocol seed
    draws its own meta initialisation and shuffling, as it does for the base models.
    """
    name, options = parse_generator(cfg)
    _, cls = GENERATORS[name]
    kwargs = options.model_dump()
    if "seed" in kwargs:
        kwargs["seed"] += int(run_seed)
    return cls(**kwargs)
