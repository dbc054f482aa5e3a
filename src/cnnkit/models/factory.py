"""One way to make every model: ``create_model(name, num_classes, in_chans, **kwargs)``.

A name is, in the order tried: a registered model (``list_models()``), a timm architecture
(``resnet50``, ``efficientnet_lite0``, or ``timm:<arch>``; ImageNet weights with
``pretrained=True``, see ``cnnkit.models.pretrained`` and ``cnnkit.models.weights``), or a
layer spec such as ``conv32-pool-fc64`` (see ``cnnkit.models.spec``).
"""

from __future__ import annotations

from torch import nn

from . import resnet, seed  # noqa: F401  (importing them registers their models)
from .pretrained import create_backbone_classifier, is_backbone_name
from .registry import ModelEntry, registered_model, registered_models
from .spec import SPEC_HELP, LayerSpecError, build_spec_model, looks_like_spec


def list_models() -> list[ModelEntry]:
    """The registered models, in registration order."""
    return registered_models()


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
    ``pretrained``, ``weights`` and ``head`` apply to timm and torchvision backbones (see
    models.pretrained).
    """
    entry = registered_model(name)
    if (entry is not None or looks_like_spec(name)) and (pretrained or weights or head):
        raise ValueError(
            f"'{name}' has no pretrained weights or separate head; use a timm backbone "
            "such as resnet50 or efficientnet_lite0 for transfer learning"
        )
    if entry is not None:
        return entry.builder(
            num_classes=num_classes, in_chans=in_chans, input_size=tuple(input_size), **kwargs
        )
    if is_backbone_name(name):
        return create_backbone_classifier(
            name, num_classes, in_chans, pretrained=pretrained, weights=weights, head=head
        )
    if looks_like_spec(name):
        return build_spec_model(name, num_classes, in_chans, tuple(input_size), **kwargs)
    registered = ", ".join(e.name for e in registered_models())
    raise LayerSpecError(
        f"unknown model '{name}'. Use a registered model ({registered}), "
        f"a timm architecture (e.g. resnet50, timm:<architecture>), or a layer spec.\n{SPEC_HELP}"
    )
