import os
import shutil
from pathlib import Path

import pytest
import torch

from cnnkit.runs.checkpoint import atomic_write, load_checkpoint, save_checkpoint


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"state_dict": {"w": torch.ones(3)}})

    def crash(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_checkpoint_records_provenance(tmp_path):
    save_checkpoint(tmp_path / "x.pt", {"classes": ["a"]})
    ckpt = load_checkpoint(tmp_path / "x.pt")
    assert set(ckpt["versions"]) >= {"cnnkit", "torch", "torchvision", "python"}
    assert ckpt["created"].startswith("20") and ckpt["classes"] == ["a"]


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="junk.pt: cannot be read as a checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cnnkit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


FIXTURE = Path(__file__).parent / "fixtures" / "run-format-1"


def test_a_run_written_in_format_1_still_loads_and_predicts_the_same(tmp_path):
    """tests/fixtures/run-format-1 was trained and saved by cnnkit 0.1.0 (format 1), with
    the probabilities that version computed for eight test digits."""
    import cnnkit

    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    expected = torch.load(run_dir / "expected.pt", weights_only=True)
    run = cnnkit.load_run(run_dir, device="cpu")
    assert run.classes == [str(i) for i in range(10)]
    assert run.checkpoint_info["epoch"] == 1
    probs = run.probabilities(expected["images"]).cpu()
    assert torch.allclose(probs, expected["probabilities"], atol=1e-5)


def test_a_run_written_in_format_1_resumes(tmp_path, mnist_dir):
    import cnnkit

    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    run = cnnkit.resume(run_dir, epochs=2, quiet=True)
    assert [r["epoch"] for r in run.history] == [1.0, 2.0]
    assert load_checkpoint(run_dir / "last.pt")["train_state"]["state"]["epoch"] == 2


@pytest.mark.parametrize(
    "fmt, message",
    [
        ("cnnkit.checkpoint/2", "format version 2 was written by a newer cnnkit"),
        ("cnnkit.checkpoint/0", "unknown checkpoint format 'cnnkit.checkpoint/0'"),
        ("cnnkit.checkpoint/v1", "unknown checkpoint format 'cnnkit.checkpoint/v1'"),
    ],
)
def test_a_checkpoint_format_this_version_does_not_read_is_a_clear_error(tmp_path, fmt, message):
    save_checkpoint(tmp_path / "x.pt", {"classes": ["a"]})
    ckpt = torch.load(tmp_path / "x.pt", weights_only=True)
    torch.save({**ckpt, "format": fmt}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "x.pt")
