"""``cnnkit report``: one self-contained HTML page (report.html, images embedded, opens from
disk) and report.json with every number on it.

Every number comes from one pass over one split (test if the run has one, else
validation, with the caveat that validation chose the weights), in file order, so a folder
data set shows its real file names. The HTML is rendered from the same dict that
report.json holds.
"""

from __future__ import annotations

import base64
import io
import json
import platform
from pathlib import Path

import torch

from cnnkit.data.augment import center_crop
from cnnkit.data.memory import Normalizer
from cnnkit.progress import progress

from .diagnosis import diagnose
from .explain import explain_images, last_conv_layer
from .metrics import ConfusionMatrix, calibration, classification_report
from .plots import plot_confusion_matrix, plot_curves, plot_reliability
from .report_page import render_html


def _png(draw) -> str:
    """A data: URI of the PNG that ``draw(file)`` writes."""
    buf = io.BytesIO()
    draw(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_uri(im, min_side: int = 112) -> str:
    from PIL import Image

    if min(im.size) < min_side:  # small digits: enlarge with hard pixels, not blur
        scale = -(-min_side // min(im.size))
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
    return _png(lambda f: im.save(f, format="PNG"))


def build_report(run, split: str | None = None, gallery: int = 12) -> tuple[dict, dict]:
    """(report dict for report.json, images as data URIs for the HTML)."""
    data = run.data()
    choice = run.choose_split(split, data)  # test if the run has one; else val, with a caveat
    split = choice.split
    outputs = run.split_outputs(data, split, progress_label="report: predictions")
    labels = outputs.labels
    probs = outputs.logits.softmax(1)
    metrics = classification_report(outputs.logits, labels, run.classes, split)
    calib = calibration(probs.cpu(), labels.cpu())
    if run.calibration and run.calibration.get("applied"):  # the model before scaling
        t = run.calibration["temperature"]
        raw = calibration((outputs.logits * t).softmax(1).cpu(), labels.cpu())
        calib["temperature"] = t
        calib["uncalibrated"] = raw
    layer = last_conv_layer(run.model)
    entries, images = _galleries(run, outputs.shown, labels, probs, gallery, layer)
    title = f"{data.name} {split} split ({len(labels):,} images)"
    history = run.history
    images.update(_plots(run, history, metrics.confusion_matrix, calib, title))
    report = {
        "run": _run_facts(run, data.name, history),
        "checkpoint": run.checkpoint_ref,  # so a newer checkpoint shows this is stale
        "split": split,
        "split_reason": choice.reason,
        "caveat": choice.caveat,  # None unless the numbers are optimistic (val or train)
        "history": history,
        "diagnosis": [v.to_dict() for v in diagnose(history, run.preprocessing, len(run.classes))],
        "metrics": metrics.to_dict(),
        "most_confused": _most_confused(metrics.confusion_matrix, run.classes),
        "calibration": calib,
        "mistakes": entries["mistakes"],
        "correct_sample": entries["correct"],
        "grad_cam_layer": layer,
    }
    return report, images


def _galleries(run, read_rows, labels, probs, gallery: int, layer: str) -> tuple[dict, dict]:
    """The most confident mistakes and a seeded sample of correct predictions: their facts,
    and (image, Grad-CAM overlay) data URIs of each. ``read_rows(rows)``: their images and
    names (SplitOutputs.shown)."""
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:gallery]
    right = torch.nonzero(predicted == labels).flatten()
    g = torch.Generator().manual_seed(run.config.train.seed)
    right = right[torch.randperm(len(right), generator=g)[:gallery].to(right.device)].sort().values

    size = tuple(run.preprocessing["size"])
    normalizer = Normalizer(
        run.preprocessing["mean"], run.preprocessing["std"], run.device, crop=size
    )
    images: dict = {"mistakes": [], "correct": []}
    entries: dict = {"mistakes": [], "correct": []}
    with progress("report: Grad-CAM", len(wrong) + len(right)) as advance:
        for kind, index in (("mistakes", wrong), ("correct", right)):
            if not len(index):
                continue
            stored, names = read_rows(index.tolist())
            raw = stored.to(run.device)
            overlays, _ = explain_images(run.model, normalizer, raw, predicted[index], layer)
            advance(len(index))
            shown = raw if tuple(raw.shape[-2:]) == size else center_crop(raw, size)
            for j, i in enumerate(index.tolist()):
                entries[kind].append(
                    {
                        "file": names[j],
                        "true": run.classes[int(labels[i])],
                        "predicted": run.classes[int(predicted[i])],
                        "probability": float(confidence[i]),
                        "true_probability": float(probs[i, labels[i]]),
                    }
                )
                images[kind].append((_image_uri(_to_pil(shown[j])), _image_uri(overlays[j])))
    return entries, images


def _plots(
    run, history: list[dict], confusion: list[list[int]], calib: dict, title: str
) -> dict[str, str]:
    """The curves, both confusion matrices and the reliability diagram as data URIs."""
    plots = {}
    if history:
        plots["curves"] = _png(lambda f: plot_curves(history, run.path.name, f, with_lr=True))
    plots["confusion_counts"] = _png(
        lambda f: plot_confusion_matrix(confusion, run.classes, f"{title}: counts", f)
    )
    plots["confusion_normalized"] = _png(
        lambda f: plot_confusion_matrix(
            confusion, run.classes, f"{title}: share of each true class", f, normalized=True
        )
    )
    plots["reliability"] = _png(lambda f: plot_reliability(calib["bins"], calib["ece"], title, f))
    if "uncalibrated" in calib:
        raw = calib["uncalibrated"]
        before = f"{title}, before temperature scaling"
        plots["reliability_before"] = _png(
            lambda f: plot_reliability(raw["bins"], raw["ece"], before, f)
        )
    return plots


def _run_facts(run, data_name: str, history: list[dict]) -> dict:
    """What was trained, how long, on what hardware and versions, with which settings."""
    versions = run.checkpoint_info.get("versions") or {}
    return {
        "path": str(run.path),
        "data": data_name,
        "model": run.config.model.name,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "classes": run.classes,
        "weights": f"{run.checkpoint_ref['file']} (epoch {run.checkpoint_info['epoch']})",
        "training_seconds": round(sum(r["seconds"] for r in history), 2),
        "epochs": len(history),
        "created": run.checkpoint_info.get("created"),
        "hardware": {
            "device": str(run.device),
            "python": platform.python_version(),
            "machine": platform.machine(),
            **versions,
        },
        "config": run.config.to_dict(),
    }


def _most_confused(confusion: list[list[int]], classes: list[str], n: int = 10) -> list[dict]:
    cm = ConfusionMatrix.from_counts(confusion)
    return [
        {
            "true": classes[t],
            "predicted": classes[p],
            "count": count,
            "share_of_true_class": count / max(1, int(cm.counts[t].sum())),
        }
        for t, p, count in cm.most_confused(n)
    ]


def _to_pil(image: torch.Tensor):
    from PIL import Image

    a = image.detach().cpu()
    a = a[0] if a.shape[0] == 1 else a.permute(1, 2, 0)
    return Image.fromarray(a.numpy())


def write_report(run, split: str | None = None, gallery: int = 12) -> tuple[Path, Path]:
    """Write report.json and report.html into the run directory."""
    run.require_single_label("this report (multi-label: evaluate/multilabel_page.py)")
    report, images = build_report(run, split, gallery)
    json_path, html_path = run.path / "report.json", run.path / "report.html"
    json_path.write_text(json.dumps(report, indent=2))
    html_path.write_text(render_html(report, images))
    return html_path, json_path
