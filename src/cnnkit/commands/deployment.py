"""export, serve and predict: a trained run as a file, a service or predictions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import _check_writable, _log_to_mlflow, _require_deploy_extras


def cmd_export(args) -> int:

    _require_deploy_extras("export", "onnx", "onnxruntime", "onnxscript")
    if args.format == "webapp":
        return _export_webapp(args)
    if args.format == "triton":
        return _export_triton(args)
    if args.format != "onnx":
        return _export_mobile(args)
    from cnnkit.deploy.export import export_onnx

    run = _load_for_export(args)
    out = Path(args.out) if args.out else run.path / "model.onnx"
    _check_writable(out.parent, "choose a writable place with --out FILE.onnx")
    result = export_onnx(run, out, layout=args.layout, quantize=args.quantize)
    check = result.parity
    print(
        f"wrote {result.path} (uint8 {args.layout.upper()} input, normalisation, classes "
        "and provenance inside)"
    )
    print(_parity_line(check, " with ONNX Runtime"))
    if result.int8:
        q = result.int8
        speed = q["images_per_s"]["batch_32"]
        print(
            f"wrote {result.int8_path}: {_int8_quality(q)}; images/s at batch 32: torch "
            f"{speed['torch']:,}, ONNX fp32 "
            f"{speed['onnx_fp32']:,}, int8 {speed['onnx_int8']:,}; size "
            f"{q['size_bytes']['fp32'] / 1e6:.2f} -> {q['size_bytes']['int8'] / 1e6:.2f} MB"
        )
    details = Path(result.path).with_suffix(".json")
    print(f"details: {details}")
    made = [Path(f) for f in (result.path, details, result.int8_path) if f]
    _log_to_mlflow(run.path, made, "export")
    return 0


def _int8_quality(q: dict) -> str:
    """How the int8 file scores beside the float one: accuracy, or mAP and label sets."""
    if "mAP_int8" in q:
        return (
            f"mAP {q['mAP_int8']:.4f} vs {q['mAP_fp32']:.4f} fp32, example F1 "
            f"{q['example_f1_int8']:.4f} vs {q['example_f1_fp32']:.4f}, the same label set for "
            f"{q['label_set_agreement_with_fp32']:.2%} of {q['images']:,} validation images"
        )
    return (
        f"accuracy {q['accuracy_int8']:.2%} vs {q['accuracy_fp32']:.2%} fp32 "
        f"({q['accuracy_change_points']:+.2f} points)"
    )


def _load_for_export(args):
    """The run to export; ``--reject off``: without its "unknown" rule (no ``ood_score``
    output, no threshold in the file)."""
    import cnnkit

    run = cnnkit.load_run(args.run, weights=args.weights, device="cpu")
    if args.reject == "off":
        run.rejection = None
    return run


def _parity_line(check: dict, runtime: str = "") -> str:
    """How an exported file compared with PyTorch, in one line."""
    return (
        f"checked on {check['images']:,} validation images{runtime}: top-1 agreement "
        f"{check['top1_agreement']:.2%}, largest probability difference "
        f"{check['max_probability_difference']:.1e}"
    )


def _export_mobile(args) -> int:
    """``cnnkit export RUN --format ort|executorch|coreml``: a file for a phone's runtime."""
    from cnnkit.deploy.mobile import FORMATS, export_mobile, require

    if args.layout != "nchw":
        raise ValueError(f"--layout is for --format onnx; --format {args.format} takes NCHW")
    require(args.format)  # before loading anything: a missing converter fails at once
    run = _load_for_export(args)
    out = Path(args.out) if args.out else run.path / f"model{FORMATS[args.format]}"
    _check_writable(out.parent, f"choose a writable place with --out FILE{FORMATS[args.format]}")
    result = export_mobile(run, args.format, out, quantize=args.quantize)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.runtime})")
    check = result.parity
    if check is not None:
        print(_parity_line(check))
    for line in result.checked:
        print(f"  {line}")
    if result.int8 and "refused" in result.int8:
        print(f"int8 refused: {result.int8['refused']}")
    elif result.int8:
        q = result.int8
        size = q["size_bytes"]
        change = q["accuracy"] if "accuracy" in q else _int8_quality(q)
        print(
            f"wrote {result.int8_path}: {change}; size {size['fp32'] / 1e6:.2f} -> "
            f"{size['int8'] / 1e6:.2f} MB"
        )
    print(f"details: {result.path}.json")
    return 0


