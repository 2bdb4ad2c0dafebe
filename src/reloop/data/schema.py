"""Feature schema (what the raw log holds) and feature map (what the models see after encoding).

The schema is user-facing (YAML / config); the feature map is derived from it once the pretraining
periods fix the table capacities, and is persisted beside checkpoints so preprocessing and modelling
stay separate (FuxiCTR's feature map idea).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from reloop.registry import Strict

FeatureKind = Literal["categorical", "numeric", "sequence"]

# Reserved indices of every categorical/sequence table.
PAD = 0  # padding of sequences; also "missing value"
OOV = 1  # out-of-vocabulary: an id the encoder may not assign (frozen encoder, serving time)
N_RESERVED = 2


class _Frozen(Strict):
    model_config = ConfigDict(frozen=True)  # strict (reloop.registry.Strict) and immutable


class FeatureSpec(_Frozen):
    """One raw column of the log and how to encode it.

    - categorical: one id per row (any scalar; cast to string).
    - numeric: a float; ``numeric: normalize`` (z-score with pretraining statistics, then one
      embedding scaled by the value) or ``numeric: bucketize`` (quantile buckets of the pretraining
      periods, then a categorical embedding).
    - sequence: a list of ids per row (multi-hot genres, the user's last-N positives), padded to
      ``max_len`` and masked; ``vocab`` lets it share the id table of another field (history of items
      shares ``item_id``'s embeddings).
    """

    name: str
    kind: FeatureKind = "categorical"
    vocab: str | None = None
    max_len: int = Field(default=30, ge=1)
    numeric: Literal["normalize", "bucketize"] = "normalize"
    buckets: int = Field(default=16, ge=2)
    capacity: int | None = Field(default=None, ge=1)


class FeatureSchema(_Frozen):
    """The columns of a time-ordered click log."""

    features: list[FeatureSpec]
    label: str = "label"
    time: str = "time"
    user: str | None = None

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature named {name!r}; known: {[f.name for f in self.features]}")


class EncodedField(_Frozen):
    """A field as the models see it.

    ``table`` names the embedding table the field indexes (its own name, or the field whose vocabulary
    it shares); ``size`` is the row count of that table: reserved rows + capacity + overflow buckets.
    Numeric (normalized) fields have size 0: they carry a float, not an index.
    """

    name: str
    kind: Literal["categorical", "numeric", "sequence"]
    table: str
    size: int
    max_len: int = 1


class FeatureMap(_Frozen):
    """Everything a model needs to build its input layer; persisted as JSON beside checkpoints."""

    fields: list[EncodedField]
    user_field: str | None = None

    @property
    def tables(self) -> dict[str, int]:
        """Embedding table name -> number of rows (shared tables appear once)."""
        out: dict[str, int] = {}
        for f in self.fields:
            if f.kind != "numeric":
                out[f.table] = max(out.get(f.table, 0), f.size)
        return out

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    def of_kind(self, kind: str) -> list[EncodedField]:
        return [f for f in self.fields if f.kind == kind]
