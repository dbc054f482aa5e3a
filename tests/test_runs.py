"""A run's outputs: comparing runs, which split evaluation uses, failed starts and restarts,
and outputs that a newer best.pt made stale."""

import json

import pytest
import torch

import cnnkit
from cnnkit.cli import main
from cnnkit.runs.compare import compare_runs

TINY = dict(data="mnist", model="conv8-pool-fc16", epochs=1, limit=500, quiet=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny MNIST runs, one trained with a learning rate too small to learn."""
    from cnnkit.data import BUILTINS, is_available

    if is_available(BUILTINS["mnist"]) is None:
        pytest.skip("MNIST not available")
    runs = tmp_path_factory.mktemp("runs")
    good = cnnkit.train(name="good", runs_dir=str(runs), **TINY)
    poor = cnnkit.train(name="poor", runs_dir=str(runs), lr=1e-7, **TINY)
    return good.path, poor.path


def _set_val_acc(run_dir, val_acc: float) -> None:
    """Rewrite best.pt's recorded validation accuracy (its weights, and so their checksum,
    stay as they are)."""
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    ckpt["metrics"] = {**ckpt["metrics"], "val_acc": val_acc}
    torch.save(ckpt, run_dir / "best.pt")


def test_compare_ranks_by_validation_never_by_test(two_runs, tmp_path):
    good, poor = two_runs
    result = compare_runs([good, poor], plot=tmp_path / "c.png")
    by_name = {r["run"]: r for r in result["runs"]}
    assert by_name[str(good)]["accuracy"] > by_name[str(poor)]["accuracy"]  # on test
    assert result["best"] == str(good) and result["ranked_by"] == "val_accuracy"
    # Validation prefers the run that does worse on test: validation must win.
    _set_val_acc(poor, 0.99)
    try:
        result = compare_runs([good, poor])
    finally:
        _set_val_acc(poor, by_name[str(poor)]["val_accuracy"])
    assert result["best"] == str(poor)
    assert "ranked by validation accuracy" in result["ranking"]
    # Asked for validation, runs that have a test split are not said to lack one.
    on_val = compare_runs([good, poor], split="val")
    assert on_val["split"] == "val" and "--split val" in on_val["ranking"]


def test_cli_compare_says_which_column_ranks(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per table row
    good, poor = two_runs
    args = ["compare", str(good), str(poor), "--out", str(tmp_path / "c.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val acc (ranks)" in out and "ranked by validation accuracy" in out


# ------------------------------------------------ a folder with train/ and val/, no test/


@pytest.fixture(scope="module")
def no_test_run(tmp_path_factory):
    """A tiny run on synthetic photos in train/ and val/ folders, with no test/."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("photos")
    make_photos(root / "train", per_class=8)
    make_photos(root / "val", per_class=4)
    return cnnkit.train(
        data=str(root),
        model="conv8-pool-fc16",
        image_size=32,
        epochs=1,
        runs_dir=str(tmp_path_factory.mktemp("runs")),
        quiet=True,
    )


def test_training_header_says_there_is_no_test_split(no_test_run):
    log = (no_test_run.path / "train.log").read_text()
    assert "test held out" not in log
    assert "no test split: evaluate and report will use the validation split" in log


def test_evaluate_without_a_split_uses_val_with_the_caveat(no_test_run, capsys):
    from cnnkit.cli import build_parser
    from cnnkit.commands import cmd_evaluate

    report = no_test_run.evaluate()
    assert report.split == "val" and report.num_images == 12
    saved = json.loads((no_test_run.path / "eval-val.json").read_text())
    assert saved["split_reason"] == "the run has no test split"
    assert "validation split that selected best.pt: an optimistic" in saved["caveat"]
    # `cnnkit evaluate RUN` with no --split
    (no_test_run.path / "eval-val.json").unlink()
    args = build_parser().parse_args(["evaluate", str(no_test_run.path)])
    assert args.split is None
    assert cmd_evaluate(args) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "val split (the run has no test split)" in out
    assert "caveat this is the validation split that selected best.pt" in out
    # the file the command saved gives the same reason as its output
    saved = json.loads((no_test_run.path / "eval-val.json").read_text())
    assert saved["split_reason"] == "the run has no test split"


