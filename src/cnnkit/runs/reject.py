""" "I don't know": a threshold on an out-of-distribution score, chosen on the validation
split, below which an image is answered "unknown" instead of one of the classes.

After training (and after temperature scaling, whose logits it is fitted on), the scores of
every validation image are computed and the threshold is the one that ``acceptance`` of
them reach (95% by default; ``--accept``): by construction about 5% of images like the
training ones are answered "unknown", and the images of none of the classes are mostly
below it (measured in ``cnnkit evaluate --ood`` and benchmarks/ood.py). The rule is
stored in best.pt as ``rejection`` (by ``fit_unknown_threshold`` in calibrate.py) and
travels with every export:

- ``energy`` (the default, measured the better of the two: benchmarks/ood.py) needs the
  logits; the ONNX export has a second output, ``ood_score``, that carries it, so ONNX
  Runtime, the web app and Triton apply the same rule.
- ``max_softmax`` needs only the probabilities: the rule the phone exports carry (their
  single output is the probabilities), with its own threshold fitted on the same images.

``--reject off`` (predict, serve, export) answers with the most probable class always.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cnnkit.evaluate.ood import SCORES, scores, threshold_for

DEFAULT_SCORE = "energy"  # benchmarks/ood.py: the higher AUROC and lower FPR95 of the two
ACCEPTANCE = 0.95
UNKNOWN = "unknown"
SCORE_OUTPUT = "ood_score"  # the ONNX export's second output: logsumexp of the logits


def fit_rejection(logits: torch.Tensor, acceptance: float = ACCEPTANCE) -> dict:
    """The rule for logits of in-distribution (validation) images: for each score, the
    value ``acceptance`` of them reach."""
    values = scores(logits)
    return {
        "score": DEFAULT_SCORE,
        "threshold": threshold_for(values[DEFAULT_SCORE], acceptance),
        "thresholds": {name: threshold_for(values[name], acceptance) for name in SCORES},
        "acceptance": acceptance,
        "fitted_on": "val",
        "images": len(logits),
    }


@dataclass(frozen=True)
class Rejection:
    """The rule as applied: a score's name and its threshold."""

    score: str
    threshold: float

    @classmethod
    def from_record(cls, record: dict | None, score: str | None = None) -> Rejection | None:
        """The stored rule (``score``: another of its fitted scores); None without one."""
        if not record:
            return None
        score = score or record["score"]
        return cls(score, float(record.get("thresholds", {}).get(score, record["threshold"])))

    def values(self, probabilities: np.ndarray, energy: np.ndarray | None) -> np.ndarray:
        """The score of each row (float64)."""
        if self.score == "max_softmax":
            return np.asarray(probabilities, dtype=np.float64).max(1)
        if energy is None:
            raise ValueError(
                "this model gives no energy score (an ONNX file exported before "
                "'ood_score' or without it): export it again, or use --reject off"
            )
        return np.asarray(energy, dtype=np.float64).reshape(-1)

    def to_dict(self) -> dict:
        return {"score": self.score, "threshold": self.threshold}


def energy(logits: torch.Tensor) -> torch.Tensor:
    """The energy score of each row: logsumexp of the logits (evaluate/ood.py)."""
    return torch.logsumexp(logits.float(), 1)
