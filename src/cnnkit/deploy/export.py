"""``cnnkit export``: an ONNX file that a program without PyTorch can use correctly.

The graph takes the natural input, uint8 images (N, C, H, W) or (N, H, W, C) at the
model's input size, normalises them itself and returns class probabilities. Its metadata
carries the class names, the preprocessing and the provenance, so the file alone is enough
to predict. After export, ONNX Runtime's output is compared with PyTorch's on the
validation images; a file that disagrees beyond a tight bound is refused.

``quantize="int8"``: ONNX Runtime static quantization (QDQ, per-channel weights),
calibrated on training images; its accuracy change and speed-up are measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.data.augment import center_crop
from cnnkit.data.stream import read_samples
from cnnkit.progress import progress
from cnnkit.runs.reject import SCORE_OUTPUT
from cnnkit.version import __version__

MAX_PROBABILITY_DIFFERENCE = 1e-4  # fp32 ONNX Runtime vs PyTorch: rounding only
MIN_TOP1_AGREEMENT = 0.999
MAX_SCORE_DIFFERENCE = 1e-4  # the energy score, relative: fp32 rounding only
METADATA_PREFIX = "cnnkit."


class ExportMismatchError(RuntimeError):
    """The exported file does not reproduce the model's predictions."""


class ImagesToProbabilities(nn.Module):
    """uint8 images -> probabilities, with the run's normalisation inside the graph.

    ``score``: also return the energy score (logsumexp of the logits) of each image, the
    out-of-distribution score the "unknown" rule thresholds (runs/reject.py).
    ``multilabel``: each label's own probability (a sigmoid), not a softmax over them."""

    def __init__(
        self,
        model: nn.Module,
        mean,
        std,
        layout: str = "nchw",
        score: bool = False,
        multilabel: bool = False,
    ):
        super().__init__()
        self.model = model
        self.layout = layout
        self.score = score
        self.multilabel = multilabel
        c = len(mean)
        self.register_buffer("scale", (1 / (255 * torch.tensor(std))).view(1, c, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, c, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        logits = self.model(x * self.scale - self.shift)
        if self.multilabel:
            return logits.sigmoid()
        if self.score:
            return logits.softmax(1), torch.logsumexp(logits, 1)
        return logits.softmax(1)


@dataclass
class ExportResult:
    path: str
    layout: str
    parity: dict
    int8: dict | None = None
    int8_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_outputs(session, images: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Every output of an ONNX Runtime session over ``images``, ``batch`` at a time."""
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: images[i : i + batch]}) for i in range(0, len(images), batch)]
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def _run(session, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """The first output (the probabilities) of a session over ``images``."""
    return _run_outputs(session, images, batch)[0]


def _model_inputs(run, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images of a split at the model's input size, and their labels."""
    data = run.data()
    split = split if split != "val" or data.count("val") else "train"
    if data.streamed is not None:  # the first images of the split, read from its shards
        rows = list(range(min(limit or data.count(split), data.count(split))))
        images, labels, _ = read_samples(data.streamed, split, rows)
    else:
        part = data.split(split)
        images = part.images[:limit] if limit else part.images
        labels = part.labels[: len(images)]
    size = tuple(run.preprocessing["size"])
    if tuple(images.shape[-2:]) != size:
        images = center_crop(images, size)
    return np.ascontiguousarray(images.numpy()), labels.numpy()


def _to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if layout == "nhwc" else images


def write_metadata(path: Path, entries: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, json.dumps(value)
    onnx.save(model, str(path))


class NotAnOnnxFileError(ValueError):
    """A file that ONNX or ONNX Runtime cannot load: truncated, corrupt, or not ONNX at all."""


def read_metadata(path: str | Path) -> dict:
    import onnx
    from google.protobuf.message import DecodeError  # protobuf comes with onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise NotAnOnnxFileError(
            f"{path}: not a valid ONNX file ({e}); export it again with 'cnnkit export'"
        ) from None
    return {
        p.key.removeprefix(METADATA_PREFIX): json.loads(p.value)
        for p in model.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def parity(predict, wrapper: nn.Module, images: np.ndarray, layout: str = "nchw") -> dict:
    """Top-1 agreement and the largest probability difference between ``predict`` (an
    exported file's runtime: images in ``layout`` -> probabilities) and PyTorch. Where
    ``predict`` gives every output of the file (a list) and the wrapper has a score too,
    the largest difference of the ``ood_score`` relative to its size (at least 1) as well:
    one run of each for both."""
    x = _to_layout(images, layout)
    exported = predict(x)
    reference = torch_outputs(wrapper, x)
    probs = exported[0] if isinstance(exported, list) else exported
    check = {
        "images": len(images),
        "top1_agreement": float((probs.argmax(1) == reference[0].argmax(1)).mean()),
        "max_probability_difference": float(np.abs(probs - reference[0]).max()),
    }
    if isinstance(exported, list) and len(exported) > 1 and len(reference) > 1:
        score, expected = exported[1], reference[1]
        relative = np.abs(score - expected) / np.maximum(1, np.abs(expected))
        check["max_score_difference"] = float(relative.max())
    return check


def torch_outputs(wrapper: nn.Module, images: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Each of the wrapper's outputs (probabilities; with ``score``, the energy too)."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out = wrapper(torch.from_numpy(images[i : i + batch]))
            parts.append(out if isinstance(out, tuple) else (out,))
    return [torch.cat(column).numpy() for column in zip(*parts, strict=True)]


def torch_probabilities(wrapper: nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return torch_outputs(wrapper, images, batch)[0]


def agrees(check: dict) -> bool:
    """Whether a parity check is within the bounds an exported file must meet."""
    return (
        check["max_probability_difference"] <= MAX_PROBABILITY_DIFFERENCE
        and check["top1_agreement"] >= MIN_TOP1_AGREEMENT
        and check.get("max_score_difference", 0) <= MAX_SCORE_DIFFERENCE
    )


def refuse_mismatch(path: Path, check: dict, what: str) -> None:
    """Keep a file that disagrees with PyTorch as ``<name>.rejected<suffix>`` and raise."""
    if agrees(check):
        return
    rejected = path.with_name(f"{path.stem}.rejected{path.suffix}")
    path.rename(rejected)
    raise ExportMismatchError(
        f"the {what} export disagrees with the model on {check['images']} validation "
        f"images: top-1 agreement {check['top1_agreement']:.4%}, largest probability "
        f"difference {check['max_probability_difference']:.2e}"
        + (
            f", largest ood_score difference {check['max_score_difference']:.2e}"
            if "max_score_difference" in check
            else ""
        )
        + f" (bounds {MIN_TOP1_AGREEMENT:.1%}, {MAX_PROBABILITY_DIFFERENCE:.0e}"
        + (f", {MAX_SCORE_DIFFERENCE:.0e}" if "max_score_difference" in check else "")
        + "). The file was kept as "
        f"{rejected} for inspection."
    )


def _images_per_second(fn, images: np.ndarray, batch: int, seconds: float = 1.0) -> float:
    x = images[:batch]
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Static int8 quantization, calibrated on ``calibration`` (model-layout uint8 images)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter(
                [{name: calibration[i : i + 32]} for i in range(0, len(calibration), 32)]
            )

        def get_next(self):
            return next(self.batches, None)

    prepared = out_path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        name = _session(prepared).get_inputs()[0].name
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)


def images_to_probabilities(
    run, layout: str = "nchw", score: bool = False
) -> ImagesToProbabilities:
    """The run's model on the CPU behind its normalisation: what every export converts."""
    model = run.model.to("cpu").eval().to(memory_format=torch.contiguous_format)
    pre = run.preprocessing
    multilabel = run.multilabel is not None
    return ImagesToProbabilities(model, pre["mean"], pre["std"], layout, score, multilabel).eval()


def export_rejection(run, score_output: bool, reject: bool = True) -> dict | None:
    """The run's "unknown" rule as an exported file carries it: the energy rule where the
    file has the ``ood_score`` output, else the max-softmax rule fitted beside it (a file
    whose only output is the probabilities); None without a rule or with ``reject`` off."""
    from cnnkit.runs.reject import Rejection

    if not reject or not run.rejection:
        return None
    record = run.rejection
    rule = Rejection.from_record(record, None if score_output else "max_softmax")
    return {
        **rule.to_dict(),
        "output": SCORE_OUTPUT if rule.score == "energy" else "probabilities",
        "acceptance": record["acceptance"],
        "fitted_on": record["fitted_on"],
        "images": record["images"],
        "thresholds": record["thresholds"],
    }


def export_metadata(
    run, layout: str = "nchw", score_output: bool = False, reject: bool = True
) -> dict:
    """What every exported file carries: the class names, the preprocessing of its uint8
    input, the provenance (the checkpoint it was made from) and the "unknown" rule."""
    meta = {
        "classes": run.classes,
        "preprocessing": {
            **run.preprocessing,
            "layout": layout,
            "input_dtype": "uint8",
            "normalised_in_graph": True,
        },
        "provenance": {
            "cnnkit": __version__,
            "torch": str(torch.__version__),
            "run": str(run.path),
            "model": run.config.model.name,
            "data": run.config.data.name,
            "checkpoint_epoch": run.checkpoint_info.get("epoch"),
            "checkpoint_created": run.checkpoint_info.get("created"),
            "checkpoint": run.checkpoint_ref,  # file, epoch, date, weights' checksum
        },
    }
    rejection = export_rejection(run, score_output, reject)
    if rejection:
        meta["rejection"] = rejection
    if run.multilabel is not None:  # sigmoid outputs, a threshold each
        meta["multilabel"] = {
            "thresholds": run.multilabel["thresholds"],
            "fitted_on": run.multilabel.get("fitted_on"),
            "separator": ";",
        }
    return meta


def accuracy_change(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 accuracy of a float and an int8 model's probabilities, and their agreement."""
    acc32 = float((fp32.argmax(1) == labels).mean())
    acc8 = float((int8.argmax(1) == labels).mean())
    return {
        "images": len(labels),
        "accuracy_fp32": acc32,
        "accuracy_int8": acc8,
        "accuracy_change_points": (acc8 - acc32) * 100,
        "top1_agreement_with_fp32": float((int8.argmax(1) == fp32.argmax(1)).mean()),
    }


def label_set_change(
    fp32: np.ndarray, int8: np.ndarray, targets: np.ndarray, thresholds: list[float]
) -> dict:
    """A multi-label model's mAP and example F1 (at its thresholds) in float and int8, and
    how often the int8 file answers the same label set."""
    from cnnkit.evaluate.multilabel import multilabel_report

    names = [str(k) for k in range(fp32.shape[1])]
    r32, r8 = (multilabel_report(p, targets, np.asarray(thresholds), names) for p in (fp32, int8))
    cut = np.asarray(thresholds)[None, :]
    return {
        "images": len(targets),
        "mAP_fp32": r32["mAP"],
        "mAP_int8": r8["mAP"],
        "example_f1_fp32": r32["example_f1"],
        "example_f1_int8": r8["example_f1"],
        "label_set_agreement_with_fp32": float(((fp32 >= cut) == (int8 >= cut)).all(1).mean()),
    }


def int8_change(
    fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, thresholds: list[float] | None
) -> dict:
    """How an int8 file's answers differ from the float file's: top-1 accuracy, or, for a
    multi-label model (its ``thresholds``), mAP, example F1 and identical label sets."""
    if thresholds is not None:
        return label_set_change(fp32, int8, labels, thresholds)
    return accuracy_change(fp32, int8, labels)


def thresholds_of(run) -> list[float] | None:
    """A multi-label run's per-label thresholds (None for one class per image)."""
    return run.multilabel["thresholds"] if run.multilabel is not None else None


def installed_version(package: str) -> str | None:
    """The installed version of a Python package (a converter's, for the record)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def export_onnx(
    run,
    path: str | Path | None = None,
    *,
    layout: str = "nchw",
    quantize: str | None = None,
    calibration_images: int = 512,
    check_images: int | None = 2000,
    reject: bool = True,
) -> ExportResult:
    """Export a run to ONNX, verify it against PyTorch, optionally quantize to int8.

    With the run's "unknown" rule (and ``reject``), the graph has a second output,
    ``ood_score`` (the energy of each image), and the metadata carries the threshold."""
    import warnings

    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be nchw or nhwc, got '{layout}'")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be int8, got '{quantize}'")
    path = Path(path) if path else run.path / "model.onnx"
    scored = bool(reject and run.rejection)
    wrapper = images_to_probabilities(run, layout, score=scored)
    outputs = ["probabilities", SCORE_OUTPUT] if scored else ["probabilities"]
    pre = run.preprocessing
    c, (h, w) = pre["channels"], pre["size"]
    dummy = torch.zeros((1, c, h, w) if layout == "nchw" else (1, h, w, c), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            opset_version=17,
            dynamo=False,
            dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
        )
    metadata = export_metadata(run, layout, score_output=scored, reject=reject)
    write_metadata(path, metadata)

    val_images, val_labels = _model_inputs(run, "val", check_images)
    with progress("checking ONNX Runtime against PyTorch", None, "files"):
        session = _session(path)
        # every output: the probabilities and, with the rule, the ood_score
        check = parity(lambda x: _run_outputs(session, x), wrapper, val_images, layout)
    result = ExportResult(str(path), layout, check)
    if quantize == "int8" and agrees(check):
        result.int8_path = str(path.with_name(path.stem + "-int8.onnx"))
        calib, _ = _model_inputs(run, "train", calibration_images)
        with progress("int8 quantization (calibrating on training images)", None, "files"):
            quantize_int8(path, Path(result.int8_path), _to_layout(calib, layout))
        write_metadata(Path(result.int8_path), {**metadata, "quantization": "int8 static"})
        with progress("int8 accuracy and speed", None, "files"):
            result.int8 = _int8_report(
                path,
                Path(result.int8_path),
                wrapper,
                _to_layout(val_images, layout),
                val_labels,
                thresholds_of(run),
            )
    # The checkpoint it came from: a resumed run then knows this export is stale.
    details = {"checkpoint": run.checkpoint_ref, **result.to_dict()}
    (path.with_suffix(".json")).write_text(json.dumps(details, indent=2))
    refuse_mismatch(path, check, "ONNX")
    return result


def _int8_report(
    fp32: Path,
    int8: Path,
    wrapper: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    thresholds: list[float] | None = None,
) -> dict:
    """The int8 file's accuracy (multi-label, with ``thresholds``: mAP and label sets)
    beside the float file's, their speeds and sizes."""
    s32, s8 = _session(fp32), _session(int8)
    p32, p8 = _run(s32, images), _run(s8, images)
    name = s32.get_inputs()[0].name

    def torch_fn(x):
        with torch.no_grad():
            return wrapper(torch.from_numpy(x))

    speed = {}
    for batch in (1, 32):
        speed[f"batch_{batch}"] = {
            "torch": round(_images_per_second(torch_fn, images, batch)),
            "onnx_fp32": round(
                _images_per_second(lambda x: s32.run(None, {name: x}), images, batch)
            ),
            "onnx_int8": round(
                _images_per_second(lambda x: s8.run(None, {name: x}), images, batch)
            ),
        }
    return {
        **int8_change(p32, p8, labels, thresholds),
        "images_per_s": speed,
        "size_bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
    }
