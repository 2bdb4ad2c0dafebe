"""The base-model contract: logits, the hidden representation h, parameter groups, save/load.

Every model is ``h = body(batch)``; ``logit = head(h)`` with ``head`` one ``nn.Linear(h_dim, 1)``.
``h`` (the input of the output layer) is what the error memory (ReLoop2) keys on; the split of
parameters into ``embedding`` and ``dense`` groups is what ASMG's generator needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.layers import Batch, EmbeddedBatch, FeatureEmbedding
from reloop.registry import Registry, Strict

MEMORY_KEYS = ("hidden", "embeddings")


class ModelOptions(Strict):
    """Options shared by every model; subclasses add their own. Unknown keys are errors."""

    embedding_dim: int = Field(default=16, ge=1)
    hidden_units: list[int] = Field(default_factory=lambda: [256, 128])
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_std: float = Field(default=1e-2, gt=0.0)


class CTRModel(nn.Module):
    """Base class of every CTR model in the zoo.

    Subclasses set ``name``, ``paper``, ``Options`` and implement ``body`` (returning ``h``) after
    building ``self.head = nn.Linear(h_dim, 1)`` in ``__init__``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type[ModelOptions]] = ModelOptions
    head: nn.Linear  # the output layer, built by each subclass's ``__init__``

    def __init__(self, feature_map: FeatureMap, options: ModelOptions) -> None:
        super().__init__()
        self.feature_map = feature_map
        self.options = options

    def body(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def hidden(self, batch: Batch) -> Tensor:
        """``h``: the representation fed to the output layer, ``[B, h_dim]``."""
        return self.body(batch)

    def forward_hidden(self, batch: Batch) -> tuple[Tensor, Tensor]:
        out: tuple[Tensor, Tensor] = self(batch, with_hidden=True)
        return out

    def key_embedding(self) -> FeatureEmbedding:
        """The field-embedding layer behind the ``embeddings`` memory key: ``self.embedding`` when the
        model has one, else its widest ``FeatureEmbedding`` (LR has only its width-1 weights)."""
        emb = getattr(self, "embedding", None)
        if isinstance(emb, FeatureEmbedding):
            return emb
        found = [m for m in self.modules() if isinstance(m, FeatureEmbedding)]
        if not found:
            raise ValueError(
                f"model {self.name}: no FeatureEmbedding layer, so memory key 'embeddings' is "
                "unavailable; use key: hidden"
            )
        return max(found, key=lambda m: m.dim)

    def forward_key(self, batch: Batch, key: str = "hidden") -> tuple[Tensor, Tensor]:
        """Logits and the error memory's key for ``batch`` (ReLoop2 §3.2: "a hidden layer").

        ``hidden``: the input of the output layer, ``[B, h_dim]``. ``embeddings`` (ours): the field
        embeddings flattened, ``[B, F·d]``. On small logs the last hidden layer can collapse to a few
        directions (most ReLU units dead or saturated), so similar-looking keys carry different
        users and items; the embeddings keep ids apart.
        """
        if key == "hidden":
            return self.forward_hidden(batch)
        if key == "embeddings":
            # The embeddings are computed once here and carried into the forward pass on a per-call
            # batch object, so the key and the logits come out of one computation. (A forward hook on
            # the shared layer mixed up the keys of concurrent callers: the service's threadpool.)
            layer = self.key_embedding()
            emb = layer(batch)
            return self(EmbeddedBatch(batch, layer, emb)), emb.flatten(1)
        raise ValueError(f"key: must be one of {MEMORY_KEYS}, got {key!r}")

    def key_dim(self, key: str = "hidden") -> int:
        """Width of ``forward_key``'s key."""
        if key == "hidden":
            return self.head.in_features
        if key == "embeddings":
            return self.feature_map.num_fields * self.key_embedding().dim
        raise ValueError(f"key: must be one of {MEMORY_KEYS}, got {key!r}")

    def forward(self, batch: Batch, with_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B]`` (not probabilities: losses are computed on logits); with ``h`` on request.

        ``with_hidden`` lets ``torch.func.functional_call`` (ASMG, SML) get ``h`` from generated weights.
        """
        h = self.body(batch)
        logits = self._logits(h)
        return (logits, h) if with_hidden else logits

    def _logits(self, h: Tensor) -> Tensor:
        """The output layer, in float32 even under autocast. It has one output unit, so a bf16 matmul
        saves nothing, while autocast would cast ``h [B, h_dim]`` to bf16 and its gradient back:
        two passes over ``h`` (DCN, h_dim 1,024: 5.3 ms of a 73 ms bf16 step). The logits also keep
        float32's last bits."""
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                logits: Tensor = self.head(h.float()).squeeze(-1)
                return logits
        logits = self.head(h).squeeze(-1)
        return logits

    def param_groups(self) -> dict[str, str]:
        """Parameter name -> ``"embedding"`` (rows indexed by id) or ``"dense"``."""
        groups: dict[str, str] = {}
        for mod_name, mod in self.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                groups[full] = "embedding" if isinstance(mod, nn.Embedding) else "dense"
        return groups

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.model_dump()}


#: The ``model:`` choices (reloop.registry): ``model: {name: <name>, **options}``.
MODELS: Registry[CTRModel] = Registry("model")
#: Class decorator: make a model available as ``model: {name: <cls.name>}`` (its ``Options`` beside it).
register_model = MODELS.register()


