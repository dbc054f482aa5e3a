import pytest
import torch
from torch import nn

from cnnkit.config import OptimConfig
from cnnkit.train.optim import build_optimizer, lr_factor


def _model() -> nn.Module:
    # No bias before the norm layer: its gradient is ~0, and Adam's normalised update of
    # ~0 amplifies rounding differences between the fused and the per-tensor kernels.
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(144, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "cfg, reference",
    [
        (OptimConfig("adam", 1e-2, weight_decay=1e-2), torch.optim.Adam),
        (OptimConfig("adamw", 1e-2, weight_decay=1e-2), torch.optim.AdamW),
        (OptimConfig("sgd", 0.1, momentum=0.9, weight_decay=1e-2), torch.optim.SGD),
    ],
    ids=lambda v: getattr(v, "optimizer", ""),
)
def test_optimizers_take_the_textbook_steps(cfg, reference):
    """The (fused) optimizers update as the plain per-tensor ones with the same settings:
    weight decay on weights only, never on biases or norm parameters; SGD with Nesterov."""
    ours, plain = _model(), _model()
    params = list(plain.parameters())
    decayed = [p for p in params if p.ndim > 1]
    other = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decayed, "weight_decay": cfg.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    extra = {"momentum": cfg.momentum, "nesterov": True} if cfg.optimizer == "sgd" else {}
    _train(ours, build_optimizer(ours, cfg))
    _train(plain, reference(groups, lr=cfg.lr, foreach=False, **extra))
    initial, changed = _model().state_dict(), False
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        changed |= not torch.equal(a, initial[name])
    assert changed


def test_onecycle_rises_to_its_peak_then_falls_to_zero():
    cfg = OptimConfig(schedule="onecycle")
    f = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert f.index(max(f)) == 24 and max(f) == 1.0
    assert all(a < b for a, b in zip(f[:25], f[1:25], strict=False))
    assert all(a > b for a, b in zip(f[25:], f[26:], strict=False))
    assert f[-1] < 0.02


def test_cosine_warms_up_then_decays():
    cfg = OptimConfig(schedule="cosine", warmup_epochs=1)
    f = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0
    assert f[55] == pytest.approx(0.5, abs=0.01)
    assert f[-1] < 0.01


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adam, adamw or sgd"):
        build_optimizer(_model(), OptimConfig("rmsprop"))
