"""The tutorial convnets, as named layer specs.

``seed-cnn`` is the classic Keras/TensorFlow MNIST tutorial model: Conv 32 3x3 ReLU,
MaxPool 2, Conv 64 3x3 ReLU, MaxPool 2, Flatten, Dense 64 ReLU, Dense classes
(121,930 parameters on 28x28x1 with 10 classes, the same count Keras prints).
"""

from __future__ import annotations

from .registry import register_model
from .spec import build_spec_model

SEED_SPECS = {
    "seed-cnn": "conv32-pool-conv64-pool-fc64",
    # The tutorial's dropout variant: 0.25 after each pooling layer, 0.5 before the last dense.
    "seed-cnn-dropout": "conv32-pool-drop0.25-conv64-pool-drop0.25-fc64-drop0.5",
}


def _register(name: str, spec: str) -> None:
    @register_model(name, f"tutorial convnet: {spec}")
    def build(num_classes: int, in_chans: int, input_size: tuple[int, int], **kwargs):
        return build_spec_model(spec, num_classes, in_chans, input_size, **kwargs)


for _name, _spec in SEED_SPECS.items():
    _register(_name, _spec)
