"""``cnnkit report``: one self-contained HTML page (report.html, images embedded, opens from
disk) and report.json with every number on it.

Every number comes from one pass over one split (test if the run has one, else
validation), in file order, so a folder data set shows its real file names. The HTML is
rendered from the same dict that report.json holds.
"""

from __future__ import annotations

import base64
import io
import json
import platform
from pathlib import Path

import torch

from cnnkit.data.augment import center_crop

from .diagnosis import diagnose
from .explain import explain_images, last_conv_layer
from .metrics import ConfusionMatrix, calibration, classification_report
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
    from cnnkit.data.memory import Normalizer
    from cnnkit.evaluate.plots import plot_confusion_matrix, plot_curves, plot_reliability

    data = run.data()
    split = split or ("test" if data.test is not None and len(data.test) else "val")
    part = data.split(split)
    labels = part.labels.to(run.device)
    logits = run._logits(part.images)
    probs = logits.softmax(1)
    metrics = classification_report(logits, labels, run.classes, split)
    cm = ConfusionMatrix.from_counts(metrics.confusion_matrix)
    calib = calibration(probs.cpu(), labels.cpu())
    names = (
        [f for f, _ in data.files[split]]
        if data.files
        else [f"{data.name} {split} #{i}" for i in range(len(part))]
    )

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
    layer = last_conv_layer(run.model)
    images: dict = {"mistakes": [], "correct": []}
    entries: dict = {"mistakes": [], "correct": []}
    for kind, index in (("mistakes", wrong), ("correct", right)):
        if not len(index):
            continue
        raw = part.images[index.cpu()].to(run.device)
        overlays, _ = explain_images(run.model, normalizer, raw, predicted[index], layer)
        shown = raw if tuple(raw.shape[-2:]) == size else center_crop(raw, size)
        for j, i in enumerate(index.tolist()):
            entries[kind].append(
                {
                    "file": names[i],
                    "true": run.classes[int(labels[i])],
                    "predicted": run.classes[int(predicted[i])],
                    "probability": float(confidence[i]),
                    "true_probability": float(probs[i, labels[i]]),
                }
            )
            images[kind].append((_image_uri(_to_pil(shown[j])), _image_uri(overlays[j])))

    history = run.history
    title = f"{data.name} {split} split ({len(part):,} images)"
    if history:
        images["curves"] = _png(lambda f: plot_curves(history, run.path.name, f, with_lr=True))
    images["confusion_counts"] = _png(
        lambda f: plot_confusion_matrix(
            metrics.confusion_matrix, run.classes, f"{title}: counts", f
        )
    )
    images["confusion_normalized"] = _png(
        lambda f: plot_confusion_matrix(
            metrics.confusion_matrix,
            run.classes,
            f"{title}: share of each true class",
            f,
            normalized=True,
        )
    )
    images["reliability"] = _png(lambda f: plot_reliability(calib["bins"], calib["ece"], title, f))

    params = sum(p.numel() for p in run.model.parameters())
    versions = run.checkpoint_info.get("versions") or {}
    report = {
        "run": {
            "path": str(run.path),
            "data": data.name,
            "model": run.config.model.name,
            "parameters": params,
            "classes": run.classes,
            "weights": f"best.pt (epoch {run.checkpoint_info['epoch']})",
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
        },
        "split": split,
        "history": history,
        "diagnosis": [v.to_dict() for v in diagnose(history, run.preprocessing)],
        "metrics": metrics.to_dict(),
        "most_confused": [
            {
                "true": run.classes[t],
                "predicted": run.classes[p],
                "count": n,
                "share_of_true_class": n / max(1, int(cm.counts[t].sum())),
            }
            for t, p, n in cm.most_confused(10)
        ],
        "calibration": calib,
        "mistakes": entries["mistakes"],
        "correct_sample": entries["correct"],
        "grad_cam_layer": layer,
    }
    return report, images


def _to_pil(image: torch.Tensor):
    from PIL import Image

    a = image.detach().cpu()
    a = a[0] if a.shape[0] == 1 else a.permute(1, 2, 0)
    return Image.fromarray(a.numpy())


def write_report(run, split: str | None = None, gallery: int = 12) -> tuple[Path, Path]:
    """Write report.json and report.html into the run directory."""
    report, images = build_report(run, split, gallery)
    json_path, html_path = run.path / "report.json", run.path / "report.html"
    json_path.write_text(json.dumps(report, indent=2))
    html_path.write_text(render_html(report, images))
    return html_path, json_path
