"""Base CTR models. Importing this package registers every model of the zoo."""
from reloop.models.base import MODELS, CTRModel, ModelOptions, build_model, load_model, register_model, save_model
from reloop.models import emb_mlp, deepfm  # noqa: F401  (registration)

__all__ = ["MODELS", "CTRModel", "ModelOptions", "build_model", "load_model", "register_model", "save_model"]