def _export_triton(args) -> int:
    """``cnnkit export RUN --format triton``: an NVIDIA Triton model repository folder."""
    from cnnkit.deploy.triton import export_triton, require

    if args.quantize:
        raise ValueError("--quantize is for --format onnx; the Triton repository holds fp32")
    if args.layout != "nchw":
        raise ValueError("--layout is for --format onnx; the Triton repository takes NCHW")
    require()  # before loading anything: a missing tritonclient fails at once
    run = _load_for_export(args)
    out = Path(args.out) if args.out else run.path / "triton"
    _check_writable(out, "choose a writable place with --out DIR")
    result = export_triton(run, out)
    print(
        f"wrote {result.model_dir}/: config.pbtxt, labels.txt, 1/model.onnx (model "
        f"'{result.name}', uint8 NCHW 'images' -> FP32 'probabilities', dynamic batching up "
        f"to {result.max_batch_size})"
    )
    print("checked (no Triton server was run):")
    for line in result.checks:
        print(f"  {line}")
    print(f"serve it with Triton (add --gpus all for GPUs): {result.command()}")
    print(
        "  <yy.mm>: a tritonserver release on NGC whose CUDA suits your driver; the -py3 "
        "images include the ONNX Runtime backend"
    )
    return 0


def _export_webapp(args) -> int:
    """``cnnkit export RUN --format webapp``: the browser app folder."""
    from cnnkit.deploy.webapp import check_output, ensure_ort_web, export_webapp

    if args.quantize:
        raise ValueError("--quantize is for --format onnx; the web app runs the fp32 model")
    if args.layout != "nchw":
        raise ValueError("--layout is for --format onnx; the web app feeds the model NCHW")
    run = _load_for_export(args)
    out = Path(args.out) if args.out else run.path / "webapp"
    _check_writable(out.parent, "choose a writable place with --out DIR")
    check_output(out)  # not a folder of other files
    package = ensure_ort_web()  # before the export: a missing runtime fails at once
    result = export_webapp(run, out, ort_web=package)
    check = result.parity
    size = sum(result.files.values())
    print(
        f"wrote {result.path}/ ({len(result.files)} files, {size / 1e6:.1f} MB, ONNX Runtime "
        f"Web {result.ort_web}): open index.html from any static host (HTTPS or localhost "
        "for offline use and the camera), e.g. python -m http.server -d "
        f"{result.path} 8000"
    )
    print(_parity_line(check, " with ONNX Runtime"))
    print(f"details: {Path(result.path) / 'config.json'}")
    return 0


def cmd_serve(args) -> int:
    onnx_backend = args.backend == "onnx" or Path(args.model).suffix == ".onnx"
    _require_deploy_extras(
        "serve",
        "fastapi",
        "uvicorn",
        "prometheus_client",
        "python_multipart",  # form uploads, the page's among them
        *(("onnx", "onnxruntime") if onnx_backend else ()),
    )
    from cnnkit.deploy.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        backend=args.backend,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        workers=args.workers,
        reject=args.reject == "on",
        **{  # only what was given: the service keeps its own defaults for the rest
            name: value
            for name, value in (
                ("max_request_pixels", args.max_request_pixels),
                ("decode_threads", args.decode_threads),
                ("upload_timeout_s", args.upload_timeout),
                ("header_timeout_s", args.header_timeout),
                ("max_queue", args.max_queue),
            )
            if value is not None
        },
    )
    return 0


