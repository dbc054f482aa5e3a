"""Classification metrics, all derived from one confusion matrix (plus top-k from logits).

Conventions (as scikit-learn's with zero_division=0): a class never predicted has
precision 0, a class absent from the labels has recall 0; macro averages weigh classes
equally, weighted averages by their support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class ConfusionMatrix:
    """Counts[true, predicted], accumulated on the device with one bincount per update."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @classmethod
    def from_counts(cls, counts) -> ConfusionMatrix:
        """A matrix from existing counts[true][predicted] (e.g. a report's)."""
        counts = torch.as_tensor(counts, dtype=torch.int64)
        cm = cls(len(counts), counts.device)
        cm.counts = counts.clone()
        return cm

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> ConfusionMatrix:
        k = self.num_classes
        flat = target.to(self.counts.device) * k + predicted.to(self.counts.device)
        self.counts += torch.bincount(flat, minlength=k * k).view(k, k)
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def accuracy(self) -> float:
        return float(self.counts.diag().sum()) / max(self.total, 1)

    def never_predicted(self) -> list[int]:
        """Classes that occur in the labels but were never predicted (precision 0 by
        convention, not NaN)."""
        c = self.counts
        return [i for i in range(self.num_classes) if c[:, i].sum() == 0 and c[i].sum() > 0]

    def most_confused(self, k: int = 5) -> list[tuple[int, int, int]]:
        """The k largest off-diagonal counts: (true class, predicted class, count)."""
        off = self.counts.clone()
        off.fill_diagonal_(0)
        values, flat = off.flatten().topk(min(k, off.numel()))
        n = self.num_classes
        return [
            (int(i) // n, int(i) % n, int(v)) for v, i in zip(values, flat, strict=True) if v > 0
        ]

    def per_class(self) -> dict[str, list[float]]:
        c = self.counts.double()
        tp = c.diag()
        predicted, support = c.sum(0), c.sum(1)
        precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(
            denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp)
        )
        return {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": [int(s) for s in support.tolist()],
        }


def ranked_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring class indices of each row, best first.

    Ties go to the lower class index, as with ``argmax``. ``topk`` makes no promise about
    ties, so with bf16 logits (which tie often) its top-1 and ``argmax`` disagreed; a
    stable descending sort gives one deterministic ranking that accuracy, top-k and the
    confusion matrix all read.
    """
    k = min(k, logits.shape[1])
    return logits.sort(dim=1, descending=True, stable=True).indices[:, :k]


def _topk_hits(ranking: torch.Tensor, target: torch.Tensor, k: int) -> float:
    hits = (ranking[:, :k] == target[:, None]).any(1)
    # An exact count / total (not a float32 mean), as ConfusionMatrix.accuracy computes it.
    return int(hits.sum()) / max(len(target), 1)


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    return _topk_hits(ranked_classes(logits, k), target, k)


def calibration(probs: torch.Tensor, target: torch.Tensor, bins: int = 15) -> dict:
    """Expected calibration error and the reliability diagram's bins.

    Predictions are grouped by confidence (the top probability) into equal-width bins;
    ECE is the support-weighted mean of |accuracy - confidence| over the bins.
    """
    confidence, predicted = probs.max(1)
    correct = (predicted == target).double()
    confidence = confidence.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1])  # bin i: (edge_i, edge_i+1]
    rows, ece = [], 0.0
    n = len(target)
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        if count:
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += count / n * abs(acc - conf)
        else:
            acc = conf = None
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return {"ece": ece, "bins": rows}


@dataclass
class ClassificationReport:
    split: str
    classes: list[str]
    num_images: int
    loss: float
    accuracy: float
    top_k: dict[int, float]
    per_class: dict[str, list[float]]
    macro: dict[str, float]
    weighted: dict[str, float]
    confusion_matrix: list[list[int]]
    warnings: list[str]

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "num_images": self.num_images,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "top_k_accuracy": {str(k): v for k, v in self.top_k.items()},
            "per_class": {
                name: {m: self.per_class[m][i] for m in ("precision", "recall", "f1", "support")}
                for i, name in enumerate(self.classes)
            },
            "macro_avg": self.macro,
            "weighted_avg": self.weighted,
            "classes": self.classes,
            "confusion_matrix": self.confusion_matrix,
            "warnings": self.warnings,
        }


def classification_report(
    logits: torch.Tensor, target: torch.Tensor, classes: list[str], split: str
) -> ClassificationReport:
    """Every metric of a split from its logits and labels."""
    ks = [k for k in (1, 3, 5) if k < len(classes) or k == 1]
    # One ranking for everything, so accuracy and top-1 agree even when logits tie.
    ranking = ranked_classes(logits, max(ks))
    cm = ConfusionMatrix(len(classes), logits.device).update(ranking[:, 0], target)
    pc = cm.per_class()
    support = torch.tensor(pc["support"], dtype=torch.float64)

    def averages(weights: torch.Tensor) -> dict[str, float]:
        w = weights / weights.sum().clamp_min(1e-12)
        return {
            m: float((torch.tensor(pc[m], dtype=torch.float64) * w).sum())
            for m in ("precision", "recall", "f1")
        }

    warnings = [
        f"class '{classes[i]}' was never predicted: its precision is reported as 0"
        for i in cm.never_predicted()
    ]
    return ClassificationReport(
        split=split,
        classes=list(classes),
        num_images=len(target),
        loss=float(F.cross_entropy(logits, target)),
        accuracy=cm.accuracy(),
        top_k={k: _topk_hits(ranking, target, k) for k in ks},
        per_class=pc,
        macro=averages(torch.ones_like(support)),
        weighted=averages(support),
        confusion_matrix=cm.counts.cpu().tolist(),
        warnings=warnings,
    )
