"""``cnnkit export RUN --format ort|executorch|coreml``: files for the runtimes on phones.

Each takes the same input as the ONNX export, a uint8 image at the model's input size
(normalised inside the model), returns class probabilities, carries the class names and
the preprocessing, and is checked before it is handed over:

- ``ort``: ONNX Runtime's mobile format (Android, iOS, React Native packages), converted
  from the verified ONNX file by the converter inside the ``onnxruntime`` package; checked
  with ONNX Runtime's Python API. Metadata as in the ONNX file.
- ``executorch``: a ``.pte`` for PyTorch's on-device runtime, lowered to the XNNPACK
  delegate (the uint8-to-float cast stays a portable kernel); checked with ExecuTorch's
  own Python runtime. The class names and preprocessing are a constant method of the
  program (``cnnkit_metadata``: JSON as bytes) and the ``.json`` beside it.
- ``coreml``: an ``.mlpackage`` (ML program, float32) whose input is an image and whose
  output is a classifier's (the labels inside). Core ML predicts only on Apple systems:
  on Linux its description is checked (input size and colour, labels, outputs,
  preprocessing) and its operations recorded.

A file that disagrees with PyTorch beyond the ONNX export's bounds is refused. ``int8``:
ONNX Runtime's static quantisation converted to ``.ort``; ExecuTorch's XNNPACK quantizer
(pt2e, calibrated on training images); Core ML int8 weights. The accuracy change is
measured on the check images. Every export writes ``<file>.json`` with the figures.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.progress import progress

from .export import (
    ImagesToProbabilities,
    _model_inputs,
    _run,
    _session,
    export_metadata,
    export_onnx,
    images_to_probabilities,
    installed_version,
    int8_change,
    parity,
    refuse_mismatch,
    thresholds_of,
    torch_probabilities,
)

FORMATS = {"ort": ".ort", "executorch": ".pte", "coreml": ".mlpackage"}
# The largest batch a .pte accepts (its inputs are bounded tensors); the example batch
# must be large enough that XNNPACK keeps that bound (a batch of 2 narrows it to 15).
PTE_MAX_BATCH, PTE_EXAMPLE_BATCH = 256, 32
# An int8 .pte must give the top-1 labels of the quantized PyTorch model it comes from.
INT8_MIN_LOWERING_AGREEMENT = 0.99
RUNTIME_PACKAGES = {"ort": "onnxruntime", "executorch": "executorch", "coreml": "coremltools"}
EXTRAS = {"ort": "deploy", "executorch": "executorch", "coreml": "coreml"}


@dataclass
class MobileExport:
    path: str
    format: str
    runtime: str  # the package (and version) that converted and checked it
    size_bytes: int
    parity: dict | None  # vs PyTorch on validation images; None where it cannot run here
    checked: list[str]  # what was verified, in words
    int8: dict | None = None
    int8_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _quiet():
    """The converters' own chatter (progress bars, logging, warnings about untested torch
    versions) held back: cnnkit shows its own progress for each step."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _version(package: str) -> str:
    """'package version', for the record of what converted and checked a file."""
    return f"{package} {installed_version(package) or '(version unknown)'}"