#: The model of a config whose ``model`` section, or its ``name``, is left out.
DEFAULT_MODEL = "deepfm"


def model_options(config: dict[str, Any]) -> tuple[type[CTRModel], ModelOptions]:
    """Check ``{name: ..., **options}`` without building the model (no feature map needed): the
    registered class and its validated options. Problems name the key (``model.hidden_units: ...``)."""
    from reloop import models as _zoo  # noqa: F401  (registers the zoo)

    cfg = dict(config)
    name = cfg.pop("name", DEFAULT_MODEL)
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(MODELS.unknown(name, "model.name"))
    options = MODELS.validate_options(name, cfg, "model")
    assert isinstance(options, ModelOptions)
    return MODELS[name], options


def build_model(config: dict[str, Any], feature_map: FeatureMap) -> CTRModel:
    """Build a registered model from ``{name: ..., **options}``; unknown options name the key."""
    cls, options = model_options(config)
    return cls(feature_map, options)


#: ``save_model``'s file format: a safetensors file (the state dict; a parser that never runs code)
#: whose header metadata holds ``config`` and ``feature_map`` as JSON strings.
MODEL_FORMAT = "reloop-model/2"


class CheckpointError(ValueError):
    """A model file that cannot be used: unreadable, truncated, foreign, or built for another model."""


class IncompatibleCheckpoint(CheckpointError):
    """A readable model file built for another model: feature map, name/options or tensor shapes differ."""


def _plain_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no storage (what safetensors stores)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ref = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ref in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[name] = t
    return out


def save_model(model: CTRModel, path: str | Path) -> None:
    """Write ``model`` as ``MODEL_FORMAT`` (CPU tensors: loads on any machine)."""
    from safetensors.torch import save_file

    meta = {
        "format": MODEL_FORMAT,
        "config": json.dumps(model.config()),
        "feature_map": json.dumps(model.feature_map.model_dump()),
    }
    save_file(_plain_state(model.state_dict()), str(path), metadata=meta)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    cls, options = model_options(config)
    return {"name": cls.name, **options.model_dump()}


def _read_checkpoint(
    path: Path,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[int, ...]] | None, Callable[[], object]]:
    """``(config, feature_map, shapes, tensors)`` of a model file without running anything it contains.

    ``shapes`` come from the safetensors header (None for a legacy file); ``tensors`` is a callable
    giving the state dict, read only after the header checks. A legacy
    ``torch.save`` file (a zip) is read with ``torch.load(weights_only=True)``: plain containers and
    tensors only, a pickle that would call anything is refused.
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":  # legacy torch.save zip
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or not {"config", "feature_map", "state_dict"} <= set(blob):
            raise CheckpointError(f"{path}: not a model checkpoint (expected config, feature_map, state_dict)")
        return blob["config"], blob["feature_map"], None, lambda: blob["state_dict"]
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(
            f"{path}: not a reloop model file (format {meta.get('format')!r}, expected {MODEL_FORMAT!r})"
        )
    return json.loads(meta["config"]), json.loads(meta["feature_map"]), shapes, lambda: load_file(str(path))


def load_model(
    path: str | Path, feature_map: FeatureMap | None = None, expect_config: dict[str, Any] | None = None
) -> CTRModel:
    """Load a checkpoint written by ``save_model``; nothing in the file is executed.

    Refused with a one-line ``CheckpointError`` (before any model is built) when the file cannot be
    read, its feature map differs from ``feature_map``, or its model (name and every option, defaults
    filled in) differs from ``expect_config``; and when its tensors do not fit the model it names.
    """
    path = Path(path)
    try:
        config, stored_map, shapes, tensors = _read_checkpoint(path)
        stored = FeatureMap(**stored_map)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, foreign, a refused pickle, bad JSON: one line
        raise CheckpointError(f"{path}: unreadable model file ({_one_line(e)})") from None
    if feature_map is not None and stored != feature_map:
        raise IncompatibleCheckpoint(
            f"{path}: checkpoint was built for another feature map "
            f"({json.dumps(stored.tables)} vs {json.dumps(feature_map.tables)})"
        )
    try:
        got = _normalised(config)
    except Exception as e:  # noqa: BLE001 - an unknown model name, bad options, not a mapping at all
        raise CheckpointError(f"{path}: {_one_line(e)}") from None
    if expect_config is not None:
        want = _normalised(expect_config)
        if got != want:
            diff = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
            shown = "; ".join(f"model.{k}: {got.get(k)!r} in the file, {want.get(k)!r} expected" for k in diff)
            raise IncompatibleCheckpoint(f"{path}: another model ({shown})")
    model = build_model(config, stored)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def check(found: dict[str, tuple[int, ...]]) -> None:
        if found != expected:
            bad = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
            raise IncompatibleCheckpoint(
                f"{path}: tensors do not fit model {got['name']} ({len(bad)} differ, "
                f"e.g. {bad[0]}: {found.get(bad[0])} in the file, "
                f"{expected.get(bad[0])} expected)"
            )

    try:
        if shapes is not None:
            check(shapes)  # from the header, before reading any tensor data
        state = tensors()
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: the state dict is not a mapping of tensors")
        check({k: tuple(v.shape) for k, v in state.items()})
        model.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - reported as one line, never a traceback
        raise CheckpointError(f"{path}: unreadable model tensors ({_one_line(e)})") from None
    return model
