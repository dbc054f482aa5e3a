"""A finished (or stopped) run: its model, config and history; evaluate and predict."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.config import Config
from cnnkit.data import DataSplits
from cnnkit.data.decode import to_input_tensor
from cnnkit.data.folder import display_name
from cnnkit.data.memory import Normalizer
from cnnkit.data.resolve import load_trained_data
from cnnkit.data.stream import read_samples, split_chunks
from cnnkit.device import ExecutionContext
from cnnkit.evaluate.explain import explain_images, feature_maps
from cnnkit.evaluate.metrics import ClassificationReport, classification_report
from cnnkit.evaluate.multilabel import MultilabelReport, multilabel_report
from cnnkit.evaluate.multilabel_page import write_multilabel_report
from cnnkit.evaluate.plots import plot_confusion_matrix, plot_curves
from cnnkit.evaluate.report import write_report
from cnnkit.progress import progress

from .checkpoint import Checkpoint, checkpoint_identity, read_checkpoint
from .directory import METRICS_FILE, SPLIT_FILE, read_metrics
from .inference import Prediction, batched_logits, predict_with
from .reject import energy


@dataclass(frozen=True)
class SplitOutputs:
    """A model's logits over a whole split, and how to show some of its rows to a person."""

    logits: torch.Tensor  # (N, classes) float32 on the run's device, in index order
    labels: torch.Tensor  # (N,) on the run's device
    # rows -> (their uint8 images at the stored size, their names): a streamed split reads
    # them back from its shards, so only the rows shown are ever held
    shown: Callable[[list[int]], tuple[torch.Tensor, list[str]]]


@dataclass(frozen=True)
class SplitChoice:
    """Which split an evaluation or report uses, why, and how far to trust its numbers."""

    split: str
    reason: str  # why this split, said beside the numbers
    caveat: str | None = None  # when the numbers are optimistic

    def to_dict(self) -> dict:
        return {"split": self.split, "reason": self.reason, "caveat": self.caveat}


def selection_caveat(weights_file: str) -> str:
    """Why numbers on the validation split flatter the model: that split chose the weights."""
    chose = (
        "selected best.pt"
        if weights_file == "best.pt"
        else "training watched (for early stopping and best.pt)"
    )
    return (
        f"this is the validation split that {chose}: an optimistic estimate; add a test/ "
        "folder (or use a data set with a test split) for an honest one"
    )


# ------------------------------------------------ outputs derived from a checkpoint

# The files that go with a derived JSON output (report.json's page, model.json's model,
# model.pte.json's model.pte: the file a phone export's JSON describes).
COMPANIONS = (".html", ".onnx", "")
EXPORT_FORMATS = {".ort": "ort", ".pte": "executorch", ".mlpackage": "coreml"}


@dataclass(frozen=True)
class StaleOutput:
    """An output made from a checkpoint that has changed since (a resumed run wrote a new
    best.pt): ``files`` (the JSON first, then what goes with it), the checkpoint it
    ``recorded`` and what that file holds now (``current``; None when it is gone)."""

    files: list[Path]
    recorded: dict
    current: dict | None

    @property
    def rebuild(self) -> str:
        """The command that makes the output again from the current checkpoint."""
        name, run = self.files[0].name, self.files[0].parent
        weights = "" if self.recorded.get("file") != "last.pt" else " --weights last"
        if name.startswith("eval-"):
            split = name.removeprefix("eval-").removesuffix(".json")
            return f"cnnkit evaluate {run} --split {split}{weights}"
        if name == "report.json":
            return f"cnnkit report {run}{weights}"
        fmt = EXPORT_FORMATS.get(Path(name).with_suffix("").suffix)
        return f"cnnkit export {run}{f' --format {fmt}' if fmt else ''}{weights}"

    def describe(self) -> str:
        names = ", ".join(f.name for f in self.files)
        was = _describe_checkpoint(self.recorded)
        now = (
            f"{self.recorded['file']} is now {_describe_checkpoint(self.current, with_file=False)}"
            if self.current
            else f"{self.recorded['file']} is gone"
        )
        return f"{names}: made from {was}; {now}"