def require(fmt: str) -> None:
    """A clear error when the format's converter is not installed."""
    import importlib.util

    package = RUNTIME_PACKAGES[fmt]
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"--format {fmt} needs the '{package}' package: pip install 'cnnkit[{EXTRAS[fmt]}]'"
        )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def export_mobile(
    run,
    fmt: str,
    path: str | Path | None = None,
    *,
    quantize: str | None = None,
    check_images: int = 500,
    calibration_images: int = 256,
) -> MobileExport:
    """Export a run for a phone runtime (``fmt``: ort, executorch, coreml), check it and
    write ``<file>.json``; ``quantize="int8"`` also writes ``<name>-int8<suffix>``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be int8, got '{quantize}'")
    require(fmt)
    suffix = FORMATS[fmt]
    path = Path(path) if path else run.path / f"model{suffix}"
    if path.suffix != suffix:
        raise ValueError(f"--format {fmt} writes a {suffix} file: name it so (got {path.name})")
    images, labels = _model_inputs(run, "val", check_images)
    exporter = {"ort": _export_ort, "executorch": _export_executorch, "coreml": _export_coreml}
    result = exporter[fmt](run, path, images, labels, quantize, calibration_images)
    details = {"checkpoint": run.checkpoint_ref, **result.to_dict()}
    Path(f"{path}.json").write_text(json.dumps(details, indent=2))
    return result


# ---------------------------------------------------------------- ONNX Runtime Mobile


def _ort_convert(onnx_path: Path, out: Path) -> None:
    """ONNX -> .ort with ONNX Runtime's own converter ("Fixed" optimisations, no
    platform-specific layouts: the file suits ARM phones and this machine alike)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ort-") as tmp:
        source = Path(tmp) / "model.onnx"  # alone in a folder: it converts every *.onnx
        shutil.copy(onnx_path, source)
        with _quiet():
            convert_onnx_models_to_ort(
                source, output_dir=Path(tmp), optimization_styles=[OptimizationStyle.Fixed]
            )
        shutil.move(Path(tmp) / "model.ort", out)


def _ort_predict(path: Path):
    session = _session(path)
    return (lambda images: _run(session, images)), session


def _export_ort(run, path, images, labels, quantize, calibration_images) -> MobileExport:
    wrapper = images_to_probabilities(run)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
        onnx = export_onnx(
            run,
            Path(tmp) / "model.onnx",
            quantize=quantize,
            calibration_images=calibration_images,
            check_images=len(images) or None,
        )
        with progress("converting to the ONNX Runtime mobile format (.ort)", None, "files"):
            _ort_convert(Path(onnx.path), path)
            int8_path = None
            if onnx.int8_path:
                int8_path = path.with_name(f"{path.stem}-int8{path.suffix}")
                _ort_convert(Path(onnx.int8_path), int8_path)
    predict, session = _ort_predict(path)
    with progress("checking the .ort file with ONNX Runtime", None, "files"):
        check = parity(predict, wrapper, images)
    refuse_mismatch(path, check, "ONNX Runtime mobile")
    meta = session.get_modelmeta().custom_metadata_map
    carried = {k for k in ("cnnkit.classes", "cnnkit.preprocessing") if k in meta}
    if json.loads(meta.get("cnnkit.classes", "null")) != run.classes:
        raise RuntimeError(f"{path}: the class names did not survive the conversion")
    result = MobileExport(
        str(path),
        "ort",
        _version("onnxruntime"),
        _size(path),
        check,
        [
            "loaded by ONNX Runtime's InferenceSession; probabilities compared with PyTorch",
            f"metadata inside: {', '.join(sorted(carried))}",
        ],
    )
    if int8_path is not None:
        predict8, _ = _ort_predict(int8_path)
        result.int8_path = str(int8_path)
        result.int8 = {
            **int8_change(predict(images), predict8(images), labels, thresholds_of(run)),
            "size_bytes": {"fp32": _size(path), "int8": _size(int8_path)},
        }
    return result


# ---------------------------------------------------------------- ExecuTorch