def _image_files(arguments: list[str]) -> list[str]:
    """The files as given, each folder replaced by every image file under it (recursively,
    sorted; hidden files and folders left out, as the folder data sets do)."""
    from cnnkit.data.folder import IMAGE_EXTENSIONS, find_image_files

    files = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            files.append(argument)  # a missing or unreadable file gets its own error line
            continue
        found = find_image_files(folder)  # as a folder data set finds them
        if not found:
            raise ValueError(
                f"{folder}: no image files in this folder or below "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files += map(str, found)
    return files


# Images decoded and predicted at a time: a folder of any size needs bounded memory.
PREDICT_CHUNK = 256


def _write_predictions(path: Path, document: dict, top_k: int) -> None:
    """``document`` (as --json prints it) as JSON, or as CSV: a row per image with its
    ``top_k`` classes and probabilities, most likely first, or its error; with an "unknown"
    rule, the answer (a class or "unknown") and the out-of-distribution score too."""
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(document, indent=2) + "\n")
        return
    import csv

    ranks = range(1, top_k + 1)
    header = ["file", *(f"{kind}_{i}" for i in ranks for kind in ("class", "probability"))]
    scored = any("ood" in p for p in document["predictions"])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*header, *(["answer", "ood_score"] if scored else []), "error"])
        for prediction in document["predictions"]:
            cells = [prediction["source"]]
            for i in ranks:
                top = prediction.get("top", [])
                ranked = top[i - 1] if i <= len(top) else None
                cells += [ranked["class"], f"{ranked['probability']:.6f}"] if ranked else ["", ""]
            if scored:
                ood = prediction.get("ood")
                cells += [prediction.get("label", ""), f"{ood['value']:.6f}" if ood else ""]
            writer.writerow([*cells, prediction.get("error", "")])


def _answer(prediction) -> str:
    """The predicted class, or "unknown" with the score that fell below the threshold;
    multi-label, the labels over their thresholds."""
    if prediction.labels == []:
        return "(no label over its threshold)"
    if not prediction.unknown:
        return prediction.label
    rule = prediction.rule
    return (
        f"unknown ({rule['score']} {prediction.ood_score:.3f} < threshold "
        f"{rule['threshold']:.3f}; --reject off to answer anyway)"
    )


def cmd_predict(args) -> int:
    import cnnkit

    output = Path(args.output) if args.output else None
    if output is not None:  # refused before the model is loaded or an image decoded
        if output.suffix.lower() not in (".csv", ".json"):
            raise ValueError(f"--output must be a .csv or .json file, got '{output}'")
        _check_writable(output.parent, "choose another --output")
    files = _image_files(args.files)
    if Path(args.run).suffix == ".onnx":
        _require_deploy_extras("predict", "onnx", "onnxruntime")
    run = cnnkit.load(args.run, weights=args.weights, device=args.device)  # run or .onnx
    reject = args.reject == "on"
    results = []
    for start in range(0, len(files), PREDICT_CHUNK):
        chunk = run.predict(files[start : start + PREDICT_CHUNK], top_k=args.top_k, reject=reject)
        results += chunk
        if args.json:
            continue
        for r in chunk:  # as they come: a large folder shows progress
            if r.error:
                print(f"error: {r.error}", file=sys.stderr)
            elif output is None:
                top = ", ".join(f"{c} {p:.1%}" for c, p in r.top)
                print(f"{r.source}: {_answer(r)}  ({top})")
    failed = [r for r in results if r.error]
    document = {"run": str(run.path), "predictions": [r.to_dict() for r in results]}
    if args.json:
        print(json.dumps(document, indent=2))
    if output is not None:
        _write_predictions(output, document, min(args.top_k, len(run.classes)))
        errors = f" ({len(failed):,} could not be read)" if failed else ""
        summary = f"wrote {len(results):,} predictions{errors} to {output}"
        print(summary, file=sys.stderr if args.json else sys.stdout)  # stdout holds the JSON
    return 1 if failed else 0
