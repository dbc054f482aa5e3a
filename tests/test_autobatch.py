import pytest
import torch

import cnnkit
from cnnkit.config import Config, apply_overrides, validate
from cnnkit.models import create_model
from cnnkit.train import autobatch
from cnnkit.train.autobatch import choose_batch_size, saved_activation_bytes
from cnnkit.train.hooks import Hook

CPU = torch.device("cpu")
F32 = torch.float32


def test_saved_activations_grow_linearly_with_the_batch():
    model = create_model("seed-cnn", 10, 1, (28, 28))
    b2, b4, b8 = (saved_activation_bytes(model, (1, 28, 28), b, CPU, F32) for b in (2, 4, 8))
    per_image = (b4 - b2) // 2
    # Every saved activation of one 28x28 image: at least the input and conv1's 32x26x26
    # float32 output that max pooling keeps.
    assert per_image >= (28 * 28 + 32 * 26 * 26) * 4
    assert b8 - b4 == 4 * per_image


def test_measuring_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 3, (32, 32))  # batch norm: running statistics
    model.eval()
    for p in list(model.parameters())[:5]:
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    saved_activation_bytes(model, (3, 32, 32), 4, CPU, F32)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert not model.training


def test_the_batch_is_the_largest_power_of_two_that_fits():
    model = create_model("resnet20", 10, 3, (32, 32))
    roomy = choose_batch_size(model, (3, 32, 32), 50_000, CPU, F32, free_bytes=1 << 40)
    assert roomy.batch_size == autobatch.CPU_CEILING
    assert "CPU ceiling" in roomy.reason

    # Room for about 10 images' activations, with the backward margin: 8 fits, 16 does not.
    free = int(10 * roomy.per_image_bytes * autobatch.BACKWARD_MARGIN / autobatch.CPU_SHARE)
    tight = choose_batch_size(model, (3, 32, 32), 50_000, CPU, F32, free_bytes=free)
    assert tight.batch_size == 8
    assert "limited by the memory" in tight.reason

    few = choose_batch_size(model, (3, 32, 32), 40, CPU, F32, free_bytes=1 << 40)
    assert few.batch_size == 8  # an epoch of 40 images is still 5 steps
    assert "training set's size" in few.reason


def test_no_room_for_one_image_is_a_clear_error():
    model = create_model("resnet20", 10, 3, (32, 32))
    with pytest.raises(MemoryError, match="smaller --image-size or model"):
        choose_batch_size(model, (3, 32, 32), 1000, CPU, F32, free_bytes=1000)


def test_batch_size_takes_a_number_or_auto():
    assert apply_overrides(Config(), {"batch_size": "AUTO"}).train.batch_size == "auto"
    assert apply_overrides(Config(), {"batch_size": "64"}).train.batch_size == 64
    with pytest.raises(ValueError, match="must be int or 'auto', got 'big'"):
        apply_overrides(Config(), {"batch_size": "big"})
    with pytest.raises(ValueError, match="train.batch_size = 0 must be positive, or auto"):
        validate(apply_overrides(Config(), {"batch_size": 0}))


def test_a_run_records_the_batch_auto_chose(mnist_dir, tmp_path):
    lines = []

    class Messages(Hook):
        def message(self, text):
            lines.append(text)

    run = cnnkit.train(
        data="mnist",
        model="seed-cnn",
        epochs=1,
        limit=600,
        batch_size="auto",
        runs_dir=str(tmp_path),
        quiet=True,
        hooks=[Messages()],
    )
    assert run.config.train.batch_size == 32  # a CPU with room: its ceiling
    assert "batch_size: 32" in (run.path / "config.yaml").read_text()
    header = next(line for line in lines if line.startswith("train "))
    assert "batch 32 (auto:" in header
