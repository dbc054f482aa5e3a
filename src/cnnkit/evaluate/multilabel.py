"""Multi-label metrics: several labels per image, each a yes/no with its own probability.

Ranking metrics (no threshold needed):
- average precision (AP) of a label: the mean of the precision at each rank where a
  positive image is found, scores sorted from high to low; tied scores are taken as one
  step, as scikit-learn's ``average_precision_score`` does. A label with no positive image
  has no AP (NaN) and is left out of the mean.
- mAP: macro, the mean AP over labels (``mAP`` in eval-<split>.json, the number the
  multi-label literature reports), and micro, the AP of all (image, label) pairs pooled.

Decision metrics, at per-label thresholds (``probability >= threshold`` means "present"):
per-label precision, recall, F1 and confusion counts; example-based F1 (per image,
2|true and predicted| / (|true| + |predicted|), 1 when both are empty); Hamming loss (the
share of wrong yes/no decisions); subset accuracy (images whose whole label set is right).

``fit_thresholds`` chooses each label's threshold on the validation split, maximising its F1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _sorted_steps(
    scores: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct scores high to low, true positives, predicted positives) when everything
    at or above each distinct score is called positive."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tied group
    tp = np.cumsum(t)[ends]
    return s[ends], tp, ends + 1.0


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one label (NaN without a positive)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets).astype(bool)
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    _, tp, predicted = _sorted_steps(scores, targets)
    recall = tp / positives
    precision = tp / predicted
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def label_average_precisions(
    probs: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, float | None]:
    """Each label's AP (NaN without a positive image) and the macro mAP, their mean over
    the labels that have one (None where none has)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets).astype(bool)
    ap = np.array([average_precision(probs[:, k], targets[:, k]) for k in range(probs.shape[1])])
    with_positives = ~np.isnan(ap)
    return ap, float(ap[with_positives].mean()) if with_positives.any() else None


def fit_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per label, the threshold with the highest F1 on these images: halfway between the
    lowest probability it calls positive and the next lower one (the highest threshold
    among ties). ``default`` for a label with no positive image here."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets).astype(bool)
    out = np.full(probs.shape[1], default, dtype=np.float64)
    for k in range(probs.shape[1]):
        positives = targets[:, k].sum()
        if positives == 0:
            continue
        values, tp, predicted = _sorted_steps(probs[:, k], targets[:, k])
        f1 = 2 * tp / (predicted + positives)
        best = int(np.argmax(f1))  # the first, highest threshold, among equal F1
        below = values[best + 1] if best + 1 < len(values) else 0.0
        out[k] = (values[best] + below) / 2
    return out


def multilabel_report(
    probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, classes: list[str]
) -> dict:
    """Every metric above, for (N, K) probabilities and 0/1 targets."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    predicted = probs >= np.asarray(thresholds)[None, :]
    tp = (predicted & targets).sum(0)
    fp = (predicted & ~targets).sum(0)
    fn = (~predicted & targets).sum(0)
    tn = (~predicted & ~targets).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    ap, macro_ap = label_average_precisions(probs, targets)
    both = (predicted & targets).sum(1)
    sizes = predicted.sum(1) + targets.sum(1)
    example_f1 = np.where(sizes > 0, 2 * both / np.maximum(sizes, 1), 1.0)
    per_label = {
        c: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "ap": None if np.isnan(ap[k]) else float(ap[k]),
            "support": int(targets[:, k].sum()),
            "threshold": float(thresholds[k]),
            "tp": int(tp[k]),
            "fp": int(fp[k]),
            "fn": int(fn[k]),
            "tn": int(tn[k]),
        }
        for k, c in enumerate(classes)
    }
    return {
        "task": "multilabel",
        "num_images": int(len(probs)),
        "mAP": macro_ap,
        "mAP_micro": average_precision(probs.ravel(), targets.ravel()),
        "example_f1": float(example_f1.mean()),
        "hamming_loss": float((predicted != targets).mean()),
        "subset_accuracy": float((predicted == targets).all(1).mean()),
        "macro_f1": float(f1.mean()),
        "per_label": per_label,
    }


@dataclass
class MultilabelReport:
    """A multi-label evaluation: ``multilabel_report``'s figures on one split."""

    split: str
    metrics: dict

    @property
    def num_images(self) -> int:
        return self.metrics["num_images"]

    @property
    def mAP(self) -> float | None:  # noqa: N802 (the field's name)
        return self.metrics["mAP"]

    def to_dict(self) -> dict:
        return {"split": self.split, **self.metrics}
