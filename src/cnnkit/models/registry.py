"""One way to make every model: ``create_model(name, num_classes, in_chans, **kwargs)``.

A name is, in the order tried: a registered model (``list_models()``), a timm architecture
(``resnet50``, ``efficientnet_lite0``, or ``timm:<arch>``; ImageNet weights with
``pretrained=True``, see ``cnnkit.models.pretrained``), or a layer spec such as
``conv32-pool-fc64`` (see ``cnnkit.models.spec``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .pretrained import create_backbone_classifier, is_backbone_name
from .spec import SPEC_HELP, LayerSpecError, build_spec_model, looks_like_spec


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str):
    """Decorator: register ``builder(num_classes, in_chans, input_size, **kwargs)``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = ModelEntry(name, builder, description)
        return builder

    return wrap


def list_models() -> list[ModelEntry]:
    """The registered models, in registration order."""
    _import_builtin_models()
    return list(_REGISTRY.values())


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (28, 28),
    *,
    pretrained: bool = False,
    weights: str | None = None,
    head: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a model by name for ``num_classes`` outputs and ``in_chans`` input channels.

    ``input_size`` (H, W) matters only for models with a flatten + dense head.
    ``pretrained``, ``weights`` and ``head`` apply to timm backbones (see models.pretrained).
    """
    _import_builtin_models()
    if (name in _REGISTRY or looks_like_spec(name)) and (pretrained or weights or head):
        raise ValueError(
            f"'{name}' has no pretrained weights or separate head; use a timm backbone "
            "such as resnet50 or efficientnet_lite0 for transfer learning"
        )
    if name in _REGISTRY:
        return _REGISTRY[name].builder(
            num_classes=num_classes, in_chans=in_chans, input_size=tuple(input_size), **kwargs
        )
    if is_backbone_name(name):
        return create_backbone_classifier(
            name, num_classes, in_chans, pretrained=pretrained, weights=weights, head=head
        )
    if looks_like_spec(name):
        return build_spec_model(name, num_classes, in_chans, tuple(input_size), **kwargs)
    raise LayerSpecError(
        f"unknown model '{name}'. Use a registered model ({', '.join(_REGISTRY)}), "
        f"a timm architecture (e.g. resnet50, timm:<architecture>), or a layer spec.\n{SPEC_HELP}"
    )


def _import_builtin_models() -> None:
    # Importing the modules runs their @register_model decorators (once).
    from . import resnet, seed  # noqa: F401