def _describe_checkpoint(identity: dict, with_file: bool = True) -> str:
    epoch = f"epoch {identity['epoch']}" if identity.get("epoch") is not None else "epoch ?"
    created = f", {identity['created']}" if identity.get("created") else ""
    return f"{identity['file']} {epoch}{created}" if with_file else f"{epoch}{created}"


def _recorded_checkpoint(name: str, payload: dict) -> dict | None:
    """The checkpoint a derived JSON output says it was made from; None for other files.
    Outputs written before they recorded it name only the epoch (of best.pt)."""
    if not isinstance(payload, dict):
        return None
    ref = payload.get("checkpoint")
    if isinstance(ref, dict) and ref.get("file"):
        return ref
    if name.startswith("eval-") and "weights_epoch" in payload:
        return {"file": "best.pt", "epoch": payload["weights_epoch"]}
    facts = payload.get("run")
    if name == "report.json" and isinstance(facts, dict) and "weights" in facts:
        file, _, rest = str(facts["weights"]).partition(" (epoch ")
        epoch = rest.rstrip(")")
        return {
            "file": file,
            "epoch": int(epoch) if epoch.isdigit() else None,
            "created": facts.get("created"),
        }
    return None


def stale_outputs(run_dir: str | Path) -> list[StaleOutput]:
    """Outputs of a run directory (eval-<split>.json, report.json with report.html, an
    export's JSON with its model) made from a checkpoint that has changed since: its epoch,
    date or weights' checksum differ from what that file holds now, or the file is gone."""
    run_dir = Path(run_dir)
    current: dict[str, dict | None] = {}
    stale = []
    for path in sorted(run_dir.glob("*.json")):
        if path.name == SPLIT_FILE:
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not an output of ours, or half-written: nothing to say about it
        recorded = _recorded_checkpoint(path.name, payload)
        if recorded is None:
            continue
        file = recorded["file"]
        if file not in current:
            current[file] = checkpoint_identity(run_dir / file)
        now = current[file]
        changed = now is None or any(
            recorded.get(key) is not None and recorded[key] != now[key]
            for key in ("epoch", "created", "weights_sha256")
        )
        if changed:
            files = [path] + [
                path.with_suffix(s) for s in COMPANIONS if path.with_suffix(s).exists()
            ]
            stale.append(StaleOutput(files, recorded, now))
    return stale


