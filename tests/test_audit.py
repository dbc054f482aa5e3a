"""The label-error audit (train/audit.py, evaluate/confident.py) on real images with
planted errors, and its files."""

import csv
import json

import pytest
import torch

from cnnkit.cli import main
from cnnkit.config import Config, apply_overrides
from cnnkit.train.audit import audit, load_audit_data, stratified_folds, write_audit


def test_folds_are_stratified_and_cover_every_image():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 7)
    fold = stratified_folds(labels, 5, seed=0)
    for c in range(3):
        counts = torch.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert set(fold.tolist()) == set(range(5))


def planted(labels: torch.Tensor, classes: int, share: float, seed: int = 0):
    """A copy of ``labels`` with ``share`` of them changed to another class, and which."""
    g = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(labels), generator=g)[: int(len(labels) * share)]
    noisy = labels.clone()
    noisy[flipped] = (
        noisy[flipped] + torch.randint(1, classes, (len(flipped),), generator=g)
    ) % classes
    return noisy, set(flipped.tolist())


@pytest.fixture(scope="module")
def mnist_audit(tmp_path_factory):
    from cnnkit.data import BUILTINS, is_available

    if is_available(BUILTINS["mnist"]) is None:
        pytest.skip("MNIST not available")
    cfg = apply_overrides(Config(), {"data": "mnist"})
    data = load_audit_data(cfg, limit=2000)
    noisy, flipped = planted(data.images.labels, 10, 0.05)
    result = audit(cfg, limit=2000, labels=noisy, quiet=True)
    return result, flipped, noisy


def test_planted_label_errors_in_mnist_are_found(mnist_audit):
    """5% of 2,000 digits relabelled at random: the audit's list of the same length holds
    most of them (benchmarks/audit.py measures 0.92; the issue's target is 0.8)."""
    result, flipped, noisy = mnist_audit
    ranked = result.issues.indices.tolist()
    top = set(ranked[: len(flipped)])
    assert len(top & flipped) / len(flipped) >= 0.8
    # the list as the audit cuts it: precision and recall both at least 0.75
    found = set(ranked) & flipped
    assert len(found) / len(ranked) >= 0.75 and len(found) / len(flipped) >= 0.75
    assert result.names[ranked[0]].startswith("train/")


def test_the_audit_files_are_editable_and_complete(mnist_audit, tmp_path):
    result, flipped, noisy = mnist_audit
    files = write_audit(result, tmp_path / "audit", gallery=10)
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == len(result.issues)
    assert set(rows[0]) == {"file", "label", "given", "given_probability", "suggested_probability"}
    first = result.rows(1)[0]
    assert rows[0]["file"] == first["name"] and rows[0]["label"] == first["suggested"]
    summary = json.loads(files["json"].read_text())
    assert summary["flagged"] == len(result.issues) and summary["folds"] == 5
    assert files["html"].read_text().count("class='card'") == 10


def test_audit_command_on_a_folder_of_photos(tmp_path, capsys):
    """A folder from scratch (the model chosen), 3 folds: the command's table and files."""
    from PIL import Image

    for c, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        folder = tmp_path / "shapes" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(12):
            shade = tuple(min(255, v + 3 * i) for v in colour)
            Image.new("RGB", (24, 24), shade).save(folder / f"{i}.png")
    out = tmp_path / "out"
    args = ["datasets", "audit", str(tmp_path / "shapes"), "--model", "conv4-pool-fc8"]
    assert main(args + ["--folds", "3", "--epochs", "2", "--audit-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cross-validated accuracy" in printed and (out / "audit.html").is_file()
    assert main(["datasets", "audit", str(tmp_path / "shapes"), "--folds", "40"]) == 1
    assert "fewer images" in capsys.readouterr().err


def test_relabel_and_exclude_apply_before_the_split(mnist_dir, tmp_path):
    """An edited audit.csv fed back: the images relabelled, or left out."""
    from cnnkit.data import load_dataset
    from cnnkit.data.builtin import load_builtin
    from cnnkit.data.corrections import read_corrections

    raw = load_builtin("mnist")
    first = int(raw.train_labels[0])
    other = str((first + 1) % 10)
    (tmp_path / "fix.csv").write_text(f"file,label,given\ntrain/0,{other},{first}\n")
    (tmp_path / "drop.csv").write_text("file,label\ntrain/1,3\ntrain/2,4\n")
    fixed = read_corrections(str(tmp_path / "fix.csv"), str(tmp_path / "drop.csv"))
    data = load_dataset("mnist", val_split=0, corrections=fixed)
    assert len(data.train) == 60_000 - 2
    assert int(data.train.labels[0]) == int(other)  # image 0 kept its place, relabelled
    assert torch.equal(data.train.images[1], torch.from_numpy(raw.train_images[3].copy()))
    assert any("1 relabelled, 2 excluded" in n for n in data.notes)
    # through train's settings, recorded in config.yaml
    run = cnnkit_train(tmp_path, relabel=str(tmp_path / "fix.csv"))
    assert run.config.data.relabel == str(tmp_path / "fix.csv")
    (tmp_path / "bad.csv").write_text("file,label\ntrain/70000,3\n")
    with pytest.raises(ValueError, match="not in mnist's training set"):
        load_dataset("mnist", corrections=read_corrections(str(tmp_path / "bad.csv"), None))
    (tmp_path / "badclass.csv").write_text("file,label\ntrain/5,zebra\n")
    with pytest.raises(ValueError, match="'zebra'"):
        load_dataset("mnist", corrections=read_corrections(str(tmp_path / "badclass.csv"), None))
    assert main(["train", "--data", "mnist", "--exclude", str(tmp_path / "none.csv")]) == 1


def cnnkit_train(tmp_path, **settings):
    import cnnkit

    return cnnkit.train(
        data="mnist", limit=300, epochs=1, runs_dir=str(tmp_path / "runs"), quiet=True, **settings
    )


def test_relabel_applies_to_a_folder_by_path(tmp_path):
    from PIL import Image

    from cnnkit.data import load_folder
    from cnnkit.data.corrections import read_corrections

    for c in ("a", "b"):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), 40 * i).save(tmp_path / "set" / c / f"{i}.png")
    (tmp_path / "fix.csv").write_text("file,label\na/0.png,b\n")
    (tmp_path / "drop.csv").write_text("file\nb/5.png\n")
    fixes = read_corrections(str(tmp_path / "fix.csv"), str(tmp_path / "drop.csv"))
    data = load_folder(tmp_path / "set", val_split=0, test_split=0, corrections=fixes)
    files = dict((path, label) for path, label in data.files["train"])
    assert files["a/0.png"] == 1 and "b/5.png" not in files and len(files) == 11
