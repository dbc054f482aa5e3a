"""Confident learning (evaluate/confident.py) on hand-made probabilities."""

import numpy as np

from cnnkit.evaluate.confident import (
    calibrated_joint,
    confident_joint,
    find_label_issues,
    per_class_thresholds,
    rank_by_self_confidence,
)

# 6 images, 2 classes; image 2 is labelled 0 but the model is sure it is a 1
LABELS = np.array([0, 0, 0, 1, 1, 1])
PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])


def test_thresholds_are_the_mean_probability_of_each_class_on_its_own_images():
    t = per_class_thresholds(LABELS, PROBS)
    assert np.allclose(t, [(0.9 + 0.8 + 0.1) / 3, (0.8 + 0.7 + 0.9) / 3])


def test_confident_joint_counts_confident_claims_by_given_label():
    t = per_class_thresholds(LABELS, PROBS)  # 0.6, 0.8
    joint = confident_joint(LABELS, PROBS, t)
    # image 2 (label 0) claims class 1 (0.9 >= 0.8); image 4 (0.7 < 0.8) claims nothing
    assert joint.tolist() == [[2, 1], [0, 2]]
    q = calibrated_joint(joint, LABELS)
    assert np.isclose(q.sum(), 1) and np.isclose(q[0, 1], 1 / 6)


def test_the_planted_error_is_found_with_its_true_label():
    issues = find_label_issues(LABELS, PROBS)
    assert issues.indices.tolist() == [2]
    assert issues.suggested.tolist() == [1] and issues.given.tolist() == [0]
    assert issues.estimated_errors == 1
    assert rank_by_self_confidence(LABELS, PROBS)[0] == 2


def test_planted_errors_among_good_predictions_are_ranked_first():
    rng = np.random.default_rng(0)
    n, k = 3000, 10
    truth = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), truth] += 5  # a model right about 97% of the time
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = truth.copy()
    flipped = rng.choice(n, 150, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, k, 150)) % k
    issues = find_label_issues(labels, probs)
    found = set(issues.indices.tolist()) & set(flipped.tolist())
    assert len(found) / len(flipped) > 0.85  # recall
    assert len(found) / len(issues) > 0.8  # precision
    assert abs(issues.estimated_errors - 150) < 40
    right = issues.suggested[np.isin(issues.indices, flipped)]
    assert (right == truth[issues.indices[np.isin(issues.indices, flipped)]]).mean() > 0.85


def test_both_methods_list_the_same_number_of_images():
    a = find_label_issues(LABELS, PROBS, "self_confidence")
    b = find_label_issues(LABELS, PROBS, "prune_by_noise_rate")
    assert len(a) == len(b) == 1 and a.suggested.tolist() == b.suggested.tolist() == [1]
