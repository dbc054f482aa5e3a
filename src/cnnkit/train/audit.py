"""The label-error audit: which images of a data set are likely labelled wrong.

Every image needs a predicted probability from a model that never saw its label, so the
audit cross-validates: the labelled images are cut into k stratified folds, a model is
trained on k-1 of them and predicts the one left out, k times. Two kinds of model:
- photos (or ``--pretrained``): a pretrained backbone's features are computed once, and
  each fold fits a linear classifier on them (multinomial logistic regression, L-BFGS):
  seconds on a CPU, and the features carry ImageNet's knowledge rather than the labels';
- small images from scratch (MNIST-like): the model (default seed-cnn) is trained k times
  with cnnkit's training loop, a few epochs each.
Confident learning (evaluate/confident.py) then ranks the likely label errors.

What is audited: a built-in set's whole official training set (images named
``train/<index>``, the index in its files), or a folder's / CSV list's training and
validation images (named by their path under the folder); never the test split, which
stays unseen. ``limit`` audits a stratified subset.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.config import Config, apply_overrides
from cnnkit.data import DataSplits, ImageTensors, is_builtin
from cnnkit.data.builtin import load_builtin
from cnnkit.data.memory import Normalizer, channel_stats, stratified_subset
from cnnkit.data.resolve import load_data, weights_preprocessing
from cnnkit.device import ExecutionContext, World, resolve_device
from cnnkit.evaluate.confident import LabelIssues, find_label_issues
from cnnkit.models import create_model
from cnnkit.progress import progress
from cnnkit.runs.inference import batched_logits

from .loop import fit
from .stages import Stage, backbone_features

DEFAULT_PHOTO_MODEL = "efficientnet_lite0"  # ImageNet weights offline (the lite0 extra)
SCRATCH_EPOCHS = 3


@dataclass
class AuditData:
    """The images under audit: uint8 images, given labels, a name for each, the classes,
    and how to normalise them."""

    name: str
    images: ImageTensors
    names: list[str]
    classes: list[str]
    splits: DataSplits  # the loaded data (its mean, std, input size)
    root: str | None = None  # a folder's root: names are relative to it


@dataclass
class AuditResult:
    data: str
    classes: list[str]
    method: str  # what made the out-of-sample probabilities
    folds: int
    names: list[str]
    labels: np.ndarray
    probs: np.ndarray  # out-of-sample, (N, K)
    issues: LabelIssues
    seconds: float
    root: str | None = None
    images: torch.Tensor | None = None  # uint8 (N, C, H, W), for the page

    @property
    def cv_accuracy(self) -> float:
        """Agreement of the out-of-sample predictions with the given labels."""
        return float((self.probs.argmax(1) == self.labels).mean())

    def rows(self, limit: int | None = None) -> list[dict]:
        """The flagged images, most suspicious first."""
        issues, out = self.issues, []
        for rank, i in enumerate(issues.indices[:limit]):
            out.append(
                {
                    "rank": rank + 1,
                    "index": int(i),
                    "name": self.names[i],
                    "given": self.classes[issues.given[rank]],
                    "suggested": self.classes[issues.suggested[rank]],
                    "given_probability": round(float(issues.self_confidence[rank]), 4),
                    "suggested_probability": round(float(issues.suggested_confidence[rank]), 4),
                }
            )
        return out

    def to_dict(self, limit: int | None = None) -> dict:
        return {
            "data": self.data,
            "root": self.root,
            "images": len(self.labels),
            "classes": self.classes,
            "method": self.method,
            "folds": self.folds,
            "cross_validated_accuracy": round(self.cv_accuracy, 4),
            "flagged": len(self.issues),
            "estimated_label_errors": self.issues.estimated_errors,
            "per_class_thresholds": [round(float(t), 4) for t in self.issues.thresholds],
            "confident_joint": self.issues.confident_joint.tolist(),
            "seconds": round(self.seconds, 1),
            "issues": self.rows(limit),
        }


def load_audit_data(cfg: Config, limit: int | None = None) -> AuditData:
    """The labelled images to audit (see the module's docstring)."""
    name = cfg.data.name
    if is_builtin(name):
        raw = load_builtin(name, cfg.data.data_dir)
        labels = torch.from_numpy(raw.train_labels.copy())
        index = torch.arange(len(labels))
        if limit is not None and limit < len(labels):
            index = stratified_subset(labels, limit, cfg.train.seed)
        images = ImageTensors(torch.from_numpy(raw.train_images[index.numpy()]), labels[index])
        mean, std = channel_stats(images.images)
        splits = DataSplits(name, raw.classes, images, None, None, mean, std)
        names = [f"train/{i}" for i in index.tolist()]
        return AuditData(name, images, names, list(raw.classes), splits)
    cfg = apply_overrides(cfg, {"data.limit": None})
    splits = load_data(cfg, weights_preprocessing(cfg))
    if splits.streamed is not None or splits.files is None:
        raise ValueError(
            f"{name}: the audit reads a folder or CSV list of images into memory; a shard "
            "set cannot be audited (audit the folder it was packed from)"
        )
    if splits.multilabel:
        raise ValueError(
            f"{name}: the audit finds images whose one class is wrong; a multi-label list "
            "is not supported yet"
        )
    parts = [splits.train] + ([splits.val] if splits.val is not None else [])
    # split files are [path under the root, label] pairs
    pairs = list(splits.files["train"]) + (list(splits.files["val"]) if splits.val else [])
    names = [path for path, _ in pairs]
    images = ImageTensors(
        torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
    )
    if limit is not None and limit < len(images):
        index = stratified_subset(images.labels, limit, cfg.train.seed)
        images, names = images.subset(index), [names[i] for i in index.tolist()]
    return AuditData(splits.name, images, names, list(splits.classes), splits, splits.root)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """A fold number for each image: each class dealt round-robin over the folds in a
    seeded order, so every fold holds every class's share to within one image."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def audit(
    config: Config | None = None,
    *,
    folds: int = 5,
    epochs: int | None = None,
    limit: int | None = None,
    labels: torch.Tensor | None = None,
    method: str = "self_confidence",
    quiet: bool = False,
    **settings,
) -> AuditResult:
    """Audit the labels of ``data`` (a setting, like every other of ``cnnkit.train``).

    ``labels``: audit these labels instead of the data set's own (the benchmark and the
    tests plant errors this way). ``epochs``: per fold (default: 3 from scratch, 30 for
    the linear classifier on features)."""
    cfg = apply_overrides(config or Config(), settings)
    if folds < 2:
        raise ValueError(f"--folds {folds}: cross-validation needs at least 2 folds")
    t0 = time.perf_counter()
    cfg = _audit_config(cfg)
    data = load_audit_data(cfg, limit)
    if labels is not None:
        if len(labels) != len(data.images):
            raise ValueError(f"{len(labels)} labels for {len(data.images)} images")
        data.images = ImageTensors(data.images.images, torch.as_tensor(labels))
    counts = torch.bincount(data.images.labels, minlength=len(data.classes))
    if int(counts[counts > 0].min()) < folds:
        raise ValueError(
            f"a class has fewer images ({int(counts[counts > 0].min())}) than --folds {folds}: "
            "use fewer folds"
        )
    device = resolve_device(cfg.train.device)
    fold_of = stratified_folds(data.images.labels, folds, cfg.train.seed)
    if cfg.model.pretrained:
        probs, how = _features_probs(cfg, data, fold_of, folds, device, epochs, quiet)
    else:
        probs, how = _scratch_probs(cfg, data, fold_of, folds, device, epochs, quiet)
    given = data.images.labels.numpy()
    return AuditResult(
        data=data.name,
        classes=data.classes,
        method=how,
        folds=folds,
        names=data.names,
        labels=given,
        probs=probs,
        issues=find_label_issues(given, probs, method),
        seconds=time.perf_counter() - t0,
        root=data.root,
        images=data.images.images,
    )


def _audit_config(cfg: Config) -> Config:
    """Photos default to the pretrained photo model; small images to seed-cnn."""
    if cfg.model.pretrained or is_builtin(cfg.data.name):
        return cfg
    if cfg.model.name == Config().model.name:  # not chosen: a folder of photos
        return apply_overrides(cfg, {"model.name": DEFAULT_PHOTO_MODEL, "model.pretrained": True})
    return cfg


def _context(cfg: Config, device, model: nn.Module, image_size) -> ExecutionContext:
    t = cfg.train
    return ExecutionContext.resolve(
        device=device,
        precision=t.precision,
        compile=False,
        eval_batch_size=t.eval_batch_size,
        model=model,
        image_size=image_size,
        world=World(),
    )


def _features_probs(cfg, data: AuditData, fold_of, folds, device, epochs, quiet):
    """Backbone features once, then a logistic regression per fold."""
    c, h, w = data.splits.shape
    torch.manual_seed(cfg.train.seed)
    model = create_model(
        cfg.model.name,
        len(data.classes),
        c,
        (h, w),
        pretrained=True,
        weights=cfg.model.weights,
    )
    ctx = _context(cfg, device, model, (h, w))
    whole = dataclasses.replace(data.splits, train=data.images, val=None, test=None)
    features = backbone_features(model, whole, ctx).train.images.float().cpu()
    labels = data.images.labels
    probs = np.zeros((len(labels), len(data.classes)))
    steps = epochs or 100
    with progress("audit: cross-validation", len(labels), quiet=quiet) as advance:
        for f in range(folds):
            held = fold_of == f
            head = _logistic_regression(features[~held], labels[~held], len(data.classes), steps)
            with torch.no_grad():
                probs[held.numpy()] = torch.softmax(head(features[held]), 1).numpy()
            advance(int(held.sum()))
    return probs, f"{cfg.model.name} (ImageNet) features + logistic regression, {folds} folds"


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int) -> nn.Module:
    """Multinomial logistic regression on standardised features, L2-regularised, fitted
    with L-BFGS (the classic choice for a convex problem of this size)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    linear = nn.Linear(x.shape[1], classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe"
    )
    z = (x - mean) / std
    decay = 1e-3  # L2 strength: features of a few thousand photos are easy to overfit

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(z), y) + decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return nn.Sequential(_Standardise(mean, std), linear)


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _scratch_probs(cfg, data: AuditData, fold_of, folds, device, epochs, quiet):
    """The model trained from scratch on k-1 folds, k times, with cnnkit's loop."""
    epochs = epochs or SCRATCH_EPOCHS
    cfg = apply_overrides(cfg, {"train.epochs": epochs})
    c, h, w = data.splits.shape
    labels = data.images.labels
    probs = np.zeros((len(labels), len(data.classes)))
    normalizer = Normalizer(data.splits.mean, data.splits.std, device)
    with (
        tempfile.TemporaryDirectory(prefix="cnnkit-audit-") as scratch,
        progress("audit: cross-validation", len(labels), quiet=quiet) as advance,
    ):
        for f in range(folds):
            held = fold_of == f
            torch.manual_seed(cfg.train.seed + f)
            model = create_model(cfg.model.name, len(data.classes), c, (h, w))
            ctx = _context(cfg, device, model, (h, w))
            part = dataclasses.replace(data.splits, train=data.images.subset(~held), val=None)
            stage = Stage("train", epochs, "none", cfg.optim.lr)
            fit(model, part, cfg, ctx=ctx, run_dir=Path(scratch), description={}, stage=stage)
            logits = batched_logits(model, data.images.images[held].to(device), normalizer, ctx)
            probs[held.numpy()] = torch.softmax(logits.float(), 1).cpu().numpy()
            advance(int(held.sum()))
    return probs, f"{cfg.model.name} trained from scratch, {epochs} epochs, {folds} folds"


AUDIT_COLUMNS = ["file", "label", "given", "given_probability", "suggested_probability"]


def write_audit(result: AuditResult, folder: str | Path, gallery: int = 60) -> dict[str, Path]:
    """audit.csv (editable, for train --relabel / --exclude), audit.json and audit.html."""
    import csv
    import json

    from cnnkit.evaluate.audit_page import image_uri, render_audit_html

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    paths = {"csv": folder / "audit.csv", "json": folder / "audit.json"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(AUDIT_COLUMNS)
        for r in rows:  # 'label' starts as the suggestion: the value --relabel trains with
            writer.writerow(
                [r["name"], r["suggested"], r["given"], r["given_probability"]]
                + [r["suggested_probability"]]
            )
    summary = result.to_dict()
    paths["json"].write_text(json.dumps(summary, indent=2))
    cards = [(r, image_uri(result.images[r["index"]])) for r in rows[:gallery]]
    paths["html"] = folder / "audit.html"
    paths["html"].write_text(render_audit_html(summary, cards))
    return paths
