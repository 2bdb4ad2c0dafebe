"""Base CTR models. Importing this package registers every model of the zoo."""

from reloop.models import (  # noqa: F401  (registration)
    afn,  # noqa: F401
    aoanet,
    autoint,
    bst,
    dcn,
    dcnv2,
    deepfm,
    dien,
    din,
    emb_mlp,
    fm,
    fmfm,
    lr,
    nfm,
    pnn,
    wide_deep,
    xdeepfm,
)
from reloop.models.base import MODELS, CTRModel, ModelOptions, build_model, load_model, register_model, save_model

__all__ = ["MODELS", "CTRModel", "ModelOptions", "build_model", "load_model", "register_model", "save_model"]
