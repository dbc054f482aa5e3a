"""Calibrated probabilities: temperature scaling (Guo, Pleiss, Sun and Weinberger, "On
Calibration of Modern Neural Networks", ICML 2017).

A network's softmax is often over-confident: of the images it calls 99% sure, fewer than
99% are right. One number fixes most of it: the logits divided by a temperature T, fitted
to minimise the negative log-likelihood on the validation split (the split that already
chose best.pt; the test split stays unseen). Dividing by T changes no prediction, only how
sure each one is.

T is folded into the classifier's last linear layer (its weight and bias divided by T), so
the calibrated probabilities are the model's own: evaluation, prediction, the service and
every export (ONNX, phone, Triton, the web app) give them with nothing else to carry. The
checkpoint records T and the expected calibration error (ECE) and NLL before and after.
Calibrating again (after ``--resume``) fits on the folded logits and multiplies the
recorded T: the temperature is never applied twice.

Then, on the same (calibrated) validation logits, the threshold below which an image is
answered "unknown" (``fit_unknown_threshold``; the rule itself is in reject.py).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.evaluate.metrics import calibration
from cnnkit.evaluate.ood import scores

from .checkpoint import load_checkpoint, save_checkpoint
from .reject import fit_rejection


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """T > 0 minimising the mean NLL of softmax(logits / T) (L-BFGS on log T)."""
    logits, labels = logits.detach().double().cpu(), labels.cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) else 1.0


def final_linear(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear] | None:
    """(name, layer) of the classifier: the last nn.Linear with one output per class."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = (name, module)
    return found


