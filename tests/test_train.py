import os
import signal

import pytest
import torch

import cnnkit
from cnnkit.runs.checkpoint import load_checkpoint
from cnnkit.train.hooks import Hook
from cnnkit.train.loop import TrainingInterrupted

# Dropout and augmentation both draw random numbers: resuming must restore both streams.
SMALL = dict(
    data="mnist",
    model="seed-cnn-dropout",
    augment="affine",
    limit=1200,
    batch_size=64,
    val_split=0.05,
    quiet=True,
)


def weights(run_dir) -> dict:
    return load_checkpoint(run_dir / "last.pt")["state_dict"]


def assert_same_training(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha, hb = cnnkit.load_run(a).history, cnnkit.load_run(b).history
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert ra[key] == rb[key], (key, ra, rb)


def test_golden_one_epoch_of_mnist(mnist_dir, tmp_path):
    """The tutorial recipe, one epoch on the full MNIST: at least 98.0% test accuracy."""
    run = cnnkit.train(data="mnist", model="seed-cnn", epochs=1, runs_dir=str(tmp_path), quiet=True)
    report = run.evaluate(split="test")
    assert report.num_images == 10_000
    assert report.accuracy >= 0.980, report.accuracy
    for name in (
        "config.yaml",
        "metrics.csv",
        "best.pt",
        "last.pt",
        "train.log",
        "eval-test.json",
        "confusion_matrix.png",
        "curves.png",
    ):
        assert (run.path / name).is_file(), name


def test_resume_equals_uninterrupted_run(mnist_dir, tmp_path):
    full = cnnkit.train(epochs=3, name="full", runs_dir=str(tmp_path), **SMALL).path
    part = cnnkit.train(epochs=1, name="part", runs_dir=str(tmp_path), **SMALL).path
    cnnkit.resume(part, epochs=3, quiet=True)
    assert_same_training(full, part)


class SendCtrlC(Hook):
    """Presses Ctrl-C (a real SIGINT) at a given step of a given epoch."""

    def __init__(self, epoch: int, step: int):
        self.at, self.epoch = (epoch, step), None

    def on_epoch_start(self, epoch, epochs, steps, start_step):
        self.epoch = epoch

    def on_step(self, step, sums):
        if (self.epoch, step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(mnist_dir, tmp_path):
    full = cnnkit.train(epochs=2, name="full", runs_dir=str(tmp_path), **SMALL).path
    with pytest.raises(TrainingInterrupted) as e:
        cnnkit.train(epochs=2, name="cut", runs_dir=str(tmp_path), hooks=[SendCtrlC(1, 5)], **SMALL)
    cut = tmp_path / "cut"
    assert e.value.checkpoint == cut / "last.pt" and (e.value.epoch, e.value.step) == (1, 6)
    state = load_checkpoint(cut / "last.pt")["train_state"]["state"]
    assert (state["epoch"], state["step"]) == (1, 6)
    cnnkit.resume(cut, quiet=True)
    assert_same_training(full, cut)
    log = (cut / "train.log").read_text()
    assert "resume from last.pt: epoch 2, step 6 (saved mid-epoch); 1 epoch done before" in log


def test_time_budget_stops_cleanly(mnist_dir, tmp_path):
    run = cnnkit.train(epochs=50, time_budget=0.5, limit=20_000, runs_dir=str(tmp_path), quiet=True)
    history = run.history
    assert 1 <= len(history) < 50
    assert (run.path / "best.pt").exists()
    log = (run.path / "train.log").read_text()
    assert "'stopped': 'time_budget'" in log


def test_early_stopping_after_patience(mnist_dir, tmp_path):
    # A learning rate this small leaves predictions unchanged: no epoch improves on the first.
    run = cnnkit.train(
        epochs=10, lr=1e-12, patience=2, limit=500, runs_dir=str(tmp_path), quiet=True
    )
    assert len(run.history) == 3
    assert "'stopped': 'early_stopping'" in (run.path / "train.log").read_text()


def test_runs_are_never_overwritten_silently(mnist_dir, tmp_path):
    kw = dict(epochs=1, limit=200, runs_dir=str(tmp_path), quiet=True)
    first = cnnkit.train(**kw).path
    second = cnnkit.train(**kw).path
    assert first.name == "mnist-seed-cnn" and second.name == "mnist-seed-cnn-2"
    with pytest.raises(FileExistsError, match="already exists.*--resume.*--overwrite"):
        cnnkit.train(name="mnist-seed-cnn", **kw)
    again = cnnkit.train(name="mnist-seed-cnn", overwrite=True, **kw).path
    assert again == first


def test_resume_refuses_changed_settings(mnist_dir, tmp_path):
    run = cnnkit.train(epochs=1, limit=200, runs_dir=str(tmp_path), quiet=True)
    with pytest.raises(ValueError, match="cannot change 'lr' when resuming"):
        cnnkit.resume(run.path, lr=0.1)
    with pytest.raises(ValueError, match="already finished its 1 epochs"):
        cnnkit.resume(run.path)


def test_checkpoint_describes_itself(tiny_run):
    ckpt = load_checkpoint(tiny_run.path / "best.pt")
    assert ckpt["classes"] == [str(i) for i in range(10)]
    assert ckpt["preprocessing"]["size"] == [28, 28] and ckpt["preprocessing"]["channels"] == 1
    assert ckpt["preprocessing"]["mean"][0] == pytest.approx(0.1307, abs=0.01)
    assert ckpt["model"] == {
        "name": "seed-cnn",
        "arch": None,
        "head": None,
        "num_classes": 10,
        "in_chans": 1,
        "input_size": [28, 28],
    }
    assert ckpt["config"]["train"]["epochs"] == 1 and "train_state" not in ckpt


def test_compilation_time_is_reported_apart(tmp_path):
    small = {**SMALL, "limit": 640}
    run = cnnkit.train(compile=True, epochs=1, runs_dir=str(tmp_path), **small)
    (row,) = load_checkpoint(run.path / "last.pt")["train_state"]["state"]["history"]
    steps = 640 // 64
    later_step = (row["seconds"] - row["compile_seconds"]) / (steps - 1)
    assert 0 < row["compile_seconds"] < row["seconds"]
    assert row["compile_seconds"] > 10 * later_step  # the first step compiled
    assert run.history[0]["compile_seconds"] == row["compile_seconds"]  # in metrics.csv too
    plain = cnnkit.train(epochs=1, name="plain", runs_dir=str(tmp_path), **small)
    (row,) = load_checkpoint(plain.path / "last.pt")["train_state"]["state"]["history"]
    assert "compile_seconds" not in row


def test_epoch_clock_times_the_host_on_a_cpu():
    import time

    from cnnkit.train.loop import _EpochClock

    clock = _EpochClock(torch.device("cpu"))
    time.sleep(0.05)
    assert 0.05 <= clock.seconds() < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_epoch_clock_times_the_gpu_not_the_host():
    import time

    from cnnkit.train.loop import _EpochClock

    torch.cuda._sleep(1)  # the first call loads the kernel: not part of what is timed
    torch.cuda.synchronize()
    clock = _EpochClock(torch.device("cuda"))
    t0 = time.perf_counter()
    torch.cuda._sleep(200_000_000)  # queued: the host goes on at once
    queued = time.perf_counter() - t0
    seconds = clock.seconds()
    assert seconds > 0.02 and seconds > 10 * queued


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_compiles_and_trains_on_the_gpu(tmp_path):
    # The GPU path end to end: data and augmentation on the GPU, bf16 where supported,
    # torch.compile with its compiling steps reported apart, CUDA-event epoch times.
    run = cnnkit.train(
        device="cuda", compile=True, epochs=2, runs_dir=str(tmp_path), **{**SMALL, "limit": 2000}
    )
    rows = load_checkpoint(run.path / "last.pt")["train_state"]["state"]["history"]
    assert rows[0]["compile_seconds"] > 0 and "compile_seconds" not in rows[1]
    assert all(r["seconds"] > 0 for r in rows) and rows[1]["val_acc"] > 0.5
    assert run.evaluate(split="test", save=False).accuracy > 0.5
