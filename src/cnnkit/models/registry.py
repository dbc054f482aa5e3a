"""One way to make every model: ``create_model(name, num_classes, in_chans, **kwargs)``.

A name is, in the order tried: a registered model (``list_models()``), ``timm:<arch>`` for
any timm architecture (random init), or a layer spec such as ``conv32-pool-fc64``
(see ``cnnkit.models.spec``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

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
    **kwargs,
) -> nn.Module:
    """Build a model by name for ``num_classes`` outputs and ``in_chans`` input channels.

    ``input_size`` (H, W) matters only for models with a flatten + dense head.
    """
    _import_builtin_models()
    if name in _REGISTRY:
        return _REGISTRY[name].builder(
            num_classes=num_classes, in_chans=in_chans, input_size=tuple(input_size), **kwargs
        )
    if name.startswith("timm:"):
        import timm

        arch = name.removeprefix("timm:")
        if not timm.is_model(arch):
            raise ValueError(
                f"unknown timm architecture '{arch}'; list them with "
                'python -c "import timm; print(timm.list_models())"'
            )
        return timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    if looks_like_spec(name):
        return build_spec_model(name, num_classes, in_chans, tuple(input_size), **kwargs)
    raise LayerSpecError(
        f"unknown model '{name}'. Use a registered model ({', '.join(_REGISTRY)}), "
        f"'timm:<architecture>', or a layer spec.\n{SPEC_HELP}"
    )


def _import_builtin_models() -> None:
    # Importing the modules runs their @register_model decorators (once).
    from . import resnet, seed  # noqa: F401
