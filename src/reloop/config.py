"""Typed run configuration: YAML + ``--set key=value`` overrides -> validated ``Config``.

Unknown keys are errors that name their dotted path (``runs.IU.updat: extra inputs are not
permitted``); nothing is ``eval``-ed. The choices of a run (update, loss, generator, memory) are
parsed once, with the config, into typed choices through their registries (``reloop.registry``), so
each component owns its options and a newly registered one is accepted without editing this module;
``data`` is checked against its source's schema and ``model`` against the model registry, all before
any data is read.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from reloop.combine import CombineOptions, replica_name
from reloop.components import GENERATORS, LOSSES, UPDATES, MemoryConfig
from reloop.data.periods import PeriodsConfig
from reloop.data.sources import SOURCES, parse_source_config
from reloop.device import check_device_spec
from reloop.errors import ConfigError, format_errors
from reloop.models.base import DEFAULT_MODEL, model_options
from reloop.registry import Choice, Strict, slot
from reloop.update.generators.base import ModelGenerator
from reloop.update.losses import Loss
from reloop.update.strategies import UpdateStrategy
from reloop.update.trainer import TrainConfig

if TYPE_CHECKING:
    UpdateSlot = Choice[UpdateStrategy]
    LossSlot = Choice[Loss]
    GeneratorSlot = Choice[ModelGenerator]
    MemorySlot = MemoryConfig | None
else:  # the registries' slot types: a name is looked up when a config is validated
    UpdateSlot, LossSlot, GeneratorSlot = UPDATES.slot(), LOSSES.slot(), GENERATORS.slot()
    #: ``memory:``: ``null`` (no memory) or the block, parsed once into a ``MemoryConfig``, written back as given
    MemorySlot = slot(MemoryConfig | None, MemoryConfig.read, lambda m: None if m is None else m.dump())


class ProtocolConfig(Strict):
    """``protocol``: periods 1..pretrain train Θ0; then warm-up / valid / test served periods."""

    pretrain: int = Field(default=10, ge=1)
    warmup: int = Field(default=10, ge=0)
    valid: int = Field(default=3, ge=0)
    test: int = Field(default=7, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0])
    serve_batch_size: int = Field(default=1024, ge=1)
    feedback_delay: int = Field(default=0, ge=0)
    # The step engine's guard (reloop.engine.RunEngine.guard): a generated model whose log loss on the
    # latest labelled period exceeds (1 + guard_margin) × the updated model's is not served.
    guard_margin: float = Field(default=0.1, ge=0.0)
    # ... and, out of sample: Θ*_t serves only while the generated models did better than the updated
    # ones on the last guard_periods labelled periods, each scored before either trained on it (0
    # switches this check off); guard_metric says what "better" measures on each period's last rows.
    guard_periods: int = Field(default=1, ge=0)
    guard_metric: Literal["logloss", "auc"] = "auc"

    @property
    def served_periods(self) -> int:
        return self.warmup + self.valid + self.test


class EncoderSettings(Strict):
    """``encoder``: how table capacities are sized from the pretraining periods."""

    headroom: float = Field(default=2.0, ge=1.0)
    min_capacity: int = Field(default=16, ge=1)
    overflow_share: float = Field(default=0.125, ge=0.0)


class RunSpec(Strict):
    """One compared method: a composition of base update, loss, generator and serving memory.

    Each slot is parsed once, when the spec is validated, into a typed :class:`reloop.registry.Choice`
    (``spec.update.name``, ``spec.update.options``; ``spec.update.build(seed=...)``) or, for ``memory``,
    a :class:`MemoryConfig`; it dumps back in the YAML form it was written in, and compares equal to it
    (``spec.loss == "distill"``). ``generator: null`` is ``identity``.
    """

    model_config = ConfigDict(validate_default=True)

    # the YAML defaults, parsed like written values (validate_default)
    update: UpdateSlot = "incremental"  # type: ignore[assignment]
    loss: LossSlot = "ce"  # type: ignore[assignment]
    generator: GeneratorSlot = "identity"  # type: ignore[assignment]
    memory: MemorySlot = None
    # Hedge over this run's predictions and the named runs' (reloop.combine.CombineOptions), online
    combine: CombineOptions | None = None


class Config(Strict):
    data: dict[str, Any]
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "deepfm"})
    train: TrainConfig = Field(default_factory=TrainConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    runs: dict[str, RunSpec] = Field(default_factory=lambda: {"IU": RunSpec()})
    # auto | cpu | cuda | cuda:N (reloop.device); checked for its form here, for the GPU when a run starts
    device: str = "cpu"

    @field_validator("device", mode="before")
    @classmethod
    def _device_form(cls, v: Any) -> str:
        return check_device_spec(v)

    @field_validator("model", mode="after")
    @classmethod
    def _default_name(cls, v: dict[str, Any]) -> dict[str, Any]:
        return v if "name" in v else {"name": DEFAULT_MODEL, **v}

    @model_validator(mode="after")
    def _check_lengths(self) -> Config:
        try:
            periods = PeriodsConfig(**self.data.get("periods", {}))
        except (ValidationError, TypeError):
            periods = None  # reported with its key by parse_config's check of `data`
        need = self.protocol.pretrain + 1 + self.protocol.served_periods
        if periods is not None and need > periods.count:
            raise ValueError(
                f"protocol: pretrain + 1 + warmup + valid + test = {need} periods, "
                f"but data.periods.count is {periods.count}"
            )
        if not self.runs:
            raise ValueError("runs: at least one run is needed")
        return self

    @property
    def periods(self) -> PeriodsConfig:
        return PeriodsConfig(**self.data.get("periods", {}))


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``protocol.seeds`` -> tree['protocol']['seeds'] = value (creating dicts on the way)."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a mapping")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``--set a.b.c=<YAML value>`` -> (``a.b.c``, the parsed value); every command parses it so."""
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = str(e).replace("\n", " ")
        raise ConfigError(f"--set {key.strip()}: the value is not valid YAML ({problem})") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        set_dotted(out, *parse_override(item))
    return out


