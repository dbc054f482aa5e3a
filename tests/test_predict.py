import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("mnist", val_split=0)
    return data.test.images[:8], data.test.labels[:8]


def test_predict_matches_the_model_on_files_of_any_mode_and_size(tiny_run, digits, tmp_path):
    images, _ = digits
    logits = tiny_run.logits(images)
    expected = [tiny_run.classes[i] for i in logits.argmax(1).tolist()]
    paths = []
    for i, img in enumerate(images):
        a = img[0].numpy()
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(a, "L").save(p)
        paths.append(p)
    got = tiny_run.predict(paths, top_k=3)
    assert [r.label for r in got] == expected
    for r in got:
        probs = [p for _, p in r.top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6

    # The same digit as RGB at 4x size, as RGBA, as 16-bit, as a JPEG: still read and predicted.
    a = images[0][0].numpy()
    big = Image.fromarray(a, "L").resize((112, 112), Image.NEAREST)
    variants = {
        "rgb.png": big.convert("RGB"),
        "rgba.png": big.convert("RGBA"),
        "grey16.png": Image.fromarray(a.astype(np.uint16) * 257),  # mode I;16
        "photo.jpg": big.convert("RGB"),
    }
    files = []
    for name, im in variants.items():
        im.save(tmp_path / name)
        files.append(tmp_path / name)
    results = tiny_run.predict(files)
    assert all(r.error is None for r in results)
    assert results[2].label == expected[0]  # 16-bit scaled back to the same 8-bit image


def test_bad_files_get_their_own_error_and_the_rest_are_predicted(tiny_run, digits, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(digits[0][0][0].numpy(), "L").save(good)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    missing = tmp_path / "missing.png"
    results = tiny_run.predict([text, good, truncated, missing])
    assert [r.error is None for r in results] == [False, True, False, False]
    assert "notes.png: not an image file" in results[0].error
    assert "cut.png" in results[2].error
    assert "missing.png: no such file" in results[3].error
    assert results[1].label is not None


def test_predict_accepts_arrays_tensors_and_pil(tiny_run, digits):
    img = digits[0][0]  # uint8 (1, 28, 28)
    from_tensor = tiny_run.predict(img)[0]
    from_float = tiny_run.predict(img.float() / 255)[0]
    from_array = tiny_run.predict(img[0].numpy())[0]
    from_pil = tiny_run.predict(Image.fromarray(img[0].numpy()))[0]
    labels = {r.label for r in (from_tensor, from_float, from_array, from_pil)}
    assert len(labels) == 1
    assert from_tensor.top[0][1] == pytest.approx(from_pil.top[0][1], abs=1e-6)


def test_cli_predict_json_and_exit_code(tiny_run, digits, tmp_path, capsys):
    good = tmp_path / "a.png"
    Image.fromarray(digits[0][0][0].numpy(), "L").save(good)
    assert main(["predict", str(tiny_run.path), str(good), "--json", "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    pred = out["predictions"][0]
    assert pred["label"] == pred["top"][0]["class"] and len(pred["top"]) == 2
    bad = tmp_path / "b.png"
    bad.write_bytes(b"junk")
    assert main(["predict", str(tiny_run.path), str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert "a.png:" in captured.out and "error:" in captured.err and "b.png" in captured.err


def test_evaluate_uses_the_same_validation_split_as_training(tiny_run):
    report = tiny_run.evaluate(split="val", save=False)
    last_row = tiny_run.history[-1]
    # The temperature folded into best.pt after training changes no prediction in exact
    # arithmetic; under bf16 autocast (CPUs with native bf16) a near-tie can round the other
    # way: one image at most.
    assert report.accuracy == pytest.approx(last_row["val_acc"], abs=1.5 / report.num_images)
    # 10% of each class, rounded per class, from the official per-class training counts
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    expected = sum(round(0.1 * n) for n in train_counts)
    assert torch.tensor(report.confusion_matrix).sum() == report.num_images == expected
