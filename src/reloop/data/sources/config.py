"""Typed configuration of the ``data:`` section of a run: where the raw log comes from.

``SourceConfig`` is a pydantic discriminated union on ``source``::

    data:
      source: csv            # csv | parquet | movielens | synthetic
      ...

Every model forbids unknown keys. ``periods`` and ``cache`` are carried opaquely (validated by the
period splitter and the cache, not here).

Use :func:`parse_source_config` to validate a plain dict: it dispatches on ``source`` itself, so the
``loc`` of every pydantic error is the plain key path inside ``data`` (``("features", "price",
"kind")``), without the union tag pydantic would otherwise insert.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from reloop.data.schema import FeatureKind, FeatureSpec
from reloop.registry import Registry
from reloop.registry import Strict as _Strict

#: Canonical column names of every loaded log.
LABEL = "label"
TIME = "time"

_DEFAULT_PERIODS: dict[str, Any] = {"count": 31, "by": "rows"}


# --------------------------------------------------------------------------------------------------
# features


class FeatureConfig(_Strict):
    """One feature column as written in a config: :class:`FeatureSpec` fields minus ``name``, plus
    ``separator`` for sequence columns stored as delimited strings.

    Fields left unset take :class:`FeatureSpec`'s defaults. ``separator`` defaults to ``"|"`` for
    string-typed sequence columns; a list column (Parquet) is used as is.
    """

    kind: FeatureKind = "categorical"
    vocab: str | None = None
    max_len: int | None = Field(default=None, ge=1)
    numeric: Literal["normalize", "bucketize"] | None = None
    buckets: int | None = Field(default=None, ge=2)
    capacity: int | None = Field(default=None, ge=1)
    separator: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _separator_only_for_sequences(self) -> FeatureConfig:
        if self.separator is not None and self.kind != "sequence":
            raise ValueError(f"'separator' only applies to sequence features, not {self.kind}")
        return self

    @property
    def split_on(self) -> str:
        """The delimiter of a string-typed sequence column."""
        return self.separator if self.separator is not None else "|"

    def to_spec(self, name: str) -> FeatureSpec:
        fields = self.model_dump(exclude_unset=True, exclude={"separator"})
        fields = {k: v for k, v in fields.items() if v is not None}
        return FeatureSpec(name=name, **fields)


def _as_feature_config(value: Any) -> Any:
    if isinstance(value, str):
        return {"kind": value}
    return value


FeatureValue = Annotated[FeatureConfig, Field(description="a kind name or a FeatureConfig mapping")]


# --------------------------------------------------------------------------------------------------
# csv / parquet


class _TabularSource(_Strict):
    path: str = Field(description="a file, or (parquet) a directory of *.parquet shards")
    time: str | None = Field(
        default="time",
        min_length=1,
        description="raw time column: unix seconds or ISO 8601; null: the file's row order (needs periods.by: rows)",
    )
    label: str = Field(default="label", min_length=1, description="raw 0/1 label column")
    user: str | None = Field(default=None, description="raw user-id column (kept as String)")
    features: dict[str, FeatureValue] = Field(min_length=1)
    max_bad_share: float = Field(default=0.01, ge=0.0, le=1.0)
    periods: dict[str, Any] = Field(default_factory=lambda: dict(_DEFAULT_PERIODS))
    cache: str | None = None

    @field_validator("features", mode="before")
    @classmethod
    def _kinds_as_configs(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _as_feature_config(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _no_name_clashes(self) -> _TabularSource:
        if self.time is None and isinstance(self.periods, dict) and self.periods.get("by") == "time":
            raise ValueError(
                "periods.by: time needs a time column, but data.time is null (the file's row "
                "order); use periods: {by: rows} or name the time column in data.time"
            )
        if self.time == self.label:
            raise ValueError(f"'time' and 'label' name the same column {self.time!r}")
        for raw, role in ((self.time, "time"), (self.label, "label")):
            if raw is None:
                continue
            if raw in self.features:
                raise ValueError(f"column {raw!r} is the {role} column; it cannot also be a feature")
            if self.user == raw:
                raise ValueError(f"column {raw!r} is the {role} column; it cannot also be the user column")
        for name in (LABEL, TIME):
            if name in self.features or self.user == name:
                raise ValueError(
                    f"{name!r} is reserved for the canonical {name} column; rename the feature/user column"
                )
        if self.user is not None and self.user in self.features:
            kind = self.features[self.user].kind
            if kind != "categorical":
                raise ValueError(f"the user column {self.user!r} must be categorical, not {kind}")
        return self


class CsvSourceConfig(_TabularSource):
    """A CSV file with a header row."""

    source: Literal["csv"]
    delimiter: str = Field(default=",", min_length=1, max_length=1)


class ParquetSourceConfig(_TabularSource):
    """A Parquet file, or a directory of ``*.parquet`` shards read in file-name order."""

    source: Literal["parquet"]


# --------------------------------------------------------------------------------------------------
# movielens


class MovieLensLabel(_Strict):
    """``label = 1`` iff ``rating >= rating_at_least``."""

    rating_at_least: float = 4.0


class ImplicitConfig(_Strict):
    """Implicit-feedback framing (ASMG protocol, METHODS-notes §3.1).

    Every rating with label 1 under the explicit rule is a positive; ratings below the threshold are
    not rows of the log (they only count as interactions when rejecting negatives). For each
    positive, ``negatives`` items are drawn uniformly from ``candidates`` (``all``: every item of
    the ratings log, as ASMG; ``seen``: items whose first rating is at or before the event, so no id
    appears before it exists), rejecting items the user rated at or before the event time.
    """

    negatives: int = Field(default=1, ge=1)
    seed: int = 1234
    history: int | None = Field(default=None, ge=1, description="alias of the top-level 'history'")
    candidates: Literal["all", "seen"] = "all"


class MovieLensSourceConfig(_Strict):
    """A GroupLens MovieLens directory: 100K (``u.data``), 1M (``ratings.dat``) or
    latest/20M/25M (``ratings.csv``)."""

    source: Literal["movielens"]
    path: str
    label: MovieLensLabel = Field(default_factory=MovieLensLabel)
    implicit: ImplicitConfig | None = None
    history: int | None = Field(
        default=None, ge=1, description="add 'history': the user's last N positive items before each event"
    )
    user_features: bool = Field(default=True, description="add age/gender/occupation when the files hold them")
    max_bad_share: float = Field(default=0.01, ge=0.0, le=1.0)
    periods: dict[str, Any] = Field(default_factory=lambda: dict(_DEFAULT_PERIODS))
    cache: str | None = None

    @model_validator(mode="after")
    def _one_history(self) -> MovieLensSourceConfig:
        if self.implicit is not None and self.implicit.history is not None:
            if self.history is not None and self.history != self.implicit.history:
                raise ValueError(
                    f"history={self.history} and implicit.history={self.implicit.history} disagree; set one"
                )
        return self

    @property
    def history_len(self) -> int | None:
        if self.history is not None:
            return self.history
        return self.implicit.history if self.implicit is not None else None


# --------------------------------------------------------------------------------------------------
# synthetic


class SyntheticConfig(_Strict):
    """A drifting click stream with known click probabilities (see :mod:`reloop.data.sources.synthetic`).

    ``p(click) = sigmoid(bias + b_user + b_item + interaction_scale * <u_user(t), v_item>
    + novelty * exp(-age_item(t) / item_lifetime) + context(hour, item_cat, t))``.

    Drift knobs (defaults give clear drift; set them to 0 for a stationary stream):

    - ``drift_sigma``: gradual drift; each period every user vector takes an AR(1) random-walk step
      ``u <- sqrt(1 - s^2) u + s * eps`` (norm stays stationary).
    - ``switch_share``: abrupt taste switches; that share of users draws a brand-new vector each period.
    - ``initial_item_share`` / ``item_lifetime`` / ``novelty``: item life cycles; the other items
      arrive evenly over the periods, and exposure and click appeal fade with age.
    - ``context_amplitude`` / ``context_cycle``: the hour-of-day x item-category effect oscillates
      with a period of ``context_cycle`` periods.
    """

    users: int = Field(default=2000, ge=1)
    items: int = Field(default=1000, ge=1)
    rows_per_period: int = Field(default=4000, ge=1)
    periods: int = Field(default=31, ge=1)
    seed: int = 0
    dim: int = Field(default=8, ge=1)
    categories: int = Field(default=20, ge=1)
    period_seconds: int = Field(default=86_400, ge=1)
    start: int = Field(default=1_609_459_200, description="unix time of the first period (2021-01-01 UTC)")
    bias: float = -1.0
    interaction_scale: float = 3.0
    category_spread: float = Field(default=0.6, ge=0.0, description="item vector noise around its category")
    user_bias_std: float = Field(default=0.5, ge=0.0)
    item_bias_std: float = Field(default=0.5, ge=0.0)
    activity_std: float = Field(default=0.7, ge=0.0, description="log-normal spread of user activity")
    drift_sigma: float = Field(default=0.25, ge=0.0, le=1.0)
    switch_share: float = Field(default=0.03, ge=0.0, le=1.0)
    initial_item_share: float = Field(default=0.3, gt=0.0, le=1.0)
    item_lifetime: float = Field(default=6.0, gt=0.0, description="periods for exposure/appeal to fall by e")
    popularity_std: float = Field(default=1.0, ge=0.0, description="spread of item exposure (log scale)")
    novelty: float = Field(default=1.0, description="click appeal of a brand-new item, fading with age")
    context_amplitude: float = Field(default=0.8, ge=0.0)
    context_cycle: float = Field(default=7.0, gt=0.0, description="periods per full oscillation")
    history: int | None = Field(default=None, ge=1, description="add 'history': last N positives per user")
    label_noise: float = Field(default=0.0, ge=0.0, lt=0.5, description="share of labels flipped at random")


class SyntheticSourceConfig(_Strict):
    source: Literal["synthetic"]
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    periods: dict[str, Any] = Field(default_factory=lambda: dict(_DEFAULT_PERIODS))
    cache: str | None = None


# --------------------------------------------------------------------------------------------------

SourceConfig = Annotated[
    CsvSourceConfig | ParquetSourceConfig | MovieLensSourceConfig | SyntheticSourceConfig,
    Field(discriminator="source"),
]
SOURCE_CONFIG_ADAPTER: TypeAdapter[SourceConfig] = TypeAdapter(SourceConfig)

#: Every data source, registered beside its loader (``reloop.data.sources.tabular``, ``movielens``,
#: ``synthetic``): ``@SOURCES.register("csv")`` on a class whose ``Options`` is the source's config model
#: (with a ``source: Literal["csv"]`` field) and whose ``load(cfg)`` returns a ``LoadedLog``. Importing
#: ``reloop.data.sources`` registers the built-in ones; ``SOURCES.names()`` are the values of ``data.source``.
SOURCES: Registry[Any] = Registry("source")


def _by_source() -> dict[str, type[BaseModel]]:
    return {name: SOURCES.options_class(name) for name in SOURCES.names()}


AnySourceConfig = CsvSourceConfig | ParquetSourceConfig | MovieLensSourceConfig | SyntheticSourceConfig


def parse_source_config(data: Any) -> AnySourceConfig:
    """Validate the ``data:`` mapping of a run config.

    Raises ``pydantic.ValidationError``; error locations are key paths inside ``data`` (no union tag).
    A missing or unknown ``source`` is reported by the discriminated union itself.
    """
    by_source = _by_source()
    if isinstance(data, BaseModel) and type(data) in by_source.values():
        return data  # type: ignore[return-value]
    if isinstance(data, dict) and isinstance(data.get("source"), str) and data["source"] in by_source:
        return by_source[data["source"]].model_validate(data)  # type: ignore[return-value]
    return SOURCE_CONFIG_ADAPTER.validate_python(data)
