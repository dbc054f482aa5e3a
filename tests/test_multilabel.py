"""Multi-label building blocks: label sets, iterative stratification, the metrics checked
against values worked out by hand, per-label thresholds, the digit canvases."""

import numpy as np
import pytest

from cnnkit.data.multilabel import digit_canvases, iterative_split, label_matrix, parse_labels
from cnnkit.evaluate.multilabel import average_precision, fit_thresholds, multilabel_report


def test_label_cells_and_the_matrix():
    assert parse_labels("cat; dog;;cat ") == ["cat", "dog"]
    assert parse_labels("") == [] and parse_labels(" ; ") == []
    assert parse_labels("a|b", separator="|") == ["a", "b"]
    m = label_matrix([["dog"], [], ["cat", "dog"]], ["cat", "dog"])
    assert m.tolist() == [[0, 1], [0, 0], [1, 1]]
    with pytest.raises(ValueError, match="label 'bird' is not one of the 2 labels"):
        label_matrix([["bird"]], ["cat", "dog"])


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