def _pte_program(module, example: torch.Tensor, metadata: dict) -> bytes:
    """Export, lower to XNNPACK and serialise; the batch dimension stays dynamic up to
    PTE_MAX_BATCH (bounded by the constraints, not by the example's size)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    program = torch.export.export(module, (example,), dynamic_shapes=_pte_dynamic())
    meta = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    edge = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        constant_methods={"cnnkit_metadata": meta},
    )
    config = ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())
    return edge.to_executorch(config).buffer


def _pte_dynamic() -> dict:
    return {"images": {0: torch.export.Dim("batch", min=1, max=PTE_MAX_BATCH)}}


def _pte_predict(path: Path):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(path))
    forward = program.load_method("forward")

    def predict(images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                forward.execute([torch.from_numpy(images[i : i + PTE_MAX_BATCH])])[0].numpy()
                for i in range(0, len(images), PTE_MAX_BATCH)
            ]
        )

    return predict, program


def read_pte_metadata(path: str | Path) -> dict:
    """The class names, preprocessing and provenance inside a cnnkit .pte file."""
    return _pte_metadata(_pte_predict(Path(path))[1])


def _pte_metadata(program) -> dict:
    raw = program.load_method("cnnkit_metadata").execute([])[0]
    return json.loads(bytes(raw.tolist()).decode())


def _quantized_pte_module(run, wrapper, example, calibration: np.ndarray):
    """The wrapper with its network quantized for XNNPACK (pt2e, symmetric, per channel,
    calibrated on ``calibration``). Only the network: with the normalisation's multiply and
    subtract quantized too, the .pte gave 30% accuracy where PyTorch's quantized module gave
    92% (seed-cnn on MNIST, executorch 1.5.1); and a quantizer limited to the network by its
    module name left most of EfficientNet-Lite0's layers in float. So the network is exported
    and quantized on its own, then put back behind the float normalisation."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer().set_global(config)
    batch = _pte_dynamic()["images"][0]
    normalise = lambda images: images.float() * wrapper.scale - wrapper.shift  # noqa: E731
    network = torch.export.export(
        wrapper.model, (normalise(example),), dynamic_shapes=({0: batch},)
    ).module()
    prepared = prepare_pt2e(network, quantizer)
    with torch.no_grad():
        for i in range(0, len(calibration), PTE_EXAMPLE_BATCH):
            prepared(normalise(torch.from_numpy(calibration[i : i + PTE_EXAMPLE_BATCH])))
    pre = run.preprocessing
    # (no .eval(): an exported graph has no train mode to leave; its batch norms are folded)
    return ImagesToProbabilities(convert_pt2e(prepared), pre["mean"], pre["std"])


def _export_executorch(run, path, images, labels, quantize, calibration_images) -> MobileExport:
    wrapper = images_to_probabilities(run)
    c, (h, w) = run.preprocessing["channels"], run.preprocessing["size"]
    example = torch.zeros((PTE_EXAMPLE_BATCH, c, h, w), dtype=torch.uint8)
    metadata = export_metadata(run)
    with progress("lowering to ExecuTorch (XNNPACK)", None, "files"), _quiet():
        path.write_bytes(_pte_program(wrapper, example, metadata))
    predict, program = _pte_predict(path)
    with progress("checking the .pte file with ExecuTorch's runtime", None, "files"):
        check = parity(predict, wrapper, images)
    refuse_mismatch(path, check, "ExecuTorch")
    if _pte_metadata(program)["classes"] != run.classes:
        raise RuntimeError(f"{path}: the class names did not survive the conversion")
    result = MobileExport(
        str(path),
        "executorch",
        _version("executorch"),
        _size(path),
        check,
        [
            "loaded by ExecuTorch's Python runtime; probabilities compared with PyTorch",
            f"batches of 1 to {PTE_MAX_BATCH} images",
            "metadata inside: the cnnkit_metadata method (classes, preprocessing, provenance)",
        ],
    )
    if quantize == "int8":
        calibration, _ = _model_inputs(run, "train", calibration_images)
        int8_path = path.with_name(f"{path.stem}-int8{path.suffix}")
        step = "int8 (XNNPACK quantizer, calibrating on training images)"
        with progress(step, None, "files"), _quiet():
            module = _quantized_pte_module(run, wrapper, example, calibration)
            int8_path.write_bytes(
                _pte_program(module, example, {**metadata, "quantization": "int8"})
            )
        predict8, _ = _pte_predict(int8_path)
        # The .pte against the quantized PyTorch model it was lowered from: rounding apart,
        # they must agree (a lowering that does not is refused, not shipped).
        lowering = parity(predict8, module, images)
        result.int8 = {
            **int8_change(predict(images), predict8(images), labels, thresholds_of(run)),
            "vs_quantized_pytorch": lowering,
            "size_bytes": {"fp32": _size(path), "int8": _size(int8_path)},
        }
        if lowering["top1_agreement"] < INT8_MIN_LOWERING_AGREEMENT:
            rejected = int8_path.with_name(f"{int8_path.stem}.rejected{int8_path.suffix}")
            int8_path.rename(rejected)
            result.int8["refused"] = (
                f"the int8 .pte agrees with the quantized PyTorch model on only "
                f"{lowering['top1_agreement']:.1%} of {lowering['images']} validation images "
                f"(XNNPACK's lowering of this network, {_version('executorch')}); kept as "
                f"{rejected}. The ONNX Runtime int8 file (--format ort --quantize int8) is "
                "another way to a small file on the phone"
            )
        else:
            result.int8_path = str(int8_path)
    return result


