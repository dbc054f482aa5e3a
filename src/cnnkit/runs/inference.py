"""Inference over uint8 images: the batched forward pass (validation, evaluation,
prediction, backbone features), top-k, and prediction from any source of probabilities
(a run's PyTorch model or an ONNX file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.data.decode import ImageReadError, to_input_tensor
from cnnkit.data.folder import display_name
from cnnkit.data.memory import Normalizer
from cnnkit.data.multilabel import SEPARATOR as MULTILABEL_SEPARATOR
from cnnkit.device import ExecutionContext
from cnnkit.evaluate.metrics import ranked_classes

from .reject import UNKNOWN, Rejection


@torch.no_grad()  # not inference_mode: backbone features from here are trained on later
def batched_forward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    normalizer: Normalizer,
    ctx: ExecutionContext,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Float32 outputs of ``forward`` over uint8 images (N, C, H, W), ``ctx.eval_batch`` at a
    time: each batch moved to the device, normalised, laid out channels_last where the
    context says so, run under its autocast. On the device, in the images' order.
    ``on_batch(n)``: told after each batch (progress)."""
    outputs = []
    for batch in images.split(ctx.eval_batch):
        x = normalizer(batch.to(ctx.device, non_blocking=True))
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx.autocast():
            outputs.append(forward(x).float())
        if on_batch is not None:
            on_batch(len(batch))
    return torch.cat(outputs) if outputs else torch.empty(0, device=ctx.device)


def batched_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    ctx: ExecutionContext,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Float32 logits of ``model`` in eval mode (its train/eval mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        return batched_forward(model, images, normalizer, ctx, on_batch)
    finally:
        model.train(was_training)


def top_k(
    probabilities: torch.Tensor | np.ndarray, classes: list[str], k: int
) -> list[list[tuple[str, float]]]:
    """For each row of (N, classes) probabilities, the ``k`` most likely (class, probability),
    most likely first (k is capped at the number of classes)."""
    probs = torch.as_tensor(probabilities).float().cpu()
    indices = ranked_classes(probs, min(k, len(classes)))  # ties broken as evaluation does
    values = probs.gather(1, indices)
    return [
        [(classes[j], float(p)) for p, j in zip(v.tolist(), i.tolist(), strict=True)]
        for v, i in zip(values, indices, strict=True)
    ]


@dataclass
class Prediction:
    """Top-k classes of one input, or the reason it could not be read.

    With an "unknown" rule (runs/reject.py): ``ood_score`` and whether it fell below the
    rule's threshold (``unknown``: then ``label`` is "unknown"; ``top`` is still the
    model's ranking)."""

    source: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first
    error: str | None = None
    unknown: bool = False
    ood_score: float | None = None
    rule: dict | None = None  # {"score", "threshold"} when a rule was applied
    # multi-label: every label at or over its threshold, most probable first
    labels: list[tuple[str, float]] | None = None

    @property
    def label(self) -> str | None:
        if self.labels is not None:  # the label set, as a multi-label list writes it
            return MULTILABEL_SEPARATOR.join(name for name, _ in self.labels)
        if self.unknown:
            return UNKNOWN
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict:
        d = {"source": self.source}
        if self.error:
            d["error"] = self.error
            return d
        d["label"] = self.label
        if self.labels is not None:
            d["labels"] = [{"class": c, "probability": p} for c, p in self.labels]
        d["top"] = [{"class": c, "probability": p} for c, p in self.top]
        if self.rule is not None:
            d["unknown"] = self.unknown
            d["ood"] = {**self.rule, "value": self.ood_score}
        return d


def unpack_outputs(out) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, energy or None) from what a model's output function returns: the
    probabilities alone, or (probabilities, energy)."""
    probs, energy = out if isinstance(out, tuple) else (out, None)

    def numpy(x):
        return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    return numpy(probs), None if energy is None else numpy(energy)


def predict_images(
    images,
    preprocessing: dict,
    classes: list[str],
    outputs: Callable[[torch.Tensor], object],
    top: int = 5,
    rejection: Rejection | None = None,
    thresholds=None,
) -> list[Prediction]:
    """Read and convert each input as ``preprocessing`` says, then one batched call of
    ``outputs`` (uint8 (N, C, H, W) -> probabilities (N, classes), or (probabilities,
    energy (N,))). An input that cannot be read gets a Prediction with ``error`` set; the
    others are still predicted. ``rejection``: images scoring below its threshold are
    answered "unknown". ``thresholds`` (multi-label, one per label): every label at or over
    its own is in the answer."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    results: list[Prediction] = []
    batch, positions = [], []
    for i, image in enumerate(images):
        # a path's undecodable bytes shown as escapes, as class names are (printable, JSON)
        source = display_name(str(image)) if isinstance(image, (str, Path)) else f"<input {i}>"
        try:
            batch.append(to_input_tensor(image, preprocessing))
            positions.append(i)
            results.append(Prediction(source, []))
        except ImageReadError as e:
            results.append(Prediction(source, [], error=str(e)))
    if batch:
        probs, energy = unpack_outputs(outputs(torch.stack(batch)))
        values = rejection.values(probs, energy) if rejection else None
        sources = [results[i].source for i in positions]
        answered = answer(probs, classes, top, rejection, values, thresholds, sources)
        for i, prediction in zip(positions, answered, strict=True):
            results[i] = prediction
    return results


def answer(
    probs: np.ndarray,
    classes: list[str],
    top: int,
    rejection: Rejection | None = None,
    values=None,
    thresholds=None,
    sources: list[str] | None = None,
) -> list[Prediction]:
    """The Prediction of each row of (N, classes) probabilities: its ``top`` classes; with
    ``rejection`` and each row's score (``values``), whether it is "unknown"; with
    ``thresholds`` (multi-label, one per label), every label at or over its own. What
    ``predict`` and the service both answer."""
    out = []
    for n, row in enumerate(top_k(probs, classes, top)):
        prediction = Prediction(sources[n] if sources else "", row)
        if thresholds is not None:
            present = np.flatnonzero(probs[n] >= np.asarray(thresholds))
            chosen = sorted(present, key=lambda k: -probs[n][k])
            prediction.labels = [(classes[k], float(probs[n][k])) for k in chosen]
        if rejection is not None:
            prediction.ood_score = float(values[n])
            prediction.unknown = bool(values[n] < rejection.threshold)
            prediction.rule = rejection.to_dict()
        out.append(prediction)
    return out


def predict_with(model, images, top_k: int = 5, reject: bool = True) -> list[Prediction]:
    """``predict`` of a Run or an OnnxModel: ``predict_images`` over its ``outputs``, with
    its "unknown" rule (``rejection``; not with ``reject`` False) and, multi-label, its
    per-label thresholds."""
    rule = Rejection.from_record(model.rejection) if reject else None
    thresholds = model.multilabel["thresholds"] if model.multilabel else None
    return predict_images(
        images,
        model.preprocessing,
        model.classes,
        model.outputs,
        top_k,
        rejection=rule,
        thresholds=thresholds,
    )
