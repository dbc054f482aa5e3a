import pytest
import torch
from torch import nn

from cnnkit.models import LayerSpecError, create_model, register_model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_seed_cnn_is_the_tutorial_network():
    m = create_model("seed-cnn", num_classes=10, in_chans=1, input_size=(28, 28))
    kinds = [type(x).__name__ for x in [*m.features, *m.head]]
    assert kinds == [  # max pooling before the ReLU: see the next test
        "Conv2d",
        "MaxPool2d",
        "ReLU",
        "Conv2d",
        "MaxPool2d",
        "ReLU",
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
    ]
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))]
    assert n_params(m) == 121_930  # what Keras's model.summary() prints for the tutorial


def test_pooling_before_relu_computes_the_tutorial_network_exactly():
    """conv-pool-relu is the tutorial's conv-relu-pool, outputs and gradients alike."""
    torch.manual_seed(0)
    m = create_model("seed-cnn", num_classes=10, in_chans=1, input_size=(28, 28)).double()
    conv1, _, _, conv2, _, _ = m.features
    tutorial_order = nn.Sequential(
        conv1, nn.ReLU(), nn.MaxPool2d(2), conv2, nn.ReLU(), nn.MaxPool2d(2), *m.head
    )
    x, y = torch.randn(16, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (16,))
    grads = []
    for net in (m, tutorial_order):
        net.zero_grad()
        out = net(x)
        nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = grads
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    # ... and only max pooling moves: average pooling does not commute with ReLU
    avg = create_model("conv8-avgpool", 2, 1, (8, 8))
    assert [type(x).__name__ for x in avg.features] == ["Conv2d", "ReLU", "AvgPool2d"]


def test_seed_cnn_dropout_places_dropout_like_the_tutorial():
    m = create_model("seed-cnn-dropout", 10, 1, (28, 28))
    layers = [*m.features, *m.head]
    drops = [(i, x.p) for i, x in enumerate(layers) if isinstance(x, nn.Dropout)]
    assert [p for _, p in drops] == [0.25, 0.25, 0.5]
    assert all(isinstance(layers[i - 2], nn.MaxPool2d) for i, _ in drops[:2])  # pool, ReLU
    assert isinstance(layers[drops[2][0] + 1], nn.Linear)  # just before the last dense
    assert n_params(m) == 121_930


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 224, 224)])
@pytest.mark.parametrize("name", ["seed-cnn", "seed-cnn-dropout", "resnet20"])
def test_models_accept_any_size_and_channels(name, shape):
    c, h, w = shape
    m = create_model(name, num_classes=7, in_chans=c, input_size=(h, w))
    assert m(torch.zeros(2, c, h, w)).shape == (2, 7)


def test_resnet20_matches_the_paper():
    m = create_model("resnet20", 10, 3, (32, 32))
    assert round(n_params(m) / 1e6, 2) == 0.27  # He et al. 2016, Table 6
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convolutions + the dense layer


def test_layer_spec_builds_what_it_says():
    m = create_model("conv16same-bn-pool-conv32x5-gap-drop0.3-fc20", 4, 3, (32, 32))
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    conv2 = [x for x in m.features if isinstance(x, nn.Conv2d)][1]
    assert conv2.kernel_size == (5, 5)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.features)


@pytest.mark.parametrize(
    "spec, token, problem",
    [
        ("conv32-pool-conx64", "conx64", "is not a valid token"),
        ("conv32-pool-pool-pool-pool-pool", "pool", "shrinks the 28x28 input to nothing"),
        ("fc64-conv32", "conv32", "already flat"),
        ("conv32-drop1.5", "drop1.5", "must be in [0, 1)"),
    ],
)
def test_layer_spec_errors_point_at_the_bad_token(spec, token, problem):
    with pytest.raises(LayerSpecError) as e:
        create_model(spec, 10, 1, (28, 28))
    msg = str(e.value)
    assert f"'{token}' " in msg and problem in msg
    lines = msg.splitlines()
    spec_line = next(i for i, line in enumerate(lines) if line.strip() == spec)
    caret = lines[spec_line + 1]
    start = caret.index("^")
    assert lines[spec_line][start : start + len(token)] == token  # the caret is under the token
    assert "conv<F>[x<K>][same]" in msg and "drop<P>" in msg  # lists the valid tokens


def test_unknown_model_lists_the_options():
    with pytest.raises(LayerSpecError, match="registered model.*seed-cnn.*timm architecture"):
        create_model("lenet", 10, 1)


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model("seed-cnn", "again")(lambda **kw: None)


def test_timm_architectures_by_name():
    m = create_model("timm:resnet18", num_classes=5, in_chans=1)
    assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet19'"):
        create_model("timm:resnet19", 5, 1)
