"""``cnnkit export RUN --format triton``: an NVIDIA Triton Inference Server model repository.

::

    DIR/<name>/config.pbtxt     the model configuration (commented)
    DIR/<name>/labels.txt       one class name per line, for Triton's classification extension
    DIR/<name>/1/model.onnx     the verified ONNX export (uint8 NCHW "images" -> "probabilities"
                                and, with the run's "unknown" rule, "ood_score")

The ONNX file is made and checked against PyTorch by ``export_onnx``. The repository is
then checked as far as a machine without a Triton server allows (``check_repository``):
config.pbtxt is parsed into Triton's own ``ModelConfig`` message (from tritonclient), and its
names, data types and dims are compared with the ONNX file's inputs and outputs as ONNX
Runtime reads them; labels.txt must name every output class. No Triton server is started.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cnnkit.deploy.export import (
    _session,
    export_metadata,
    export_onnx,
    installed_version,
    read_metadata,
)

BACKEND = "onnxruntime"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
VERSION = "1"
# The dynamic batcher waits at most this long for more requests to join a batch: 2 ms is
# small against a network round trip and a page's latency budget, and long enough for
# concurrent requests to a busy server to be merged. Raise it for throughput, lower it (or
# set 0) for latency, measuring with Triton's perf_analyzer.
MAX_QUEUE_DELAY_US = 2000
# Triton's docs advise against preferred_batch_size for most models (the batcher then forms
# the largest batch it can, up to max_batch_size, within the delay); it is written commented
# out, with sizes worth trying once perf_analyzer shows a benefit.
PREFERRED_BATCH_SIZES = (8, 32)
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
# ONNX Runtime's type strings -> Triton's DataType names
ORT_TO_TRITON = {
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int8)": "TYPE_INT8",
    "tensor(float16)": "TYPE_FP16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(bool)": "TYPE_BOOL",
}


class TritonRepositoryError(ValueError):
    """The model repository is not one Triton would load as cnnkit means it to."""


@dataclass
class TritonExport:
    repository: str  # DIR, what tritonserver --model-repository points at
    model_dir: str  # DIR/<name>
    name: str
    config: str  # DIR/<name>/config.pbtxt
    labels: str  # DIR/<name>/labels.txt
    model: str  # DIR/<name>/1/model.onnx
    max_batch_size: int
    parity: dict  # ONNX Runtime vs PyTorch on validation images (export_onnx)
    checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def command(self) -> str:
        """The command that serves the repository with Triton's container."""
        return server_command(self.repository)


def server_command(repository: str | Path) -> str:
    return (
        f"docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 "
        f"-v {Path(repository).resolve()}:/models {TRITON_IMAGE} "
        "tritonserver --model-repository=/models"
    )


def require() -> None:
    """Fail in one line when Triton's config schema (tritonclient[grpc]) is not installed."""
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"cnnkit export --format triton checks config.pbtxt against Triton's schema from "
            f"tritonclient[grpc], which cannot be imported ({e}): pip install 'cnnkit[triton]'"
        ) from None


def model_name(run_dir: str | Path) -> str:
    """A Triton model name from a run directory's name: letters, digits, '_' and '-'."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(run_dir).resolve().name).strip("_")
    return name or "model"


def _quote(text: str) -> str:
    from google.protobuf import text_encoding  # protobuf comes with onnx

    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def _dims(values) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def config_text(
    name: str,
    channels: int,
    size: tuple[int, int],
    classes: int,
    max_batch_size: int,
    params,
    score: bool = False,
) -> str:
    """config.pbtxt for the ONNX export: uint8 NCHW images in, FP32 probabilities out
    (``score``: and the FP32 out-of-distribution score of each image)."""
    h, w = size
    score_output = (
        """,
  {
    name: "ood_score"
    data_type: TYPE_FP32
    dims: [ 1 ]  # energy, logsumexp of the logits: "unknown" below cnnkit.rejection's threshold
    reshape: { shape: [ ] }  # the ONNX output is one value per image
  }"""
        if score
        else ""
    )
    preferred = [b for b in PREFERRED_BATCH_SIZES if b <= max_batch_size]
    parameters = "".join(
        f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}\n"
        for key, value in params.items()
    )
    return f"""\