def _summary(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(ECE, NLL) of softmax(logits)."""
    probs = logits.softmax(1)
    return calibration(probs, labels)["ece"], float(F.cross_entropy(logits, labels))


def calibrate_run(run_dir: str | Path, quiet: bool = False) -> dict | None:
    """Fit T on the validation split of the run's best.pt and fold it in (best.pt is
    rewritten, atomically). The checkpoint's calibration record, or None when the run has
    no validation split to fit on."""
    validated = _validated(run_dir, quiet, "calibrating")
    if validated is None:
        return None
    run, data, outputs = validated
    logits, labels = outputs.logits.float().cpu(), outputs.labels.cpu()
    layer = final_linear(run.model, len(run.classes))
    if layer is None:
        raise ValueError(
            f"{run.config.model.name}: no final linear layer with one output per class to "
            "fold a temperature into; train with --calibrate none"
        )
    t = fit_temperature(logits, labels)
    ece_before, nll_before = _summary(logits, labels)
    ece_after, nll_after = _summary(logits / t, labels)
    previous = load_checkpoint(run.checkpoint_path).get("calibration") or {}
    if ece_after > ece_before:
        # T minimises the NLL; where the ECE was already small (a few hundred images, a
        # well-calibrated pretrained model) it can still raise the ECE: then keep the
        # weights as they are, and say so.
        record = {
            **previous,
            "method": previous.get("method", "none"),
            "temperature": previous.get("temperature", 1.0),
            "fitted_on": "val",
            "images": len(labels),
            "applied": bool(previous.get("applied")),  # an earlier temperature stays
            "fitted_temperature": t,
            "ece_before": previous.get("ece_before", ece_before),
            "ece_after": ece_before,
            "ece_if_applied": ece_after,
            "nll_before": previous.get("nll_before", nll_before),
            "nll_after": nll_before,
        }
        _save_record(run.checkpoint_path, "calibration", record)
        return record
    name, linear = layer
    sample = data.split("val").images[:64] if data.streamed is None else None
    reference = _fp32_logits(run, sample) if sample is not None else None
    with torch.no_grad():
        linear.weight.div_(t)
        if linear.bias is not None:
            linear.bias.div_(t)
    if reference is not None:
        check = _fp32_logits(run, sample)
        if not torch.allclose(check, reference / t, atol=1e-4, rtol=1e-4):
            raise RuntimeError(
                f"{name} is not the last step of {run.config.model.name}: dividing it by T "
                "did not divide the logits; train with --calibrate none"
            )
    payload = load_checkpoint(run.checkpoint_path)
    state = {k: v.cpu() for k, v in run.model.state_dict().items()}
    payload["state_dict"] = state
    # A second calibration of the same weights: T multiplies, "before" stays the raw model's
    record = {
        "method": "temperature",
        "temperature": previous.get("temperature", 1.0) * t,
        "fitted_on": "val",
        "images": len(labels),
        "applied": True,
        "ece_before": previous.get("ece_before", ece_before),
        "ece_after": ece_after,
        "nll_before": previous.get("nll_before", nll_before),
        "nll_after": nll_after,
    }
    payload["calibration"] = record
    save_checkpoint(run.checkpoint_path, payload)
    return record


@torch.no_grad()
def _fp32_logits(run, images: torch.Tensor) -> torch.Tensor:
    """The model's logits in float32 (no autocast: the fold check compares values to a
    precision that bf16 rounding would hide)."""
    run.model.eval()
    return run.model(run.normalizer(images.to(run.device))).float()


def _validated(run_dir: str | Path, quiet: bool, label: str):
    """(the run with best.pt on the CPU, its data, the outputs of its validation split,
    with progress under ``label``), or None when no epoch was validated or there is no
    validation split to fit on."""
    from cnnkit.progress import silenced

    from .run import load_run

    run = load_run(run_dir, weights="best", device="cpu")
    if run.checkpoint_path.name != "best.pt":
        return None  # no epoch was validated
    data = run.data()
    if not data.count("val"):
        return None
    with silenced() if quiet else contextlib.nullcontext():
        outputs = run.split_outputs(data, "val", progress_label=label)
    return run, data, outputs


def _save_record(path: Path, key: str, record: dict) -> None:
    """``record`` stored in the checkpoint at ``path`` under ``key`` (atomically)."""
    payload = load_checkpoint(path)
    payload[key] = record
    save_checkpoint(path, payload)


def fit_unknown_threshold(run_dir: str | Path, quiet: bool = False) -> dict | None:
    """Fit the "unknown" threshold (runs/reject.py) on the validation split of the run's
    best.pt, after its calibration, and store it there (atomically). The record, or None
    without a validation split."""
    validated = _validated(run_dir, quiet, "fitting the unknown threshold")
    if validated is None:
        return None
    run, _, outputs = validated
    record = fit_rejection(outputs.logits.float().cpu(), run.config.train.accept)
    val = scores(outputs.logits)[record["score"]]
    record["val_rejected"] = float((val < record["threshold"]).double().mean())
    _save_record(run.checkpoint_path, "rejection", record)
    return record


def fit_label_thresholds(run_dir: str | Path, quiet: bool = False) -> dict:
    """Multi-label: each label's probability threshold (evaluate/multilabel.py
    ``fit_thresholds``: the best F1 on the validation split), or the run's --threshold
    for all; stored in best.pt (or last.pt without validation) as ``multilabel``."""
    import numpy as np

    from cnnkit.evaluate.multilabel import fit_thresholds, multilabel_report
    from cnnkit.progress import silenced

    from .run import load_run

    run = load_run(run_dir, weights="best", device="cpu")
    fixed = run.config.train.threshold
    data = run.data()
    record = {"thresholds": [fixed or 0.5] * len(run.classes), "fitted_on": None}
    if fixed is None and data.count("val"):
        with silenced() if quiet else contextlib.nullcontext():
            outputs = run.split_outputs(data, "val", progress_label="fitting label thresholds")
        probs = outputs.logits.float().sigmoid().cpu().numpy()
        targets = outputs.labels.cpu().numpy()
        thresholds = fit_thresholds(probs, targets)
        half = np.full(len(run.classes), 0.5)
        record = {
            "thresholds": thresholds.tolist(),
            "fitted_on": "val",
            "images": len(targets),
            "val_macro_f1": multilabel_report(probs, targets, thresholds, run.classes)["macro_f1"],
            "val_macro_f1_at_half": multilabel_report(probs, targets, half, run.classes)[
                "macro_f1"
            ],
        }
    _save_record(run.checkpoint_path, "multilabel", record)
    return record