def _check_data(data: dict[str, Any]) -> None:
    """The `data` source's keys and `data.periods`, with dotted paths (the data is not read)."""
    source = data.get("source")
    if not isinstance(source, str) or source not in SOURCES:
        problem = "required" if source is None else f"unknown source {source!r}"
        raise ConfigError(f"data.source: {problem}; choose one of {SOURCES.names()}")
    try:
        parse_source_config(data)  # checks that `periods` is a mapping
    except ValidationError as e:
        raise ConfigError(format_errors(e, prefix="data.")) from None
    try:
        PeriodsConfig(**data.get("periods", {}))
    except ValidationError as e:
        raise ConfigError(format_errors(e, prefix="data.periods.")) from None


def parse_config(raw: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Validate a config mapping: every section, the data source's keys, the model's name and options
    (without building it), and every run's choices (parsed once into typed choices), so errors surface now."""
    try:
        cfg = Config(**raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e)) from None
    _check_data(cfg.data)
    try:
        model_options(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if base_dir is not None and isinstance(cfg.data.get("path"), str):
        path = Path(cfg.data["path"]).expanduser()
        if not path.is_absolute() and not path.exists() and (base_dir / path).exists():
            cfg.data["path"] = str((base_dir / path).resolve())
    for name, run in cfg.runs.items():
        if run.combine is None:
            continue
        for expert in run.combine.experts or []:
            if expert not in cfg.runs:
                raise ConfigError(f"runs.{name}.combine.experts: unknown run {expert!r} (runs: {sorted(cfg.runs)})")
            if cfg.runs[expert].combine is not None and expert != name:
                raise ConfigError(f"runs.{name}.combine.experts: {expert!r} is itself a combine run")
        for base in run.combine.replicas:
            if base not in cfg.runs or cfg.runs[base].combine is not None:
                raise ConfigError(
                    f"runs.{name}.combine.replicas: {base!r} is not a run to replicate (runs: {sorted(cfg.runs)})"
                )
        taken = [r for r in replicas_of(run.combine) if r in cfg.runs]
        if taken:
            raise ConfigError(f"runs.{name}.combine.replicas: {taken[0]!r} (a replica's name) is already a run")
        try:
            run.combine.hedge.prior_of(experts_of(cfg, name))
        except ValueError as e:
            raise ConfigError(f"runs.{name}.combine.hedge.{e}") from None
    return cfg


def experts_of(cfg: Config, name: str) -> list[str]:
    """The runs a ``combine:`` run mixes (itself first): ``experts``, or every run without ``combine``;
    then its ``replicas`` (``IU.r1`` …: :func:`expert_spec`)."""
    options = cfg.runs[name].combine
    assert options is not None
    others = (
        options.experts
        if options.experts is not None
        else [r for r, spec in cfg.runs.items() if r != name and spec.combine is None]
    )
    return [name, *[r for r in others if r != name], *replicas_of(options)]


def replicas_of(options: CombineOptions) -> list[str]:
    """The replica experts' names of a ``combine:`` block, in the order written."""
    return [replica_name(run, k) for run, n in options.replicas.items() for k in range(1, n + 1)]


def expert_spec(cfg: Config, expert: str) -> tuple[RunSpec, int]:
    """An expert's run and seed offset: ``(cfg.runs[expert], 0)`` for a run, ``(cfg.runs[R], k)`` for the
    replica ``R.rk`` of a ``combine.replicas`` (trained from the Θ0 of seed + k, with that seed's
    random stream: offline by ``run_seed``, online by the service's expert chains)."""
    if expert in cfg.runs:
        return cfg.runs[expert], 0
    for spec in cfg.runs.values():
        if spec.combine is not None:
            for run, n in spec.combine.replicas.items():
                for k in range(1, n + 1):
                    if replica_name(run, k) == expert:
                        return cfg.runs[run], k
    raise KeyError(f"no run or replica named {expert!r}")


def demo_config_path() -> Path:
    """The packaged config of ``reloop demo`` (the embedded synthetic drift benchmark)."""
    return Path(str(resources.files("reloop") / "configs" / "demo.yaml"))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return parse_config(apply_overrides(raw, overrides or []), base_dir=path.parent)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
