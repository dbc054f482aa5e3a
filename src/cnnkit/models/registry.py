"""The model registry: named model builders.

Model modules (``seed``, ``resnet``) add theirs with ``@register_model``; ``factory`` imports
them and builds models by name. This module imports no model module, so none of them has to
be imported lazily to avoid a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

ModelBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, its builder and a one-line description."""

    name: str
    builder: ModelBuilder
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register ``builder(num_classes, in_chans, input_size, **kwargs)``."""

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = ModelEntry(name, builder, description)
        return builder

    return wrap


def registered_model(name: str) -> ModelEntry | None:
    """The model registered as ``name``, or None."""
    return _REGISTRY.get(name)


def registered_models() -> list[ModelEntry]:
    """The registered models, in registration order."""
    return list(_REGISTRY.values())
