"""Predicting with an exported ONNX file alone: classes and preprocessing come from its
metadata, the normalisation is inside the graph, ONNX Runtime runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnkit.runs.inference import Prediction, predict_with
from cnnkit.runs.reject import SCORE_OUTPUT

from .export import NotAnOnnxFileError, read_metadata


def _ort_load_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's load failures; its error classes are plain Exception subclasses."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel")
    names += ("NotImplemented", "RuntimeException")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


class OnnxModel:
    """``OnnxModel("model.onnx").predict(["cat.jpg"])``, like ``Run.predict``."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True):
        import onnxruntime as ort

        load_errors = _ort_load_errors()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        meta = read_metadata(self.path)
        if "classes" not in meta or "preprocessing" not in meta:
            raise ValueError(
                f"{self.path}: no cnnkit metadata (classes, preprocessing); "
                "export it with 'cnnkit export'"
            )
        self.classes: list[str] = meta["classes"]
        self.preprocessing: dict = meta["preprocessing"]
        self.provenance: dict = meta.get("provenance", {})
        self.metadata = meta
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:  # idle worker threads sleep instead of busy-waiting (for servers)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except load_errors as e:  # metadata that reads, but no graph ONNX Runtime runs
            raise NotAnOnnxFileError(
                f"{self.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]}); "
                "export it again with 'cnnkit export'"
            ) from None
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        # files exported with the "unknown" rule: (probabilities, ood_score)
        self.has_score = SCORE_OUTPUT in outputs
        self.rejection: dict | None = meta.get("rejection")
        # several labels per image: sigmoid outputs and {"thresholds": one per label}
        self.multilabel: dict | None = meta.get("multilabel")

    def __repr__(self) -> str:
        return f"OnnxModel('{self.path}', {len(self.classes)} classes)"

    def outputs(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(class probabilities, energy score or None) of uint8 images (N, C, H, W) at the
        model's input size."""
        x = images.cpu().numpy()
        if self.preprocessing.get("layout") == "nhwc":
            x = x.transpose(0, 2, 3, 1)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})
        return out[0], out[1] if self.has_score else None

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities of uint8 images (N, C, H, W) at the model's input size."""
        return self.outputs(images)[0]

    def predict(self, images, top_k: int = 5, reject: bool = True) -> list[Prediction]:
        """As ``Run.predict``: with the file's "unknown" rule unless ``reject`` is False."""
        return predict_with(self, images, top_k, reject)
