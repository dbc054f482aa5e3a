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
    # float32, as the probabilities were computed (bf16 autocast would round them)
    run = cnnkit.load_run(run_dir, device="cpu", precision="fp32")
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


def _flip_tensor_bytes(path: Path, tensor: torch.Tensor, count: int) -> None:
    """Flip ``count`` bytes inside ``tensor``'s storage in the file: the zip and the pickle
    stay readable, only the weights change (what a damaged disk or copy does)."""
    raw = bytearray(path.read_bytes())
    start = bytes(raw).find(tensor.numpy().tobytes())
    assert start >= 0, "the tensor's bytes are stored as they are"
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_weights_are_refused_naming_the_fallback(tmp_path):
    weights = torch.randn(10_000)  # 40,000 bytes of storage
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    best = run_dir / "best.pt"
    save_checkpoint(best, {"state_dict": {"fc.weight": weights, "fc.bias": torch.zeros(3)}})
    _flip_tensor_bytes(best, weights, 20_000)
    assert not torch.equal(torch.load(best, weights_only=True)["state_dict"]["fc.weight"], weights)
    with pytest.raises(ValueError, match=r"best\.pt: the weights do not match the checksum") as e:
        load_checkpoint(best)
    assert "last.pt" in str(e.value) and "--weights last" in str(e.value)


def test_a_tensor_changed_under_the_old_checksum_is_refused(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"state_dict": {"w": torch.ones(4)}})
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["state_dict"]["w"][2] = float("nan")
    torch.save(ckpt, tmp_path / "last.pt")  # the old weights_sha256 kept
    with pytest.raises(ValueError, match="corrupted.*best.pt may still be intact"):
        load_checkpoint(tmp_path / "last.pt")


def test_checksum_ignores_key_order_and_catches_a_renamed_tensor():
    from cnnkit.runs.checkpoint import weights_checksum

    a, b = torch.ones(2), torch.arange(3.0)
    assert weights_checksum({"a": a, "b": b}) == weights_checksum({"b": b, "a": a})
    assert weights_checksum({"a": a, "b": b}) != weights_checksum({"a": a, "c": b})
    assert weights_checksum({"a": a.bfloat16()}) != weights_checksum({"a": a})


def test_format_1_checkpoints_without_a_checksum_still_load():
    ckpt = torch.load(FIXTURE / "best.pt", weights_only=True)
    assert "weights_sha256" not in ckpt  # written by cnnkit 0.1.0
    assert load_checkpoint(FIXTURE / "best.pt")["epoch"] == 1


def test_cli_refuses_a_corrupted_best_pt_in_one_line_and_last_pt_still_works(
    tiny_run, tmp_path, capsys
):
    from cnnkit.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.path, run_dir)
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    largest = max(ckpt["state_dict"].values(), key=lambda t: t.numel())
    _flip_tensor_bytes(run_dir / "best.pt", largest, min(20_000, largest.numel() * 4))
    assert main(["evaluate", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pt: the weights do not match" in err
    assert "--weights last" in err
    assert main(["evaluate", str(run_dir), "--weights", "last", "--json"]) == 0