# ---------------------------------------------------------------- Core ML


def _coreml_model(run, wrapper):
    """The run as a Core ML classifier: an image input (0-255 pixels, as the uint8 input of
    the other formats; the normalisation stays in the graph) and the labels inside. A
    multi-label run is no classifier (Core ML's picks one label): its output is each
    label's probability, with the labels and thresholds in the metadata."""
    with _quiet():  # it warns of torch versions newer than it was tested with
        import coremltools as ct

    c, (h, w) = run.preprocessing["channels"], run.preprocessing["size"]
    # exported with float pixels 0..255: the wrapper's uint8-to-float cast is then a no-op
    with _quiet():
        # torch.export rather than TorchScript: coremltools 9.0 fails on traced
        # EfficientNet-Lite0 with numpy 2.4 (its aten::Int casts a 1-element array)
        program = torch.export.export(wrapper, (torch.rand(1, c, h, w) * 255,))
        model = ct.convert(
            program.run_decompositions({}),
            inputs=[
                ct.ImageType(
                    name="image",
                    shape=(1, c, h, w),
                    scale=1.0,
                    color_layout=ct.colorlayout.GRAYSCALE if c == 1 else ct.colorlayout.RGB,
                )
            ],
            classifier_config=(
                None if run.multilabel is not None else ct.ClassifierConfig(list(run.classes))
            ),
            outputs=[ct.TensorType(name="probabilities")] if run.multilabel is not None else None,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            compute_precision=ct.precision.FLOAT32,
        )
    for key, value in export_metadata(run).items():
        model.user_defined_metadata[f"cnnkit.{key}"] = json.dumps(value)
    model.short_description = f"{run.config.model.name}: {len(run.classes)} classes (cnnkit)"
    return model


def describe_coreml(path: str | Path) -> dict:
    """What a saved .mlpackage says of itself, read without Core ML's runtime (Linux)."""
    import coremltools as ct

    with _quiet():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    image = spec.description.input[0]
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    ops = [op.type for op in block.operations if op.type != "const"]
    labels = []
    for op in block.operations:
        if op.type == "classify":
            labels = [v.immediateValue.tensor.strings.values[0] for v in _classify_labels(op)]
    color = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(
        image.type.imageType.colorSpace
    )
    return {
        "input": {
            "name": image.name,
            "width": image.type.imageType.width,
            "height": image.type.imageType.height,
            "color": color,
        },
        "outputs": [o.name for o in spec.description.output],
        "labels": labels,
        "operations": ops,
        "metadata": {
            k.removeprefix("cnnkit."): json.loads(v)
            for k, v in spec.description.metadata.userDefined.items()
            if k.startswith("cnnkit.")
        },
        "spec_version": spec.specificationVersion,
    }


def _classify_labels(op):
    """The string constants the classify operation takes as its class labels."""
    argument = op.inputs["classes"].arguments[0]
    return argument.value.immediateValue.list.values if argument.HasField("value") else []


