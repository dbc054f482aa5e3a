"""Multi-label building blocks: label sets, iterative stratification, the metrics checked
against values worked out by hand, per-label thresholds, the digit canvases."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cnnkit.cli import main
from cnnkit.data.folder import list_images
from cnnkit.data.multilabel import digit_canvases, iterative_split, parse_labels
from cnnkit.deploy import webapp
from cnnkit.evaluate.multilabel import average_precision, fit_thresholds, multilabel_report

# Where onnxruntime-web is, decided before any test points the user cache elsewhere.
ORT_WEB = os.environ.get(webapp.ORT_WEB_ENV) or str(webapp._package_in(webapp.ort_web_cache_dir()))


def test_label_cells():
    assert parse_labels("cat; dog;;cat ") == ["cat", "dog"]
    assert parse_labels("") == [] and parse_labels(" ; ") == []
    assert parse_labels("a|b", separator="|") == ["a", "b"]


def _images(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("L", (8, 8), 200).save(folder / name)


def test_labels_files_in_folders_and_labels_never_trained(tmp_path):
    # a folder with labels.csv: the list, paths relative to it
    _images(tmp_path / "flat", ["a.png", "b.png", "c.png"])
    (tmp_path / "flat" / "labels.csv").write_text("path,labels\na.png,cat;dog\nb.png,dog\nc.png,\n")
    listing = list_images(tmp_path / "flat")
    assert listing.classes == ["cat", "dog"]
    assert [lb for _, lb in listing.splits["all"]] == [(0, 1), (1,), ()]
    # train/ and val/ each with a labels file: the split is the folder's
    root = tmp_path / "split"
    _images(root / "train", ["a.png", "b.png"])
    _images(root / "val", ["c.png"])
    (root / "train" / "labels.tsv").write_text("path\tlabels\na.png\tcat\nb.png\tcat;dog\n")
    (root / "val" / "labels.csv").write_text("path,labels\nc.png,dog\n")
    listing = list_images(root)
    assert sorted(listing.splits) == ["train", "val"]
    assert listing.splits["val"] == [(root / "val" / "c.png", (1,))]
    # a label only validation images have could never be learned: refused, naming it
    (root / "val" / "labels.csv").write_text("path,labels\nc.png,dog;bird\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 2: label 'bird' is on a val image"):
        list_images(root)
    listed = tmp_path / "listed.csv"
    listed.write_text("path,labels,split\nflat/a.png,cat,train\nflat/b.png,dog,test\n")
    with pytest.raises(ValueError, match="line 3: label 'dog' is on a test image but on no"):
        list_images(listed)
    # several labels in a single-label list's cell: pointed at the multi-label header, or
    # read as label sets with --task multilabel
    listed.write_text("path,label\nflat/a.png,cat;dog\nflat/b.png,dog\n")
    with pytest.raises(ValueError, match="line 2 has a ';' in the label; .* path,labels"):
        list_images(listed)
    assert list_images(listed, task="multilabel").splits["all"][0][1] == (0, 1)
    with pytest.raises(ValueError, match="--task single, but the header path,labels"):
        list_images(tmp_path / "flat", task="single")
    with pytest.raises(ValueError, match="--task multilabel, but a folder of class folders"):
        (tmp_path / "flat" / "labels.csv").unlink()
        _images(tmp_path / "flat" / "cat", ["d.png"])
        _images(tmp_path / "flat" / "dog", ["e.png"])
        list_images(tmp_path / "flat", task="multilabel")


def test_shards_refuse_a_multilabel_list(tmp_path, capsys):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "labels.csv").write_text("path,labels\na.png,cat;dog\nb.png,\n")
    assert main(["datasets", "pack", str(tmp_path), str(tmp_path / "shards")]) == 1
    assert "hold one class per image, not yet a multi-label list" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_average_precision_by_hand():
    # positives found at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # a tie at the top is one step: precision 1/2 at recall 1/2, then 2/3 at recall 1
    assert average_precision([0.9, 0.9, 0.1], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert np.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_thresholds_maximise_f1_halfway_between_scores():
    probs = np.array([[0.9, 0.9], [0.8, 0.8], [0.3, 0.3], [0.2, 0.2]])
    targets = np.array([[1, 1], [1, 1], [0, 0], [1, 0]])
    # label 0: calling all four positive gives F1 6/7, the best: halfway down to 0
    # label 1: the first two give F1 1: halfway between 0.8 and 0.3
    assert fit_thresholds(probs, targets).tolist() == pytest.approx([0.1, 0.55])
    assert fit_thresholds(probs, np.zeros((4, 2)), default=0.5).tolist() == [0.5, 0.5]


def test_report_by_hand():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]])
    targets = np.array([[1, 0], [0, 1], [0, 0]])
    r = multilabel_report(probs, targets, np.array([0.5, 0.5]), ["a", "b"])
    a, b = r["per_label"]["a"], r["per_label"]["b"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (1, 1, 0, 1)
    assert a["precision"] == 0.5 and a["recall"] == 1 and a["f1"] == pytest.approx(2 / 3)
    assert b["precision"] == b["recall"] == b["f1"] == 1
    # per image: 2*1/(1+1), 2*1/(2+1), both empty = 1
    assert r["example_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert r["hamming_loss"] == pytest.approx(1 / 6)
    assert r["subset_accuracy"] == pytest.approx(2 / 3)
    assert r["mAP"] == 1.0 and a["ap"] == b["ap"] == 1.0
    # pooled: 0.9 and 0.7 are the positives, ranked first and second
    assert r["mAP_micro"] == 1.0
    worse = multilabel_report(probs[:, ::-1], targets, np.array([0.5, 0.5]), ["a", "b"])
    assert worse["mAP"] < 0.6 and worse["mAP_micro"] < 1


def test_iterative_stratification_keeps_rare_labels_in_every_split():
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 6)) < [0.5, 0.3, 0.2, 0.1, 0.05, 0.0]).astype(np.uint8)
    targets[[3, 50, 120], 5] = 1  # a label on three images only
    parts = iterative_split(targets, [0.6, 0.2, 0.2], seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))  # each image once
    assert [len(p) for p in parts] == pytest.approx([120, 40, 40], abs=3)
    for p in parts:
        assert targets[p, 5].sum() == 1  # the rare label reaches every split
        for k in range(5):  # and every label keeps about its share
            assert targets[p, k].mean() == pytest.approx(targets[:, k].mean(), abs=0.06)
    again = iterative_split(targets, [0.6, 0.2, 0.2], seed=0)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))


def test_digit_canvases_hold_the_digits_they_name():
    rng = np.random.default_rng(0)
    digits = rng.integers(1, 256, (30, 28, 28), dtype=np.uint8)  # no blank pixel
    labels = np.arange(30) % 10
    canvases, sets = digit_canvases(digits, labels, 200, seed=3)
    assert canvases.shape == (200, 56, 56) and canvases.dtype == np.uint8
    sizes = [len(s) for s in sets]
    assert 0 < sizes.count(0) < 25 and sizes.count(2) > 60 and sizes.count(1) > 60
    for canvas, s in zip(canvases, sets, strict=True):
        covered = int((canvas > 0).sum())  # digits never overlap: 784 pixels each
        allowed = {0: (0,), 1: (784, 1568), 2: (1568,)}[len(s)]  # two 3s: the label 3
        assert covered in allowed, (s, covered)
    again, same = digit_canvases(digits, labels, 200, seed=3)
    assert (again == canvases).all() and same == sets


@pytest.fixture(scope="module")
def canvas_run(tmp_path_factory):
    """The tutorial CNN, 4 epochs on 2,000 digit canvases (a multi-label CSV list)."""
    from cnnkit.data import BUILTINS, is_available

    if is_available(BUILTINS["mnist"]) is None:
        pytest.skip("MNIST not available")
    import cnnkit
    from cnnkit.data.canvases import write_digit_canvases

    root = tmp_path_factory.mktemp("canvases")
    listing = write_digit_canvases(root / "data", train=2000, test=300)
    run = cnnkit.train(
        data=str(listing), epochs=4, runs_dir=str(root / "runs"), name="ml", quiet=True
    )
    return run, listing


def test_a_multilabel_list_trains_with_per_label_thresholds(canvas_run, capsys):
    run, _ = canvas_run
    header = (run.path / "train.log").read_text()
    assert "10 labels, multi-label" in header and "iterative stratification" in header
    rows = run.history
    assert all(r["val_map"] is not None for r in rows)
    best = max(rows, key=lambda r: r["val_map"])
    assert run.checkpoint_info["epoch"] == best["epoch"]  # best.pt chosen by validation mAP
    record = run.multilabel
    assert record["fitted_on"] == "val" and len(record["thresholds"]) == 10
    assert record["val_macro_f1"] >= record["val_macro_f1_at_half"]  # fitted: no worse
    data = run.data()  # reloaded from split.json: the same label matrices
    assert data.multilabel and data.train.labels.shape[1] == 10
    assert data.val.labels.sum(0).min() > 0  # every label in the validation split


def test_evaluate_and_predict_use_the_thresholds(canvas_run, tmp_path, capsys):
    run, listing = canvas_run
    assert main(["evaluate", str(run.path)]) == 0
    assert "mAP " in capsys.readouterr().out
    saved = json.loads((run.path / "eval-test.json").read_text())
    assert saved["task"] == "multilabel" and saved["split"] == "test"
    assert saved["mAP"] > 0.2 and 0 <= saved["hamming_loss"] < 0.5  # measured 0.34 / 0.22
    per_label = saved["per_label"]
    assert [per_label[c]["threshold"] for c in run.classes] == run.multilabel["thresholds"]
    files = sorted((listing.parent / "test").glob("*.png"))[:20]
    assert main(["predict", str(run.path), *map(str, files), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    thresholds = dict(zip(run.classes, run.multilabel["thresholds"], strict=True))
    for p in document["predictions"]:
        chosen = {x["class"] for x in p["labels"]}
        expected = {t["class"] for t in p["top"] if t["probability"] >= thresholds[t["class"]]}
        assert expected <= chosen  # top holds 3: every one of them over its threshold is in
        assert all(x["probability"] >= thresholds[x["class"]] for x in p["labels"])
        assert p["label"] == ";".join(x["class"] for x in p["labels"])


def test_tta_averages_each_labels_probability(canvas_run, capsys):
    import torch

    run, _ = canvas_run
    images = run.data().test.images[:16]
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))  # 56x56: shifts of 4 px
    views = [images] + [
        padded[..., dy : dy + 56, dx : dx + 56] for dy, dx in ((0, 4), (8, 4), (4, 0), (4, 8))
    ]  # no mirror image: grayscale digits
    expected = sum(run.logits(v).sigmoid() for v in views) / 5
    torch.testing.assert_close(run.tta_logits(images).sigmoid(), expected)
    assert main(["evaluate", str(run.path), "--tta"]) == 0
    assert "test-time augmentation: mAP " in capsys.readouterr().out


def test_int8_keeps_the_label_sets(canvas_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from cnnkit.deploy.export import export_onnx

    run, _ = canvas_run
    q = export_onnx(run, tmp_path / "m.onnx", quantize="int8", check_images=300).int8
    assert q["images"] == run.data().count("val") and q["mAP_int8"] > q["mAP_fp32"] - 0.02
    assert q["label_set_agreement_with_fp32"] > 0.7  # 0.82 on the benchmark's model


def test_what_is_not_built_for_multilabel_says_so(canvas_run, capsys):
    run, _ = canvas_run
    assert main(["evaluate", str(run.path), "--ood", "fashion-mnist"]) == 1
    assert "--ood is not built for multi-label runs yet" in capsys.readouterr().err
    assert main(["audit", str(run.path)]) == 1
    assert "a multi-label list is not supported yet" in capsys.readouterr().err


def test_onnx_and_the_service_give_the_label_sets(canvas_run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import cnnkit
    from cnnkit.deploy.export import export_onnx, read_metadata
    from cnnkit.deploy.serve import create_app

    run, listing = canvas_run
    path = export_onnx(run, tmp_path / "m.onnx", check_images=300).path
    meta = read_metadata(path)["multilabel"]
    assert meta["thresholds"] == run.multilabel["thresholds"] and meta["separator"] == ";"
    files = sorted((listing.parent / "test").glob("*.png"))[:24]
    images = run.data().test.images[:24]
    onnx_probs = cnnkit.load(path).probabilities(images)
    assert np.allclose(onnx_probs, run.probabilities(images).cpu().numpy(), atol=2e-2)
    assert not np.allclose(onnx_probs.sum(1), 1, atol=0.05)  # sigmoids, not a softmax
    # the file computes in float32: so does the run it is compared with (not bf16 autocast)
    fp32 = cnnkit.load_run(run.path, device="cpu", precision="fp32")
    names = [str(f) for f in files]
    assert [p.label for p in cnnkit.load(path).predict(names)] == [
        p.label for p in fp32.predict(names)
    ]
    expected = [p.label for p in run.predict(names)]  # the service runs as the run does
    with TestClient(create_app(run.path, max_wait_ms=1)) as client:
        assert client.get("/v1/model").json()["multilabel"]["thresholds"] == meta["thresholds"]
        uploads = [("files", (f.name, f.read_bytes(), "image/png")) for f in files]
        answers = client.post("/v1/predict", files=uploads).json()["predictions"]
    assert [a["label"] for a in answers] == expected
    assert all(
        x["probability"] >= meta["thresholds"][run.classes.index(x["class"])]
        for a in answers
        for x in a["labels"]
    )


def test_errors_counted_by_the_labels_present():
    from cnnkit.evaluate.multilabel_page import error_cooccurrence

    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    predicted = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=bool)
    # image 0 holds a, b added; image 1 holds a and b, c added; image 2 (none) is left out
    assert error_cooccurrence(predicted, targets).tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_the_report_page_of_a_multilabel_run(canvas_run, capsys):
    run, _ = canvas_run
    assert main(["report", str(run.path), "--gallery", "4"]) == 0
    assert "mAP " in capsys.readouterr().out
    report = json.loads((run.path / "report.json").read_text())
    assert report["task"] == "multilabel" and report["split"] == "test"
    evaluated = run.evaluate(split="test", save=False)  # the same split, the same figures
    assert report["metrics"]["mAP"] == pytest.approx(evaluated.mAP, abs=1e-6)
    worst = report["worst"]
    assert worst and {w["kind"] for w in worst} <= {"false positive", "false negative"}
    for w in worst:  # a false positive lacks the label, a false negative holds it
        assert (w["label"] in w["true_labels"]) == (w["kind"] == "false negative")
        assert (w["label"] in w["predicted_labels"]) == (w["kind"] == "false positive")
    page = (run.path / "report.html").read_text()
    assert page.count("<div class='card'>") == len(worst)
    assert "precision-recall curves" in page and "data:image/png;base64," in page
    errors = np.array(report["error_cooccurrence"])
    assert errors.shape == (10, 10) and errors.sum() > 0


def test_the_web_app_shows_the_label_set_in_chromium(canvas_run, browser, tmp_path):
    pytest.importorskip("onnxruntime")
    import cnnkit
    from test_webapp import _classify

    if webapp._missing_files(Path(ORT_WEB)):
        pytest.skip("onnxruntime-web is not fetched (make ort-web)")
    run, listing = canvas_run
    out = tmp_path / "webapp"
    webapp.export_webapp(run, out, ort_web=ORT_WEB, check_images=100)
    config = json.loads((out / "config.json").read_text())
    assert config["multilabel"]["thresholds"] == run.multilabel["thresholds"]
    files = sorted((listing.parent / "test").glob("*.png"))[:8]
    # the browser computes in float32: so does the reference
    fp32 = cnnkit.load_run(run.path, device="cpu", precision="fp32")
    expected = [
        " + ".join(name for name, _ in p.labels) or "no label"
        for p in fp32.predict([str(f) for f in files])
    ]
    with webapp.StaticServer(out) as server:
        page = browser.new_page()
        page.goto(server.url)
        from playwright.sync_api import expect

        expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=30_000)
        shown = [_classify(page, f)[0] for f in files]
        page.close()
    assert shown == expected
    assert any(" + " in s for s in shown) or any(s != "no label" for s in shown)


def test_the_doctor_checks_a_multilabel_list(tmp_path):
    from PIL import Image

    from cnnkit.data.doctor import check_dataset

    rng = np.random.default_rng(0)
    rows = ["path,labels"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        labels = ["cat"] * (i % 2 == 0) + ["dog"] * (i % 3 == 0) + ["bird"] * (i in (5, 7))
        rows.append(f"{i}.png,{';'.join(labels)}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    report = check_dataset(tmp_path / "list.csv")
    assert report.classes == ["bird", "cat", "dog"]
    assert report.counts["all"] == [2, 20, 14]  # images holding each label
    checks = {f.check: f for f in report.findings}
    assert "bird" in checks["rare-labels"].message and checks["rare-labels"].level == "warning"
    assert "cat+dog 7" in checks["co-occurrence"].message
    # odd and not a multiple of 3: 13 of the 40, less 5 and 7 (bird)
    assert checks["no-label"].message.startswith("11 images have no label")
    assert "imbalance" not in checks  # class balance is not a multi-label finding


def test_phone_files_carry_the_label_sets(canvas_run, tmp_path):
    pytest.importorskip("executorch")
    pytest.importorskip("coremltools")
    import cnnkit
    from cnnkit.deploy.mobile import (
        describe_coreml,
        export_mobile,
        read_pte_metadata,
        runtime_predictor,
    )

    run, _ = canvas_run
    thresholds = run.multilabel["thresholds"]
    pte = export_mobile(run, "executorch", tmp_path / "m.pte", check_images=200)
    assert read_pte_metadata(pte.path)["multilabel"]["thresholds"] == thresholds
    images = run.data().test.images[:16]
    probs = runtime_predictor(pte.path)(images.numpy())
    fp32 = cnnkit.load_run(run.path, device="cpu", precision="fp32")
    assert np.allclose(probs, fp32.probabilities(images).cpu().numpy(), atol=1e-3)
    assert not np.allclose(probs.sum(1), 1, atol=0.05)  # sigmoids, not a softmax
    found = describe_coreml(export_mobile(run, "coreml", tmp_path / "m.mlpackage").path)
    assert found["outputs"] == ["probabilities"] and "classify" not in found["operations"]
    assert "sigmoid" in found["operations"]
    assert found["metadata"]["multilabel"]["thresholds"] == thresholds
    assert found["metadata"]["classes"] == run.classes
