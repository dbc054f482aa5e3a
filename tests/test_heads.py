"""The head of a backbone classifier: layer-spec tokens that work on pooled features (fc<N>,
drop<P>, bn), parsed by the same grammar as layer-spec models."""

import pytest
import torch
from torch import nn

from cnnkit.models.pretrained import HEAD_KINDS, build_head
from cnnkit.models.spec import LayerSpecError, tokenize


def test_head_layers_follow_the_spec():
    head = build_head("bn-fc64-drop0.5-fc32", 512, 3)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["BatchNorm1d", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert head[0].num_features == 512 and head[3].p == 0.5
    dense = [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]
    assert dense == [(512, 64), (64, 32), (32, 3)]
    assert head(torch.zeros(2, 512)).shape == (2, 3)


@pytest.mark.parametrize("spec", [None, ""])
def test_no_head_spec_is_the_classifier_alone(spec):
    head = build_head(spec, 512, 3)
    assert len(head) == 1 and (head[0].in_features, head[0].out_features) == (512, 3)


def test_a_head_reads_its_tokens_as_a_layer_spec_does():
    spec = "fc64-drop.5-bn-drop0"
    assert tokenize(spec, HEAD_KINDS) == tokenize(spec)
    assert [m.p for m in build_head(spec, 8, 2) if isinstance(m, nn.Dropout)] == [0.5, 0.0]


@pytest.mark.parametrize(
    "spec, token",
    [("conv8", "conv8"), ("fc64-pool", "pool"), ("fc64--drop0.5", ""), ("drop", "drop")],
)
def test_a_token_a_head_cannot_use_is_named_with_those_it_can(spec, token):
    with pytest.raises(LayerSpecError) as e:
        build_head(spec, 512, 3)
    assert str(e.value) == (
        f"head '{spec}': token '{token}' is not valid; a head uses fc<N>, drop<P> and bn, "
        "e.g. fc256-drop0.5"
    )


@pytest.mark.parametrize(
    "spec, token, problem",
    [("fc64-drop1.5", "drop1.5", "must be in [0, 1)"), ("fc0", "fc0", "needs at least 1 unit")],
)
def test_a_bad_number_is_named_with_the_tokens_a_head_uses(spec, token, problem):
    with pytest.raises(LayerSpecError) as e:
        build_head(spec, 512, 3)
    msg = str(e.value)
    assert msg.startswith(f"head '{spec}': token '{token}' ") and problem in msg
    assert msg.endswith("A head uses fc<N>, drop<P> and bn, e.g. fc256-drop0.5")
