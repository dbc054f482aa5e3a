"""Out-of-distribution scores: how well a classifier's outputs tell its own kind of image
from images of none of its classes.

Two scores, both higher for images the model knows (in-distribution):
- max softmax probability (Hendrycks and Gimpel, ICLR 2017), on the (calibrated)
  probabilities the model gives;
- the negative free energy, logsumexp of the logits (Liu, Wang, Owens and Li, NeurIPS
  2020), which keeps what the softmax normalises away: how large the logits are at all.

Measured as the field reports them: AUROC of in- against out-of-distribution images
(1 is perfect separation, 0.5 chance), and the false-positive rate at 95% true-positive
rate (FPR95): with the threshold that keeps 95% of in-distribution images, the share of
out-of-distribution images still accepted.
"""

from __future__ import annotations

import torch

SCORES = ("max_softmax", "energy")


def scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each score of each row of ``logits`` (float64, on the CPU)."""
    logits = logits.detach().double().cpu()
    return {
        "max_softmax": logits.softmax(1).max(1).values,
        "energy": torch.logsumexp(logits, 1),
    }


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(score of a random in-distribution image > that of a random outside one), ties
    counted half: the Mann-Whitney statistic, from the ranks of all the scores."""
    both = torch.cat([inside, outside]).double()
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    if len(values) < len(both):
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    n_in, n_out = len(inside), len(outside)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def threshold_for(inside: torch.Tensor, acceptance: float = 0.95) -> float:
    """The score that ``acceptance`` of the in-distribution images reach (or exceed)."""
    return float(torch.quantile(inside.double(), 1 - acceptance))


def ood_report(
    inside_logits: torch.Tensor, outside_logits: torch.Tensor, acceptance: float = 0.95
) -> dict:
    """Per score: AUROC, the threshold that accepts ``acceptance`` of the in-distribution
    images, the share of out-of-distribution images it still accepts (FPR at that TPR), and
    the share it rejects."""
    a, b = scores(inside_logits), scores(outside_logits)
    out = {}
    for name in SCORES:
        t = threshold_for(a[name], acceptance)
        accepted = float((b[name] >= t).double().mean())
        out[name] = {
            "auroc": auroc(a[name], b[name]),
            "threshold": t,
            "in_accepted": float((a[name] >= t).double().mean()),
            f"fpr_at_{round(acceptance * 100)}_tpr": accepted,
            "out_rejected": 1 - accepted,
        }
    return out
