"""ImageNet backbones from timm or torchvision, with a new head for your classes, for
transfer learning.

``create_backbone_classifier("resnet50", num_classes=2, pretrained=True)`` gives a
``BackboneClassifier``: the network without its ImageNet classifier (it outputs pooled
features) followed by a head: optional extra layers (``head="fc256-drop0.5"``, tokens of the
layer-spec grammar in ``cnnkit.models.spec``) and a dense layer with one output per class.

Where the weights come from and the preprocessing they need: ``cnnkit.models.weights``.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import LayerSpecError, tokenize
from .torchvision_backbone import is_torchvision_name
from .weights import load_backbone, resolve_arch, weight_source

# The layer-spec tokens a head over pooled (flat) features can use.
HEAD_KINDS = ("fc", "drop", "bn")
_HEAD_HELP = "fc<N>, drop<P> and bn, e.g. fc256-drop0.5"


def is_backbone_name(name: str) -> bool:
    """Whether ``name`` is a timm (``timm:<arch>``, an alias) or torchvision (``tv:<name>``)
    architecture."""
    import timm

    return (
        name.startswith("timm:") or timm.is_model(resolve_arch(name)) or is_torchvision_name(name)
    )


class BackboneClassifier(nn.Module):
    """A feature extractor (pooled features out) followed by a classification head."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._frozen: list[nn.Module] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling (what Grad-CAM looks at)."""
        return self.backbone.forward_features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features: what the head sees."""
        return self.backbone(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def blocks(self) -> list[list[str]]:
        """Backbone parameter names grouped into blocks, from the input side (timm's groups)."""
        from timm.models import group_parameters

        if hasattr(self.backbone, "parameter_blocks"):  # torchvision
            return self.backbone.parameter_blocks()
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        return [names for _, names in sorted(groups.items())]

    def freeze_backbone(self, keep_trainable_blocks: int = 0) -> None:
        """Freeze the backbone except its last ``keep_trainable_blocks`` blocks.

        Batch-norm statistics stay fixed (eval mode even when the model trains): updating
        them on a small data set is a classic cause of fine-tuning collapse.
        """
        blocks = self.blocks()
        trainable = (
            {n for b in blocks[len(blocks) - keep_trainable_blocks :] for n in b}
            if keep_trainable_blocks
            else set()
        )
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(name in trainable)
        # batch-norm statistics stay fixed everywhere, as in unfreeze
        self._frozen = _batch_norms(self.backbone) if keep_trainable_blocks else [self.backbone]
        self.train(self.training)

    def unfreeze(self) -> None:
        """Make the whole backbone trainable, its batch-norm statistics excepted: with
        small batches of a new data set they would drift from what the weights expect (the
        usual fine-tuning advice, e.g. Keras's), while their scale and shift still learn."""
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        self._frozen = _batch_norms(self.backbone)
        self.train(self.training)

    def train(self, mode: bool = True) -> BackboneClassifier:
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    """The batch-norm layers inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def build_head(spec: str | None, in_features: int, num_classes: int) -> nn.Sequential:
    """Extra layers from a spec of fc<N>, drop<P> and bn tokens, then the classifier."""
    layers: list[nn.Module] = []
    width = in_features
    for tok in tokenize(spec, HEAD_KINDS) if spec else []:
        if tok.kind is None:
            raise LayerSpecError(
                f"head '{spec}': token '{tok.text}' is not valid; a head uses {_HEAD_HELP}"
            )
        if tok.problem:
            raise LayerSpecError(
                f"head '{spec}': token '{tok.text}' {tok.problem} A head uses {_HEAD_HELP}"
            )
        if tok.kind == "fc":
            (units,) = tok.args
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
            width = units
        elif tok.kind == "drop":
            layers.append(nn.Dropout(tok.args[0]))
        elif tok.kind == "bn":
            layers.append(nn.BatchNorm1d(width))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def create_backbone_classifier(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    head: str | None = None,
) -> BackboneClassifier:
    """A timm or torchvision backbone (ImageNet weights if asked) with a new head for
    ``num_classes``."""
    arch, source = weight_source(name, pretrained, weights)
    backbone = load_backbone(arch, source, in_chans, weights)
    model = BackboneClassifier(backbone, build_head(head, backbone.num_features, num_classes))
    model.arch, model.weight_source = arch, source
    return model
