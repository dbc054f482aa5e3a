"""Prediction from any source of probabilities: a run's PyTorch model or an ONNX file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnkit.data.decode import ImageReadError, to_input_tensor


@dataclass
class Prediction:
    """Top-k classes of one input, or the reason it could not be read."""

    source: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict:
        d = {"source": self.source}
        if self.error:
            d["error"] = self.error
        else:
            d["label"] = self.label
            d["top"] = [{"class": c, "probability": p} for c, p in self.top]
        return d


def predict_images(
    images,
    preprocessing: dict,
    classes: list[str],
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    top_k: int = 5,
) -> list[Prediction]:
    """Read and convert each input as ``preprocessing`` says, then one batched call of
    ``probabilities`` (uint8 (N, C, H, W) -> (N, classes)). An input that cannot be read
    gets a Prediction with ``error`` set; the others are still predicted."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    results: list[Prediction] = []
    batch, positions = [], []
    for i, image in enumerate(images):
        source = str(image) if isinstance(image, (str, Path)) else f"<input {i}>"
        try:
            batch.append(to_input_tensor(image, preprocessing))
            positions.append(i)
            results.append(Prediction(source, []))
        except ImageReadError as e:
            results.append(Prediction(source, [], error=str(e)))
    if batch:
        probs = torch.as_tensor(probabilities(torch.stack(batch))).float().cpu()
        values, indices = probs.topk(min(top_k, len(classes)), dim=1)
        for row, i in enumerate(positions):
            results[i].top = [
                (classes[j], float(p))
                for p, j in zip(values[row].tolist(), indices[row].tolist(), strict=True)
            ]
    return results
