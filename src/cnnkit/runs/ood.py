"""``cnnkit evaluate RUN --ood DATA``: how well the run's outputs tell its own test images
from images of another data set (evaluate/ood.py has the scores and the measures).

The other set's images are made into what the model takes: a folder is decoded at the
run's size and channels, as its own data is; a built-in set (28x28 digits, say, against a
photo model) is converted, grey to RGB by repeating the channel or RGB to grey by Pillow's
luma weights, and resized (bilinear, antialiased) to the run's stored image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit.config import apply_overrides
from cnnkit.data import is_builtin
from cnnkit.data.resolve import load_data
from cnnkit.evaluate.ood import ood_report, scores

LUMA = (0.299, 0.587, 0.114)  # Pillow's "L" conversion


def _stored_size(preprocessing: dict) -> tuple[int, int]:
    h, w = preprocessing["size"]
    crop = (
        preprocessing.get("crop_pct", 1.0) if preprocessing.get("resize") == "shorter-side" else 1.0
    )
    return round(h / crop), round(w / crop)


def as_run_input(images: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """uint8 (N, C, H, W) images in the run's channels and stored size."""
    channels = preprocessing.get("channels", images.shape[1])
    x = images
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        weights = torch.tensor(LUMA).view(1, 3, 1, 1)
        x = (x.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    size = _stored_size(preprocessing)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def outside_images(run, data: str, limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """The images of ``data`` as the run's model takes them: a built-in set's official test
    set, a folder's every split; ``limit``: a seeded random subset."""
    cfg = apply_overrides(
        run.config,
        {"data.name": data, "data.limit": None, "data.relabel": None, "data.exclude": None},
    )
    splits = load_data(cfg, None, preprocessing=run.preprocessing)
    if is_builtin(data):
        images = splits.test.images
    else:
        parts = [p for p in (splits.train, splits.val, splits.test) if p is not None]
        images = torch.cat([p.images for p in parts])
    if limit is not None and limit < len(images):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images = images[pick[:limit].sort().values]
    return as_run_input(images, run.preprocessing)


def evaluate_ood(run, data: str, split: str | None = None, limit: int | None = None) -> dict:
    """AUROC, FPR at 95% TPR and the rejection rates of each score, the run's test (or
    validation) split against ``data``; with the run's stored "unknown" rule, the share of
    each set it answers "unknown" (``stored_rule``)."""
    run.require_single_label("--ood")
    own = run.data()
    choice = run.choose_split(split, own)
    inside = run.split_outputs(own, choice.split, progress_label=f"evaluating: {choice.split}")
    outside = outside_images(run, data, limit)
    logits = run.logits(outside, progress_label=f"evaluating: {data}")
    result = {
        "run": str(run.path),
        "in_distribution": {"data": own.name, "split": choice.split, "images": len(inside.labels)},
        "out_of_distribution": {"data": data, "images": len(outside)},
        "scores": ood_report(inside.logits, logits),
    }
    if run.rejection:  # the threshold stored in the run, fitted on its validation split
        rule = run.rejection
        a, b = scores(inside.logits)[rule["score"]], scores(logits)[rule["score"]]
        result["stored_rule"] = {
            "score": rule["score"],
            "threshold": rule["threshold"],
            "in_rejected": float((a < rule["threshold"]).double().mean()),
            "out_rejected": float((b < rule["threshold"]).double().mean()),
        }
    return result
