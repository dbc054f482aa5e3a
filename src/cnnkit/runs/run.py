"""A finished (or stopped) run: its model, config and history; evaluate and predict."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cnnkit.config import Config
from cnnkit.data import DataSplits
from cnnkit.data.decode import to_input_tensor
from cnnkit.data.memory import Normalizer
from cnnkit.data.resolve import load_trained_data
from cnnkit.device import ExecutionContext
from cnnkit.evaluate.explain import explain_images
from cnnkit.evaluate.metrics import ClassificationReport, classification_report
from cnnkit.evaluate.plots import plot_confusion_matrix, plot_curves
from cnnkit.evaluate.report import write_report

from .checkpoint import Checkpoint, read_checkpoint
from .directory import METRICS_FILE, SPLIT_FILE, read_metrics
from .inference import Prediction, batched_logits, predict_images


class Run:
    """A run directory with a loaded model. Make one with ``load_run(path)``."""

    def __init__(self, path: Path, checkpoint: Checkpoint, device: str | torch.device = "auto"):
        self.path = path
        self.checkpoint_info = checkpoint.provenance
        self.config = Config.from_dict(checkpoint.config)
        self.classes: list[str] = checkpoint.classes
        self.preprocessing: dict = checkpoint.preprocessing
        model = checkpoint.build_model()
        # How inference runs, decided once (serving calls logits for every batch).
        t = self.config.train
        self.context = ExecutionContext.resolve(
            device=device,
            precision=t.precision,
            eval_batch_size=t.eval_batch_size,
            model=model,
            image_size=tuple(self.preprocessing["size"]),
        )
        self.device = self.context.device
        self.model = model.to(self.device)
        if self.context.channels_last:
            self.model.to(memory_format=torch.channels_last)
        crop = (
            tuple(self.preprocessing["size"])
            if self.preprocessing.get("resize") == "shorter-side"
            else None
        )
        self.normalizer = Normalizer(
            self.preprocessing["mean"], self.preprocessing["std"], self.device, crop=crop
        )

    def __repr__(self) -> str:
        return f"Run('{self.path}', model={self.config.model.name}, data={self.config.data.name})"

    @property
    def history(self) -> list[dict]:
        """Per-epoch metrics as written to metrics.csv."""
        return read_metrics(self.path / METRICS_FILE)

    def data(self) -> DataSplits:
        """The data this run was trained on, with the same splits and preprocessing."""
        return load_trained_data(self.config, self.preprocessing, self.path / SPLIT_FILE)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits of uint8 images (N, C, H, W) at the model's input size."""
        return batched_logits(self.model, images, self.normalizer, self.context)

    def tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Log of the mean probability over test-time views: the image, four shifts by
        1/14 of its size (2 px on 28x28) and, when training flipped images, its mirror."""
        import torch.nn.functional as F

        views = [images]
        h, w = images.shape[-2:]
        s = max(1, round(min(h, w) / 14))
        padded = F.pad(images, (s, s, s, s))
        for dy, dx in ((0, s), (2 * s, s), (s, 0), (s, 2 * s)):
            views.append(padded[..., dy : dy + h, dx : dx + w])
        if self.config.data.augment in ("flip", "crop-flip", "photo") or (
            self.config.data.augment == "auto"
            and self.preprocessing.get("resize") == "shorter-side"
        ):
            views.append(images.flip(-1))
        probs = sum(self.logits(v).softmax(1) for v in views) / len(views)
        return probs.clamp_min(1e-12).log()

    def evaluate(
        self, split: str = "test", save: bool = True, tta: bool = False
    ) -> ClassificationReport:
        """Accuracy, top-k, per-class P/R/F1 and the confusion matrix on a split.

        The validation split is rebuilt exactly as training made it (same seed, same
        fraction); ``save`` writes eval-<split>.json, confusion_matrix.png and curves.png.
        """
        if split not in ("test", "val", "train"):
            raise ValueError(f"split must be test, val or train, got '{split}'")
        data = self.data()
        part = data.split(split)
        logits = self.tta_logits(part.images) if tta else self.logits(part.images)
        report = classification_report(logits, part.labels.to(self.device), self.classes, split)
        if save:
            self.save_evaluation(report, data.name)
        return report

    def save_evaluation(self, report: ClassificationReport, data_name: str) -> dict[str, Path]:
        """eval-<split>.json, confusion_matrix.png and (with a history) curves.png."""
        files = {"json": self.path / f"eval-{report.split}.json"}
        payload = {
            "run": str(self.path),
            "data": data_name,
            "model": self.config.model.name,
            "weights_epoch": self.checkpoint_info["epoch"],
            **report.to_dict(),
        }
        files["json"].write_text(json.dumps(payload, indent=2))
        files["confusion_matrix"] = plot_confusion_matrix(
            report.confusion_matrix,
            report.classes,
            f"{data_name} {report.split} split ({report.num_images:,} images), "
            f"accuracy {report.accuracy:.2%}",
            self.path / "confusion_matrix.png",
        )
        if self.history:
            files["curves"] = plot_curves(
                self.history,
                f"{self.path.name}: {self.config.model.name} on {data_name}",
                self.path / "curves.png",
            )
        return files

    def report(self, split: str | None = None, gallery: int = 12) -> tuple[Path, Path]:
        """Write report.html and report.json (see cnnkit.evaluate.report)."""
        return write_report(self, split, gallery)

    def explain(self, images, layer: str | None = None) -> list[tuple[Prediction, object]]:
        """Grad-CAM for the predicted class of each image: (prediction, overlay PIL image).

        ``layer``: a convolution's name (default: the last spatial convolution).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        predictions = self.predict(images, top_k=3)
        readable = [i for i, pred in enumerate(predictions) if not pred.error]
        overlays = []
        if readable:
            x = torch.stack([to_input_tensor(images[i], self.preprocessing) for i in readable])
            targets = torch.tensor([self.classes.index(predictions[i].label) for i in readable])
            overlays, _ = explain_images(
                self.model, self.normalizer, x.to(self.device), targets, layer
            )
        shown = dict(zip(readable, overlays, strict=True))
        return [(pred, shown.get(i)) for i, pred in enumerate(predictions)]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of uint8 images (N, C, H, W) at the model's input size."""
        return self.logits(images).softmax(1)

    def predict(self, images, top_k: int = 5) -> list[Prediction]:
        """Top-k predictions for paths, PIL images, arrays or tensors (one or a list).

        An input that cannot be read gets a Prediction with ``error`` set; the rest are
        still predicted.
        """
        return predict_images(images, self.preprocessing, self.classes, self.probabilities, top_k)


def load_run(path: str | Path, weights: str = "best", device: str = "auto") -> Run:
    """Load a run directory (or a checkpoint file) for evaluation and prediction.

    ``weights`` is 'best' (chosen on the validation split) or 'last'.
    """
    path = Path(path)
    if path.is_file():
        ckpt_path, run_dir = path, path.parent
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"run not found: {path} (expected a run directory)")
        if weights not in ("best", "last"):
            raise ValueError(f"weights must be 'best' or 'last', got '{weights}'")
        ckpt_path, run_dir = path / f"{weights}.pt", path
        if not ckpt_path.exists() and weights == "best" and (path / "last.pt").exists():
            ckpt_path = path / "last.pt"  # stopped before any epoch finished validation
        if not ckpt_path.exists():
            raise FileNotFoundError(f"{path} holds no {weights}.pt: is it a cnnkit run?")
    return Run(run_dir, read_checkpoint(ckpt_path, map_location="cpu"), device)