# Triton model configuration written by cnnkit export --format triton.
name: {_quote(name)}
backend: "{BACKEND}"  # runs 1/{MODEL_FILE}
# Requests may carry up to max_batch_size images; dims below exclude that batch dimension
# (the ONNX file's first dimension is dynamic).
max_batch_size: {max_batch_size}
input [
  {{
    name: "images"
    data_type: TYPE_UINT8  # raw pixels; the model normalises them itself
    dims: {_dims([channels, h, w])}  # C, H, W
  }}
]
output [
  {{
    name: "probabilities"
    data_type: TYPE_FP32
    dims: {_dims([classes])}
    # Triton's classification extension: ask for class_count=k to get the top k as
    # "probability:index:label", labels from this file (one class per line, in order).
    label_filename: "{LABELS_FILE}"
  }}{score_output}
]
# Merges concurrent requests into one batch, waiting at most {MAX_QUEUE_DELAY_US} us for more
# to arrive. Uncomment preferred_batch_size only once perf_analyzer shows those sizes help.
dynamic_batching {{
  # preferred_batch_size: {_dims(preferred or [max_batch_size])}
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
# No instance_group: Triton's default places one instance of the model on each GPU it sees
# (ONNX Runtime's CUDA provider) and runs on the CPU when there is none, so the same
# repository serves on either. To pin it to CPUs with two instances, add:
# instance_group [ {{ kind: KIND_CPU, count: 2 }} ]
# cnnkit's class names and preprocessing, as JSON, for clients reading the configuration
# (GET /v2/models/{name}/config); the ONNX Runtime backend reads only the keys it knows.
{parameters}"""


def _read_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise TritonRepositoryError(
            f"{path}: not a valid Triton model configuration: {e}"
        ) from None


def check_repository(model_dir: str | Path) -> list[str]:
    """Check a model directory (``DIR/<name>``) without a Triton server; returns the checks
    done, raises TritonRepositoryError on the first failure."""
    import onnxruntime as ort
    from tritonclient.grpc import model_config_pb2

    model_dir = Path(model_dir)
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise TritonRepositoryError(f"{config_path} is missing")
    config = _read_config(config_path)
    checks = [
        "config.pbtxt parsed into Triton's ModelConfig (tritonclient "
        f"{installed_version('tritonclient') or '?'})"
    ]

    def fail(message: str):
        raise TritonRepositoryError(f"{config_path}: {message}")

    if config.name and config.name != model_dir.name:
        fail(f"name '{config.name}' differs from its directory '{model_dir.name}'")
    if config.backend != BACKEND and config.platform != "onnxruntime_onnx":
        fail(f"backend '{config.backend}' is not '{BACKEND}'")
    model_path = model_dir / VERSION / (config.default_model_filename or MODEL_FILE)
    if not model_path.is_file():
        fail(f"the model file {model_path} is missing")
    if config.max_batch_size < 0:
        fail(f"max_batch_size {config.max_batch_size} is negative")
    session = _session(model_path)
    checks.append(f"{VERSION}/{model_path.name} loads in ONNX Runtime {ort.__version__}")
    batched = config.max_batch_size > 0

    dtype_name = model_config_pb2.DataType.Name
    classes = None
    for kind, declared, actual in (
        ("input", config.input, session.get_inputs()),
        ("output", config.output, session.get_outputs()),
    ):
        onnx_by_name = {t.name: t for t in actual}
        if sorted(t.name for t in declared) != sorted(onnx_by_name):
            fail(
                f"{kind} names {[t.name for t in declared]} differ from the ONNX file's "
                f"{sorted(onnx_by_name)}"
            )
        for tensor in declared:
            onnx_tensor = onnx_by_name[tensor.name]
            want = ORT_TO_TRITON.get(onnx_tensor.type, onnx_tensor.type)
            if dtype_name(tensor.data_type) != want:
                fail(
                    f"{kind} '{tensor.name}' is {dtype_name(tensor.data_type)}; the ONNX "
                    f"file's is {onnx_tensor.type} ({want})"
                )
            shape = list(onnx_tensor.shape)
            if batched:
                if not shape or isinstance(shape[0], int):
                    fail(
                        f"max_batch_size is {config.max_batch_size} but the ONNX {kind} "
                        f"'{tensor.name}' has no dynamic batch dimension (shape {shape})"
                    )
                shape = shape[1:]
            onnx_dims = [d if isinstance(d, int) else -1 for d in shape]
            # reshape: the model's own shape, where Triton shows another (one value per
            # image, a 0-d tensor to the model, is dims [1] with reshape [])
            model_dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else None
            if (list(tensor.dims) if model_dims is None else model_dims) != onnx_dims:
                fail(
                    f"{kind} '{tensor.name}' dims {list(tensor.dims)} differ from the ONNX "
                    f"file's {onnx_dims}" + (" (without the batch dimension)" if batched else "")
                )
            if kind == "output" and tensor.label_filename:
                classes = (tensor.label_filename, tensor.dims[-1])
    checks.append(
        "input and output names, data types and dims match the ONNX file's"
        + (f" (dynamic batch dimension, max_batch_size {config.max_batch_size})" if batched else "")
    )
    if classes:
        filename, count = classes
        labels_path = model_dir / filename
        if not labels_path.is_file():
            fail(f"label_filename '{filename}' is missing")
        lines = labels_path.read_text(encoding="utf-8").splitlines()
        if len(lines) != count:
            fail(f"{filename} has {len(lines)} lines for {count} output classes")
        checks.append(f"{filename} names all {count} output classes")
    return checks


def export_triton(
    run, out: str | Path | None = None, *, name: str | None = None, max_batch_size: int = 64
) -> TritonExport:
    """Write a Triton model repository for ``run`` to ``out`` (default ``<run>/triton``)
    and check it; returns the paths and the checks done."""
    import json

    require()
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    name = name or model_name(run.path)
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"model name '{name}': use letters, digits, '_' and '-' only")
    bad = [c for c in run.classes if "\n" in c or "\r" in c or c != c.strip()]
    if bad:
        raise ValueError(f"class names {bad} cannot be lines of {LABELS_FILE}")
    repository = Path(out) if out else run.path / "triton"
    model_dir = repository / name
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / VERSION / MODEL_FILE
    result = export_onnx(run, onnx_path)  # checked against PyTorch; refuses a mismatch

    pre = run.preprocessing
    labels = model_dir / LABELS_FILE
    labels.write_text("".join(f"{c}\n" for c in run.classes), encoding="utf-8")
    params = {
        "cnnkit.classes": json.dumps(run.classes, ensure_ascii=False),
        "cnnkit.preprocessing": json.dumps(export_metadata(run)["preprocessing"]),
    }
    exported = read_metadata(onnx_path)
    rejection = exported.get("rejection")
    if rejection:
        params["cnnkit.rejection"] = json.dumps(rejection)
    if "multilabel" in exported:  # sigmoid "probabilities", a threshold per label
        params["cnnkit.multilabel"] = json.dumps(exported["multilabel"])
    config = model_dir / "config.pbtxt"
    config.write_text(
        config_text(
            name,
            pre["channels"],
            tuple(pre["size"]),
            len(run.classes),
            max_batch_size,
            params,
            score=bool(rejection),
        ),
        encoding="utf-8",
    )
    checks = [
        f"{VERSION}/{MODEL_FILE} agrees with PyTorch on {result.parity['images']:,} validation "
        f"images (top-1 {result.parity['top1_agreement']:.2%}, largest probability difference "
        f"{result.parity['max_probability_difference']:.1e})"
    ]
    checks += check_repository(model_dir)
    if labels.read_text(encoding="utf-8").splitlines() != list(run.classes):
        raise TritonRepositoryError(f"{labels} does not list the run's classes in order")
    checks.append(f"{LABELS_FILE} lists the run's classes in order")
    return TritonExport(
        repository=str(repository),
        model_dir=str(model_dir),
        name=name,
        config=str(config),
        labels=str(labels),
        model=str(onnx_path),
        max_batch_size=max_batch_size,
        parity=result.parity,
        checks=checks,
    )
