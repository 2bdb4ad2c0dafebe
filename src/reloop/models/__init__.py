"""Base CTR models. Importing this package registers every model of the zoo."""
from reloop.models.base import MODELS, CTRModel, ModelOptions, build_model, load_model, register_model, save_model
from reloop.models import emb_mlp, deepfm  # noqa: F401  (registration)
from reloop.models import (lr, fm, nfm, pnn, wide_deep, dcn, dcnv2, xdeepfm, fmfm, afn,  # noqa: F401
                           autoint, aoanet, din, dien, bst)

__all__ = ["MODELS", "CTRModel", "ModelOptions", "build_model", "load_model", "register_model", "save_model"]
