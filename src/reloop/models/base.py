"""The base-model contract: logits, the hidden representation h, parameter groups, save/load.

Every model is ``h = body(batch)``; ``logit = head(h)`` with ``head`` one ``nn.Linear(h_dim, 1)``.
``h`` (the input of the output layer) is what the error memory (ReLoop2) keys on; the split of
parameters into ``embedding`` and ``dense`` groups is what ASMG's generator needs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from reloop.data.schema import FeatureMap
from reloop.models.layers import Batch, FeatureEmbedding

MEMORY_KEYS = ("hidden", "embeddings")


class ModelOptions(BaseModel):
    """Options shared by every model; subclasses add their own. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
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
        return self(batch, with_hidden=True)

    def key_embedding(self) -> nn.Module:
        """The field-embedding layer behind the ``embeddings`` memory key: ``self.embedding`` when the
        model has one, else its widest ``FeatureEmbedding`` (LR has only its width-1 weights)."""
        emb = getattr(self, "embedding", None)
        if isinstance(emb, FeatureEmbedding):
            return emb
        found = [m for m in self.modules() if isinstance(m, FeatureEmbedding)]
        if not found:
            raise ValueError(f"model {self.name}: no FeatureEmbedding layer, so memory key 'embeddings' is "
                             "unavailable; use key: hidden")
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
            # Catch the embeddings the forward pass computes anyway instead of looking them up twice.
            caught: list[Tensor] = []
            layer = self.key_embedding()
            handle = layer.register_forward_hook(lambda _m, _i, out: caught.append(out))
            try:
                logits = self(batch)
            finally:
                handle.remove()
            emb = caught[0] if caught else layer(batch)  # a model may skip the layer (e.g. no fields)
            return logits, emb.flatten(1)
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
                return self.head(h.float()).squeeze(-1)
        return self.head(h).squeeze(-1)

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


MODELS: dict[str, type[CTRModel]] = {}


def register_model(cls: type[CTRModel]) -> type[CTRModel]:
    """Class decorator: make a model available as ``model: {name: <cls.name>}``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    MODELS[cls.name] = cls
    return cls


#: The model of a config whose ``model`` section, or its ``name``, is left out.
DEFAULT_MODEL = "deepfm"


def model_options(config: dict[str, Any]) -> tuple[type[CTRModel], ModelOptions]:
    """Check ``{name: ..., **options}`` without building the model (no feature map needed): the
    registered class and its validated options. Problems name the key (``model.hidden_units: ...``)."""
    from reloop import models as _zoo  # noqa: F401  (registers the zoo)
    from reloop.config import _format_errors

    cfg = dict(config)
    name = cfg.pop("name", DEFAULT_MODEL)
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model.name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    try:
        return cls, cls.Options(**cfg)
    except ValidationError as e:
        raise ValueError(_format_errors(e, prefix="model.")) from None


def build_model(config: dict[str, Any], feature_map: FeatureMap) -> CTRModel:
    """Build a registered model from ``{name: ..., **options}``; unknown options name the key."""
    cls, options = model_options(config)
    return cls(feature_map, options)


def save_model(model: CTRModel, path: str | Path) -> None:
    from reloop.device import to_cpu

    torch.save({"config": model.config(), "feature_map": model.feature_map.model_dump(),
                "state_dict": to_cpu(model.state_dict())}, path)  # CPU tensors: loads on any machine


def load_model(path: str | Path, feature_map: FeatureMap | None = None) -> CTRModel:
    """Load a checkpoint written by ``save_model``; a feature map mismatch fails loudly."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    stored = FeatureMap(**blob["feature_map"])
    if feature_map is not None and stored != feature_map:
        raise ValueError(f"{path}: checkpoint was built for another feature map "
                         f"({json.dumps(stored.tables)} vs {json.dumps(feature_map.tables)})")
    model = build_model(blob["config"], stored)
    model.load_state_dict(blob["state_dict"], strict=True)
    return model