def test_asking_for_a_missing_test_split_says_what_to_do(no_test_run, capsys):
    assert main(["evaluate", str(no_test_run.path), "--split", "test"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no test split" in err and "--split val" in err


def test_a_test_split_needs_no_caveat(tiny_run):
    choice = tiny_run.choose_split()
    assert (choice.split, choice.caveat) == ("test", None)
    assert tiny_run.choose_split("val").caveat.startswith("this is the validation split")


def test_report_on_the_selection_split_carries_the_caveat(no_test_run, capsys):
    assert main(["report", str(no_test_run.path), "--gallery", "2"]) == 0
    out = capsys.readouterr().out
    assert "val split: the run has no test split" in out and "caveat: this is the" in out
    report = json.loads((no_test_run.path / "report.json").read_text())
    assert report["split"] == "val" and "optimistic" in report["caveat"]
    page = (no_test_run.path / "report.html").read_text()
    assert "<p class='caveat'><b>Caveat:</b> this is the validation split" in page


# ------------------------------------------------ failed starts and runs with no checkpoint


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    settings = dict(TINY, data=str(tmp_path / "no-such-folder"), runs_dir=str(runs))
    for _ in range(2):  # a retry would have made a second, "-2" folder
        with pytest.raises((FileNotFoundError, ValueError)):
            cnnkit.train(**settings)
        assert not runs.exists() or list(runs.iterdir()) == []
    args = ["train", "--data", str(tmp_path / "no-such-folder"), "--runs-dir", str(runs)]
    assert main([*args, "--name", "mine"]) == 1
    assert "error:" in capsys.readouterr().err and not (runs / "mine").exists()


def test_ctrl_c_during_set_up_leaves_no_run_folder(tmp_path, mnist_dir):
    from cnnkit.train.hooks import Hook

    class CtrlCAtTheHeader(Hook):
        def message(self, text: str) -> None:
            raise KeyboardInterrupt

    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        cnnkit.train(runs_dir=str(runs), name="x", hooks=[CtrlCAtTheHeader()], **TINY)
    assert not (runs / "x").exists()


def test_resume_restarts_a_run_that_has_no_checkpoint(tmp_path, mnist_dir, capsys):
    """A run killed in its first epoch leaves config.yaml and train.log, no last.pt."""
    from cnnkit.config import Config, apply_overrides, dump_config

    run_dir = tmp_path / "runs" / "killed"
    run_dir.mkdir(parents=True)
    settings = {k: v for k, v in TINY.items() if k != "quiet"}
    dump_config(apply_overrides(Config(), {**settings, "name": "killed"}), run_dir / "config.yaml")
    (run_dir / "train.log").write_text("2026-01-01 00:00:00 data   mnist: ...\n")
    (run_dir / "metrics.csv").write_text("epoch,stage\n1,train\n")  # a row, no checkpoint
    assert main(["train", "--resume", str(run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "restart" in out and "no checkpoint" in out and "from the start" in out
    run = cnnkit.load_run(run_dir)
    assert [r["epoch"] for r in run.history] == [1.0] and (run_dir / "last.pt").exists()
    assert run.config.model.name == "conv8-pool-fc16" and run.config.data.limit == 500
    assert "training it from the start" in (run_dir / "train.log").read_text()


def test_resume_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no last.pt.*not a cnnkit run"):
        cnnkit.resume(tmp_path / "empty")


# ------------------------------------------------ outputs made from an older checkpoint


def test_outputs_record_their_checkpoint_and_go_stale_when_it_changes(tmp_path):
    from cnnkit.runs.checkpoint import checkpoint_identity, save_checkpoint
    from cnnkit.runs.run import stale_outputs

    best = tmp_path / "best.pt"
    save_checkpoint(best, {"state_dict": {"w": torch.ones(2)}, "epoch": 1})
    made_from = checkpoint_identity(best)
    assert made_from["epoch"] == 1 and len(made_from["weights_sha256"]) == 64
    (tmp_path / "eval-test.json").write_text(json.dumps({"checkpoint": made_from}))
    (tmp_path / "report.json").write_text(json.dumps({"checkpoint": made_from}))
    (tmp_path / "report.html").write_text("<html></html>")
    (tmp_path / "split.json").write_text(json.dumps({"root": "x"}))  # no output: ignored
    assert stale_outputs(tmp_path) == []

    save_checkpoint(best, {"state_dict": {"w": torch.zeros(2)}, "epoch": 3})  # resumed
    stale = {s.files[0].name: s for s in stale_outputs(tmp_path)}
    assert set(stale) == {"eval-test.json", "report.json"}
    assert [f.name for f in stale["report.json"].files] == ["report.json", "report.html"]
    assert "made from best.pt epoch 1" in stale["report.json"].describe()
    assert "best.pt is now epoch 3" in stale["report.json"].describe()
    assert stale["eval-test.json"].rebuild == f"cnnkit evaluate {tmp_path} --split test"
    assert stale["report.json"].rebuild == f"cnnkit report {tmp_path}"


def test_outputs_from_before_the_checkpoint_was_recorded_are_judged_by_epoch(tmp_path):
    from cnnkit.runs.checkpoint import save_checkpoint
    from cnnkit.runs.run import stale_outputs

    save_checkpoint(tmp_path / "best.pt", {"state_dict": {"w": torch.ones(2)}, "epoch": 2})
    (tmp_path / "eval-val.json").write_text(json.dumps({"weights_epoch": 2}))
    report = {"run": {"weights": "best.pt (epoch 1)", "created": None}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert [s.files[0].name for s in stale_outputs(tmp_path)] == ["report.json"]


def test_resume_names_the_outputs_a_new_best_checkpoint_made_stale(tmp_path, mnist_dir, capsys):
    run = cnnkit.train(name="r", runs_dir=str(tmp_path), **TINY)
    run.evaluate(split="val")
    run.report(gallery=2)
    recorded = json.loads((run.path / "report.json").read_text())["checkpoint"]
    assert recorded["file"] == "best.pt" and recorded["epoch"] == 1
    assert json.loads((run.path / "eval-val.json").read_text())["checkpoint"] == recorded
    assert run.stale_outputs() == []

    assert main(["train", "--resume", str(run.path), "--epochs", "2", "--quiet"]) == 0
    resumed = cnnkit.load_run(run.path)
    assert resumed.checkpoint_info["epoch"] == 2  # a new best.pt
    out = capsys.readouterr().out
    assert f"{run.path}: 2 epochs, best.pt val acc {resumed.val_accuracy:.4f}" in out
    assert "stale  eval-val.json: made from best.pt epoch 1" in out
    assert "stale  report.json, report.html: made from best.pt epoch 1" in out
    assert f"rebuild: cnnkit report {run.path}" in out

    assert main(["report", str(run.path), "--gallery", "2"]) == 0
    assert "rebuilding a stale output: report.json, report.html" in capsys.readouterr().out
    assert main(["evaluate", str(run.path), "--split", "val", "--json"]) == 0
    assert "rebuilding a stale output: eval-val.json" in capsys.readouterr().err
    assert cnnkit.load_run(run.path).stale_outputs() == []


def test_compare_runs_without_a_test_split_on_their_validation_split(no_test_run, tmp_path):
    result = compare_runs([no_test_run.path, no_test_run.path], plot=tmp_path / "c.png")
    assert result["split"] == "val" and len(result["runs"]) == 2
    assert "these runs have no test split" in result["ranking"]


def test_resume_does_not_take_a_folder_that_only_holds_a_recipe(tmp_path):
    (tmp_path / "config.yaml").write_text("optim: {lr: 0.01}\n  # a user's recipe\n")
    with pytest.raises(FileNotFoundError, match="not a cnnkit run"):
        cnnkit.resume(tmp_path)
    assert "a user's recipe" in (tmp_path / "config.yaml").read_text()  # left as it was


def test_tta_adds_no_mirror_image_for_grayscale_folders(no_test_run, monkeypatch):
    seen = []
    monkeypatch.setattr(
        type(no_test_run),
        "logits",
        lambda self, x: seen.append(x) or x.new_zeros(len(x), 3).float(),
    )
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    no_test_run.tta_logits(images)
    assert len(seen) == 6  # colour photos: the image, four shifts and the mirror
    seen.clear()
    monkeypatch.setitem(no_test_run.preprocessing, "channels", 1)
    no_test_run.tta_logits(images[:, :1])
    assert len(seen) == 5  # grayscale: trained without flips, so no mirror view


def test_runs_started_at_once_never_share_a_folder(tmp_path):
    import threading

    from cnnkit.config import Config, apply_overrides
    from cnnkit.runs.directory import make_run_dir

    cfg = apply_overrides(Config(), {"runs_dir": str(tmp_path)})
    start, paths = threading.Barrier(8), []

    def claim():
        start.wait()
        paths.append(make_run_dir(cfg)[0])

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8
    assert sorted(p.name for p in paths)[:2] == ["mnist-seed-cnn", "mnist-seed-cnn-2"]


def test_overwrite_that_fails_to_start_keeps_the_old_run(tmp_path, mnist_dir):
    kw = dict(model="conv8-pool-fc16", epochs=1, limit=300, name="r", runs_dir=str(tmp_path))
    old = cnnkit.train(data="mnist", quiet=True, **kw).path
    weights = (old / "best.pt").read_bytes()
    with pytest.raises(FileNotFoundError):
        cnnkit.train(data="no-such-folder", overwrite=True, quiet=True, **kw)
    assert (old / "best.pt").read_bytes() == weights  # put back as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    cnnkit.train(data="mnist", overwrite=True, quiet=True, seed=1, **kw)
    assert (old / "best.pt").read_bytes() != weights  # replaced once the new run trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