class Run:
    """A run directory with a loaded model. Make one with ``load_run(path)``."""

    def __init__(
        self,
        path: Path,
        checkpoint: Checkpoint,
        device: str | torch.device = "auto",
        precision: str | None = None,
    ):
        self.path = path
        self.checkpoint_info = checkpoint.provenance
        self.checkpoint_path = checkpoint.path
        # What outputs derived from these weights record: {file, epoch, created, sha256}.
        self.checkpoint_ref: dict = checkpoint.identity
        # The metrics.csv row of the epoch these weights are from (None in hand-made files).
        self.checkpoint_metrics: dict | None = checkpoint.metrics
        self._trained_sizes: dict | None = checkpoint.data
        self.config = Config.from_dict(checkpoint.config)
        self.classes: list[str] = checkpoint.classes
        # temperature scaling folded into the weights, with ECE before and after (or None)
        self.calibration: dict | None = checkpoint.calibration
        # the "unknown" rule fitted on the validation split (runs/reject.py), or None
        self.rejection: dict | None = checkpoint.rejection
        # several labels per image: {"thresholds": per label, "fitted_on"}, else None
        self.multilabel: dict | None = checkpoint.multilabel
        self.preprocessing: dict = checkpoint.preprocessing
        model = checkpoint.build_model()
        # How inference runs, decided once (serving calls logits for every batch).
        t = self.config.train
        self.context = ExecutionContext.resolve(
            device=device,
            precision=precision or t.precision,
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

    def require_single_label(self, what: str) -> None:
        """Refuse, in one line, what is built for one class per image only (so far)."""
        if self.multilabel is not None:
            raise ValueError(
                f"{what} is not built for multi-label runs yet; evaluate and predict are "
                "(with the per-label thresholds)"
            )

    def stale_outputs(self) -> list[StaleOutput]:
        """This run's outputs made from a checkpoint that has changed since (see
        ``stale_outputs``): a resumed run's old report, evaluations and export."""
        return stale_outputs(self.path)

    @property
    def val_accuracy(self) -> float | None:
        """Validation accuracy of the loaded weights, as measured when they were saved (for
        best.pt: the epoch that validation chose); None without a validation split."""
        row = self.checkpoint_metrics or {}
        if row.get("val_acc") is not None:
            return float(row["val_acc"])
        if row.get("epoch") is None:  # no row saved: the history's row of the same epoch
            epoch = self.checkpoint_info.get("epoch")
            for r in self.history:
                if r["epoch"] == epoch and r["val_acc"] is not None:
                    return r["val_acc"]
        return None

    @property
    def history(self) -> list[dict]:
        """Per-epoch metrics as written to metrics.csv."""
        return read_metrics(self.path / METRICS_FILE)

    def data(self) -> DataSplits:
        """The data this run was trained on, with the same splits and preprocessing."""
        return load_trained_data(self.config, self.preprocessing, self.path / SPLIT_FILE)

    def logits(self, images: torch.Tensor, progress_label: str | None = None) -> torch.Tensor:
        """Float32 logits of uint8 images (N, C, H, W) at the model's input size;
        ``progress_label``: show progress under that name (a long evaluation)."""
        if progress_label is None:
            return batched_logits(self.model, images, self.normalizer, self.context)
        with progress(progress_label, len(images)) as advance:
            return batched_logits(self.model, images, self.normalizer, self.context, advance)

    def tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Log of the mean probability over test-time views: the image, four shifts by
        1/14 of its size (2 px on 28x28) and, when training flipped images, its mirror.
        Multi-label: the logit of each label's mean sigmoid probability."""
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
            and self.preprocessing.get("channels", 3) != 1  # grayscale folders: no flips
        ):
            views.append(images.flip(-1))
        if self.multilabel is not None:
            probs = sum(self.logits(v).sigmoid() for v in views) / len(views)
            return probs.clamp(1e-12, 1 - 1e-7).logit()
        probs = sum(self.logits(v).softmax(1) for v in views) / len(views)
        return probs.clamp_min(1e-12).log()

    def split_outputs(
        self, data: DataSplits, split: str, tta: bool = False, progress_label: str = "evaluating"
    ) -> SplitOutputs:
        """Logits over every image of ``split`` (``tta``: over test-time views), with
        progress. A streamed split is decoded by worker processes a chunk at a time, so
        only its logits are held, never its images."""
        forward = self.tta_logits if tta else self.logits
        streamed = data.streamed
        if streamed is None:
            part = data.split(split)
            files = data.files[split] if data.files else None

            def shown(rows: list[int]) -> tuple[torch.Tensor, list[str]]:
                names = [
                    display_name(files[i][0]) if files else f"{data.name} {split} #{i}"
                    for i in rows
                ]
                return part.images[rows], names

            logits = forward(part.images) if tta else self.logits(part.images, progress_label)
            return SplitOutputs(logits, part.labels.to(self.device), shown)
        outputs, labels, positions = [], [], []
        with progress(progress_label, data.count(split)) as advance:
            for images, chunk_labels, chunk_positions in split_chunks(streamed, split):
                outputs.append(forward(images))
                labels.append(chunk_labels)
                positions.append(chunk_positions)
                advance(len(chunk_labels))
        if not outputs:
            raise ValueError(f"the {split} split of {data.name} has no image that decodes")
        # the workers deliver chunks in turn: put the rows back in index order
        positions_in_order, order = torch.cat(positions).sort()

        def shown_streamed(rows: list[int]) -> tuple[torch.Tensor, list[str]]:
            images, _, names = read_samples(streamed, split, positions_in_order[rows].tolist())
            return images, names

        logits = torch.cat(outputs)[order.to(self.device)]
        return SplitOutputs(logits, torch.cat(labels)[order].to(self.device), shown_streamed)

    def _has_test_split(self, data: DataSplits | None = None) -> bool:
        if data is None and self._trained_sizes and "test" in self._trained_sizes:
            return bool(self._trained_sizes["test"])  # known without loading the data
        data = data or self.data()
        return bool(data.count("test"))

    def choose_split(self, split: str | None = None, data: DataSplits | None = None) -> SplitChoice:
        """The split to evaluate on: ``split``, or by default the test split if the run has
        one, else the validation split, with the caveat that it chose the weights."""
        if split not in (None, "test", "val", "train"):
            raise ValueError(f"split must be test, val or train, got '{split}'")
        weights_file = self.checkpoint_path.name
        has_test = self._has_test_split(data)
        if split == "test" and not has_test:
            raise ValueError(
                f"{self.path} has no test split (its data, {self.config.data.name}, has no "
                "test/ folder). Evaluate on the validation split with --split val (it "
                "selected best.pt, so that estimate is optimistic), or add a test/ folder "
                "and train again."
            )
        if split == "train":
            return SplitChoice(
                "train",
                "asked for (--split train)",
                "the weights were fitted on the training split: these numbers say nothing "
                "about new images",
            )
        if split == "test" or (split is None and has_test):
            return SplitChoice("test", "the held-out test split, never used in training")
        reason = "asked for (--split val)" if split == "val" else "the run has no test split"
        return SplitChoice("val", reason, selection_caveat(weights_file))

    def evaluate(
        self, split: str | None = None, save: bool = True, tta: bool = False
    ) -> ClassificationReport:
        """Accuracy, top-k, per-class P/R/F1 and the confusion matrix on a split: ``split``,
        or the test split if the run has one, else validation (see ``choose_split``).

        The validation split is rebuilt exactly as training made it (same seed, same
        fraction); ``save`` writes eval-<split>.json, confusion_matrix.png and curves.png.
        """
        data = self.data()  # loaded once: choose_split looks at it too
        choice = self.choose_split(split, data)
        outputs = self.split_outputs(data, choice.split, tta)
        if self.multilabel is not None:
            return self._evaluate_multilabel(outputs, data.name, choice, save)
        report = classification_report(outputs.logits, outputs.labels, self.classes, choice.split)
        if save:
            self.save_evaluation(report, data.name, choice)
        return report

    def _evaluate_multilabel(self, outputs, data_name: str, choice, save: bool):
        """mAP, per-label P/R/F1/AP, example F1, Hamming loss, subset accuracy at the run's
        thresholds (evaluate/multilabel.py); eval-<split>.json and curves.png."""
        probs = outputs.logits.float().sigmoid().cpu().numpy()
        targets = outputs.labels.cpu().numpy()
        thresholds = np.asarray(self.multilabel["thresholds"])
        report = MultilabelReport(
            choice.split, multilabel_report(probs, targets, thresholds, self.classes)
        )
        if save:
            payload = {
                **self._evaluation_facts(data_name, choice),
                "thresholds_fitted_on": self.multilabel.get("fitted_on"),
                **report.to_dict(),
            }
            (self.path / f"eval-{choice.split}.json").write_text(json.dumps(payload, indent=2))
            self._plot_curves(data_name)
        return report

    def save_evaluation(
        self, report: ClassificationReport, data_name: str, choice: SplitChoice | None = None
    ) -> dict[str, Path]:
        """eval-<split>.json, confusion_matrix.png and (with a history) curves.png."""
        choice = choice or self.choose_split(report.split)
        files = {"json": self.path / f"eval-{report.split}.json"}
        payload = {**self._evaluation_facts(data_name, choice), **report.to_dict()}
        files["json"].write_text(json.dumps(payload, indent=2))
        files["confusion_matrix"] = plot_confusion_matrix(
            report.confusion_matrix,
            report.classes,
            f"{data_name} {report.split} split ({report.num_images:,} images), "
            f"accuracy {report.accuracy:.2%}",
            self.path / "confusion_matrix.png",
        )
        curves = self._plot_curves(data_name)
        if curves is not None:
            files["curves"] = curves
        return files

    def _evaluation_facts(self, data_name: str, choice: SplitChoice) -> dict:
        """What every eval-<split>.json says first: the run, its data and weights, and why
        this split."""
        return {
            "run": str(self.path),
            "data": data_name,
            "model": self.config.model.name,
            "weights_epoch": self.checkpoint_info["epoch"],
            "checkpoint": self.checkpoint_ref,  # so a newer checkpoint shows this is stale
            "split_reason": choice.reason,
            "caveat": choice.caveat,
        }

    def _plot_curves(self, data_name: str) -> Path | None:
        """curves.png from metrics.csv (read once); None without a history."""
        history = self.history
        if not history:
            return None
        return plot_curves(
            history,
            f"{self.path.name}: {self.config.model.name} on {data_name}",
            self.path / "curves.png",
        )

    def report(self, split: str | None = None, gallery: int = 12) -> tuple[Path, Path]:
        """Write report.html and report.json (see cnnkit.evaluate.report; multi-label runs:
        evaluate/multilabel_page.py, ``gallery // 4`` of each kind of error per label)."""
        if self.multilabel is not None:
            return write_multilabel_report(self, split, max(1, gallery // 4))
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
            targets = torch.tensor([self.classes.index(predictions[i].top[0][0]) for i in readable])
            overlays, _ = explain_images(
                self.model, self.normalizer, x.to(self.device), targets, layer
            )
        shown = dict(zip(readable, overlays, strict=True))
        return [(pred, shown.get(i)) for i, pred in enumerate(predictions)]

    def feature_maps(self, image, layer: str | None = None) -> tuple[torch.Tensor, str]:
        """What one layer (default: the first convolution) outputs for one image (a file
        path, PIL image or uint8 array): its maps (K, h, w) and the layer's name."""
        x = to_input_tensor(image, self.preprocessing).unsqueeze(0).to(self.device)
        return feature_maps(self.model, self.normalizer(x), layer)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of uint8 images (N, C, H, W) at the model's input size
        (multi-label: each label's own probability, a sigmoid)."""
        return self.outputs(images)[0]

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(probabilities, energy score) of uint8 images (N, C, H, W): what predictions
        and the "unknown" rule are made of. Multi-label: (each label's sigmoid, None)."""
        logits = self.logits(images)
        if self.multilabel is not None:
            return logits.sigmoid(), None
        return logits.softmax(1), energy(logits)

    def predict(self, images, top_k: int = 5, reject: bool = True) -> list[Prediction]:
        """Top-k predictions for paths, PIL images, arrays or tensors (one or a list).

        An input that cannot be read gets a Prediction with ``error`` set; the rest are
        still predicted. With the run's "unknown" rule (``rejection``) and ``reject``, an
        image scoring below its threshold is answered "unknown" (its top-k still given).
        """
        return predict_with(self, images, top_k, reject)


def load_run(
    path: str | Path, weights: str = "best", device: str = "auto", precision: str | None = None
) -> Run:
    """Load a run directory (or a checkpoint file) for evaluation and prediction.

    ``weights`` is 'best' (chosen on the validation split) or 'last'. ``precision``: auto,
    fp32 or bf16 for inference (default: the run's own setting).
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
    return Run(run_dir, read_checkpoint(ckpt_path, map_location="cpu"), device, precision)
