import os

import pytest
import torch

from cnnkit.train.checkpoint import atomic_write, load_checkpoint, save_checkpoint


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
