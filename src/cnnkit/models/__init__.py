"""Models: the registry, the tutorial convnets, layer specs, small-image ResNets, timm."""

from .factory import create_model, list_models
from .registry import ModelEntry, register_model
from .spec import SPEC_HELP, LayerSpecError

__all__ = [
    "SPEC_HELP",
    "LayerSpecError",
    "ModelEntry",
    "create_model",
    "list_models",
    "register_model",
]
