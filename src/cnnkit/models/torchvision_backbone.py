"""torchvision architectures as backbones: ``tv:<name>`` (``tv:resnet50``, ``tv:vgg16``,
``tv:mobilenet_v3_large``, ``tv:efficientnet_b0``, ``tv:convnext_tiny``, ...).

Their ImageNet weights come from torchvision's own cache (``$TORCH_HOME/hub/checkpoints``,
by default ``~/.cache/torch/hub/checkpoints``), downloaded there when the network allows, and
their preprocessing from the weights' own transforms.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PREFIX = "tv:"


def is_torchvision_name(name: str) -> bool:
    if not name.startswith(PREFIX):
        return False
    import torchvision

    return name.removeprefix(PREFIX) in torchvision.models.list_models(torchvision.models)


def default_weights(name: str):
    from torchvision.models import get_model_weights

    return get_model_weights(name.removeprefix(PREFIX)).DEFAULT


def cached_weights_file(name: str) -> Path:
    """Where torchvision keeps the default weights of ``name``."""
    url = default_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def preprocessing(name: str) -> dict:
    t = default_weights(name).transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return {
        "size": (crop, crop),
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "interpolation": t.interpolation.value,
        "crop_pct": round(crop / resize, 4),
    }


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier without its last dense layer: pooled features out."""

    def __init__(self, name: str, in_chans: int = 3):
        super().__init__()
        from torchvision.models import get_model

        self.net = get_model(name.removeprefix(PREFIX), weights=None)
        parent, attr, last = self._last_linear()
        self.num_features = last.in_features
        setattr(parent, attr, nn.Identity())
        if in_chans != 3:
            self.adapt_input(in_chans)

    def _last_linear(self) -> tuple[nn.Module, str, nn.Linear]:
        found = None
        for parent in self.net.modules():
            for attr, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    found = (parent, attr, child)
        if found is None:
            raise ValueError("this torchvision model has no dense classifier to replace")
        return found

    def adapt_input(self, in_chans: int) -> None:
        """Give the first convolution ``in_chans`` inputs (RGB filters folded, as timm)."""
        for parent in self.net.modules():
            for attr, child in parent.named_children():
                if isinstance(child, nn.Conv2d):
                    conv = nn.Conv2d(
                        in_chans,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        child.groups,
                        child.bias is not None,
                    )
                    setattr(parent, attr, conv)
                    return

    def load_imagenet(self, state_dict: dict[str, torch.Tensor]) -> None:
        from timm.models import adapt_input_conv

        own = self.state_dict()
        sd = {f"net.{k}": v for k, v in state_dict.items() if f"net.{k}" in own}
        for k, v in sd.items():
            if v.ndim == 4 and own[k].shape[1] != v.shape[1]:  # the adapted first conv
                sd[k] = adapt_input_conv(own[k].shape[1], v)
        missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{len(missing)} tensors missing from the weights, e.g. {missing[:3]}")
        self.load_state_dict(sd, strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map: ``features`` for most families, the stages for ResNets."""
        if hasattr(self.net, "features"):
            return self.net.features(x)
        for name, module in self.net.named_children():
            if name == "avgpool":
                return x
            x = module(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.avgpool(x)
        classifier = self.net.fc if hasattr(self.net, "fc") else self.net.classifier
        if type(self.net).__name__ != "ConvNeXt":  # ConvNeXt's classifier flattens itself
            x = torch.flatten(x, 1)
        return classifier(x)

    def parameter_blocks(self) -> list[list[str]]:
        """Parameter names grouped by block, from the input side: the children of
        ``features`` (or of the network itself, for ResNets)."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")  # net.<child>[.<index>]...
            container = getattr(self.net, parts[1])
            key = (
                ".".join(parts[:3])
                if isinstance(container, nn.Sequential) and parts[1] == "features"
                else ".".join(parts[:2])
            )
            groups.setdefault(key, []).append(name)
        return list(groups.values())
