"""Confident learning: which given labels are likely wrong, from out-of-sample predicted
probabilities (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty
in Dataset Labels", JAIR 70, 2021).

1. Per-class thresholds: t_j is the mean predicted probability of class j over the images
   labelled j (how confident the model is, on average, about that class's own images).
2. The confident joint C[i][j]: images labelled i whose probability of class j reaches
   t_j (the most probable such j where several do). Off the diagonal: images the model
   confidently puts in another class than their label.
3. Calibration: each row of C scaled to the number of images labelled i, then the whole
   to a joint distribution Q of (given label, true label).
4. Prune by noise rate: for each pair i != j, the n * Q[i][j] images labelled i with the
   largest margin p_j - p_i are the label errors of that pair; their suggested label is j.

Which images, and in what order: the number of label errors is the number step 4 flags;
by default (``method="self_confidence"``) the list is that many images with the lowest
self-confidence, the probability of their given label, lowest first, each with its most
probable other class as the suggestion (cleanlab's ``filter_by="low_self_confidence"``).
``method="prune_by_noise_rate"`` lists step 4's own images instead, in the same order.
On MNIST and cats-vs-dogs with 5% of the labels flipped the first found more of the
flipped images at the same length (benchmarks/audit.py).

Why a module of its own and not cleanlab (the paper's authors' library, Apache-2.0):
cleanlab 2.9 brings scikit-learn, pandas, tqdm and termcolor with it, for what is the few
array operations below. benchmarks/audit.py scores both on the same probabilities when
cleanlab is installed beside cnnkit (benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LabelIssues:
    """The images confident learning flags, most suspicious first."""

    indices: np.ndarray  # into the audited images, ranked
    given: np.ndarray  # their given labels
    suggested: np.ndarray  # the label confident learning says they have
    self_confidence: np.ndarray  # probability of the given label (low: suspicious)
    suggested_confidence: np.ndarray  # probability of the suggested label
    thresholds: np.ndarray  # t_j per class
    confident_joint: np.ndarray  # C, counts (K x K)
    estimated_errors: int  # how many label errors the calibrated joint estimates

    def __len__(self) -> int:
        return len(self.indices)


def per_class_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of class j over the images labelled j."""
    k = probs.shape[1]
    thresholds = np.ones(k)  # a class with no images confidently claims nothing
    for j in range(k):
        mine = labels == j
        if mine.any():
            thresholds[j] = probs[mine, j].mean()
    return thresholds


def confident_joint(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """C[i][j]: images labelled i confidently in class j (the most probable of the classes
    whose threshold they reach; images that reach none are not counted)."""
    k = probs.shape[1]
    above = probs >= thresholds[None, :] - 1e-12
    masked = np.where(above, probs, -np.inf)
    counted = above.any(axis=1)
    claimed = masked.argmax(axis=1)
    joint = np.zeros((k, k), dtype=np.int64)
    np.add.at(joint, (labels[counted], claimed[counted]), 1)
    return joint


def calibrated_joint(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Q: C with each row scaled to its label's count, then normalised to sum 1."""
    k = joint.shape[0]
    counts = np.bincount(labels, minlength=k).astype(float)
    rows = joint.sum(axis=1, keepdims=True).astype(float)
    scaled = np.where(rows > 0, joint / np.maximum(rows, 1) * counts[:, None], 0.0)
    total = scaled.sum()
    return scaled / total if total else scaled


METHODS = ("self_confidence", "prune_by_noise_rate")


def find_label_issues(labels, probs, method: str = "self_confidence") -> LabelIssues:
    """Confident learning on ``labels`` (N,) and out-of-sample ``probs`` (N, K)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities {probs.shape} do not match {len(labels)} labels")
    n, k = probs.shape
    thresholds = per_class_thresholds(labels, probs)
    joint = confident_joint(labels, probs, thresholds)
    q = calibrated_joint(joint, labels)
    flagged = np.zeros(n, dtype=bool)
    suggested = probs.argmax(axis=1)
    rows = np.arange(n)
    for i in range(k):
        mine = np.flatnonzero(labels == i)
        for j in range(k):
            take = int(round(n * q[i, j]))
            if i == j or take == 0 or not len(mine):
                continue
            margin = probs[mine, j] - probs[mine, i]
            worst = mine[np.argsort(-margin, kind="stable")[:take]]
            worst = worst[probs[worst, j] > probs[worst, i]]  # only where j beats the label
            flagged[worst] = True
            suggested[worst] = j
    picked = np.flatnonzero(flagged)
    self_conf = probs[rows, labels]
    if method == "prune_by_noise_rate":
        order = picked[np.argsort(self_conf[picked], kind="stable")]
    else:  # as many as pruning flags, lowest self-confidence first
        order = np.argsort(self_conf, kind="stable")[: len(picked)]
        others = probs[order].copy()
        others[np.arange(len(order)), labels[order]] = -1.0  # the best class but the given
        suggested[order] = others.argmax(axis=1)
    return LabelIssues(
        indices=order,
        given=labels[order],
        suggested=suggested[order],
        self_confidence=self_conf[order],
        suggested_confidence=probs[order, suggested[order]],
        thresholds=thresholds,
        confident_joint=joint,
        estimated_errors=int(round(n * (q.sum() - np.trace(q)))),
    )


def rank_by_self_confidence(labels, probs) -> np.ndarray:
    """Every image, most suspicious first: the probability of its given label, lowest
    first (the ranking to cut at any length, e.g. the expected number of errors)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return np.argsort(probs[np.arange(len(labels)), labels], kind="stable")