def _check_coreml(run, path: Path) -> dict:
    found = describe_coreml(path)
    c, (h, w) = run.preprocessing["channels"], run.preprocessing["size"]
    expected_color = "GRAYSCALE" if c == 1 else "RGB"
    problems = []
    if (found["input"]["width"], found["input"]["height"]) != (w, h):
        problems.append(f"input {found['input']['width']}x{found['input']['height']}")
    if found["input"]["color"] != expected_color:
        problems.append(f"input colour {found['input']['color']}")
    meta = found["metadata"]
    if meta.get("preprocessing", {}).get("mean") != list(run.preprocessing["mean"]):
        problems.append("preprocessing")
    if run.multilabel is not None:  # sigmoid outputs, the labels and thresholds as metadata
        if meta.get("classes") != list(run.classes) or meta.get("multilabel", {}).get(
            "thresholds"
        ) != list(run.multilabel["thresholds"]):
            problems.append("labels or thresholds")
        if "sigmoid" not in found["operations"] or "classify" in found["operations"]:
            problems.append("operations")
    else:
        if found["labels"] != list(run.classes):
            problems.append("class labels")
        if "softmax" not in found["operations"] or "classify" not in found["operations"]:
            problems.append("operations")
    if problems:
        raise RuntimeError(
            f"{path}: the Core ML model differs from the run in {', '.join(problems)}"
        )
    return found


def _export_coreml(run, path, images, labels, quantize, calibration_images) -> MobileExport:
    wrapper = images_to_probabilities(run)
    with progress("converting to Core ML (coremltools)", None, "files"):
        model = _coreml_model(run, wrapper)
        if path.exists():
            shutil.rmtree(path)
        model.save(str(path))
    found = _check_coreml(run, path)
    h, w = run.preprocessing["size"]
    result = MobileExport(
        str(path),
        "coreml",
        _version("coremltools"),
        _size(path),
        None,  # Core ML predicts on Apple systems only
        [
            f"input: a {w}x{h} {found['input']['color']} image (pixels 0-255, normalised inside)",
            (
                f"outputs {', '.join(found['outputs'])}: each label's probability; the "
                f"{len(run.classes)} labels and their thresholds in the metadata"
                if run.multilabel is not None
                else f"classifier outputs {', '.join(found['outputs'])} with the "
                f"{len(found['labels'])} class labels of the run"
            ),
            f"operations: {', '.join(dict.fromkeys(found['operations']))}",
            "probabilities not compared: Core ML predicts on macOS and iOS only",
        ],
    )
    if quantize == "int8":
        import coremltools.optimize.coreml as cto

        config = cto.OptimizationConfig(
            global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
            )
        )
        int8_path = path.with_name(f"{path.stem}-int8{path.suffix}")
        with progress("int8 weights (coremltools)", None, "files"), _quiet():
            quantized = cto.linear_quantize_weights(model, config)
            if int8_path.exists():
                shutil.rmtree(int8_path)
            quantized.save(str(int8_path))
        _check_coreml(run, int8_path)
        result.int8_path = str(int8_path)
        result.int8 = {
            "weights": "int8 per channel (constexpr_affine_dequantize)",
            "accuracy": "not measured: Core ML predicts on macOS and iOS only",
            "size_bytes": {"fp32": _size(path), "int8": _size(int8_path)},
        }
    return result


def latency(predict, image: np.ndarray, runs: int = 50, seconds: float = 10.0) -> dict:
    """Median and 90th percentile of one-image predictions (after a warm-up), in ms;
    bounded by ``runs`` and ``seconds``."""
    predict(image)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < runs and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        predict(image)
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def runtime_predictor(path: str | Path):
    """images -> probabilities with the runtime of an exported file (.onnx, .ort, .pte);
    a file the runtime cannot load (truncated, corrupt) is refused in one line."""
    path = Path(path)
    loaders = {".onnx": _ort_predict, ".ort": _ort_predict, ".pte": _pte_predict}
    if path.suffix not in loaders:
        raise ValueError(f"{path}: no runtime on this machine for {path.suffix} files")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with _quiet():
            return loaders[path.suffix](path)[0]
    except Exception as e:  # each runtime has its own error types for a file it cannot load
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: its runtime cannot load it (truncated or corrupt? {reason}); "
            "export it again with cnnkit export"
        ) from None


__all__ = [
    "FORMATS",
    "MobileExport",
    "describe_coreml",
    "export_mobile",
    "latency",
    "read_pte_metadata",
    "runtime_predictor",
    "torch_probabilities",
]
