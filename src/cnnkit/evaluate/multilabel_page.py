"""``cnnkit report`` for a multi-label run: one self-contained page (report.html) and
report.json, from one pass over one split (test if the run has one, else validation).

Sections: the figures (mAP, example F1, Hamming loss, subset accuracy at the run's
thresholds); the learning curves; per label, AP, precision, recall, F1, threshold and
counts; each label's precision-recall curve with its threshold marked; which labels are
wrongly added to images holding which others (the co-occurrence of errors); and per label
the worst false positives (the most probable among images without it) and false negatives
(the least probable among images with it), each with Grad-CAM for that label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cnnkit.data.augment import center_crop
from cnnkit.data.memory import Normalizer
from cnnkit.progress import progress

from .explain import explain_images, last_conv_layer
from .multilabel import multilabel_report
from .plots import plot_confusion_matrix, plot_curves, pyplot
from .report import _image_uri, _png, _run_facts, _to_pil
from .report_page import CSS, _e, _run_section

MOST_LABELS_PLOTTED = 12  # precision-recall panels (the labels with the most images)


def error_cooccurrence(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(K, K) counts: row i, column j = images holding label i to which label j was
    wrongly added (a false positive of j). Images with no label are left out."""
    return targets.astype(np.int64).T @ (predicted & ~targets).astype(np.int64)


def _pr_curves(probs, targets, thresholds, classes, labels, path):
    """Small multiples: each label's precision against recall, its threshold marked."""
    plt = pyplot()
    cols = min(4, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    for ax, k in zip(axes.flat, labels, strict=False):
        order = np.argsort(-probs[:, k], kind="stable")
        hits = targets[order, k]
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        recall = tp / max(1, hits.sum())
        ax.plot(recall, precision, color="#4c9be8")
        at = probs[:, k] >= thresholds[k]
        p_at = (at & targets[:, k]).sum() / max(1, at.sum())
        r_at = (at & targets[:, k]).sum() / max(1, targets[:, k].sum())
        ax.plot([r_at], [p_at], "o", color="#e8744c", label=f"threshold {thresholds[k]:.2f}")
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), title=classes[k], xlabel="recall")
        ax.set_ylabel("precision")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_multilabel_report(run, split: str | None = None, gallery: int = 3):
    """(report dict for report.json, images as data URIs for the HTML)."""
    data = run.data()
    choice = run.choose_split(split, data)
    outputs = run.split_outputs(data, choice.split, progress_label="report: predictions")
    probs = outputs.logits.float().sigmoid().cpu().numpy()
    targets = outputs.labels.cpu().numpy() > 0.5
    thresholds = np.asarray(run.multilabel["thresholds"])
    predicted = probs >= thresholds
    metrics = multilabel_report(probs, targets, thresholds, run.classes)
    errors = error_cooccurrence(predicted, targets)
    history = run.history
    title = f"{data.name} {choice.split} split ({len(probs):,} images)"
    images = {}
    if history:
        images["curves"] = _png(lambda f: plot_curves(history, run.path.name, f, with_lr=True))
    plotted = sorted(range(len(run.classes)), key=lambda k: -targets[:, k].sum())
    plotted = sorted(plotted[:MOST_LABELS_PLOTTED])
    images["pr_curves"] = _png(
        lambda f: _pr_curves(probs, targets, thresholds, run.classes, plotted, f)
    )
    images["errors"] = _png(
        lambda f: plot_confusion_matrix(
            errors.tolist(), run.classes, f"{title}: labels wrongly added", f
        )
    )
    layer = last_conv_layer(run.model)
    entries, images["galleries"] = _worst(
        run, outputs.shown, probs, targets, predicted, plotted, gallery, layer
    )
    report = {
        "task": "multilabel",
        "run": _run_facts(run, data.name, history),
        "checkpoint": run.checkpoint_ref,
        "split": choice.split,
        "split_reason": choice.reason,
        "caveat": choice.caveat,
        "history": history,
        "metrics": metrics,
        "thresholds_fitted_on": run.multilabel.get("fitted_on"),
        "error_cooccurrence": errors.tolist(),  # [present label][label wrongly added]
        "worst": entries,
        "grad_cam_layer": layer,
    }
    return report, images


def _worst(run, read_rows, probs, targets, predicted, labels, per_label: int, layer: str):
    """Per label: its most probable false positives and least probable false negatives,
    facts and (image, Grad-CAM of that label) data URIs."""
    size = tuple(run.preprocessing["size"])
    normalizer = Normalizer(
        run.preprocessing["mean"], run.preprocessing["std"], run.device, crop=size
    )
    picks = []  # (label, kind, row)
    for k in labels:
        fp = np.flatnonzero(predicted[:, k] & ~targets[:, k])
        fn = np.flatnonzero(~predicted[:, k] & targets[:, k])
        picks += [(k, "false positive", int(i)) for i in fp[np.argsort(-probs[fp, k])][:per_label]]
        picks += [(k, "false negative", int(i)) for i in fn[np.argsort(probs[fn, k])][:per_label]]
    entries, uris = [], []
    if not picks:
        return entries, uris
    with progress("report: Grad-CAM", len(picks)):
        stored, names = read_rows([i for _, _, i in picks])
        raw = stored.to(run.device)
        target = torch.tensor([k for k, _, _ in picks], device=run.device)
        overlays, _ = explain_images(run.model, normalizer, raw, target, layer)
        shown = raw if tuple(raw.shape[-2:]) == size else center_crop(raw, size)
    for j, (k, kind, i) in enumerate(picks):
        entries.append(
            {
                "label": run.classes[k],
                "kind": kind,
                "file": names[j],
                "probability": float(probs[i, k]),
                "true_labels": [run.classes[c] for c in np.flatnonzero(targets[i])],
                "predicted_labels": [run.classes[c] for c in np.flatnonzero(predicted[i])],
            }
        )
        uris.append((_image_uri(_to_pil(shown[j])), _image_uri(overlays[j])))
    return entries, uris


def _label_row(name: str, v: dict) -> str:
    ap = "n/a" if v["ap"] is None else f"{v['ap']:.4f}"
    cells = [
        ap,
        f"{v['precision']:.4f}",
        f"{v['recall']:.4f}",
        f"{v['f1']:.4f}",
        f"{v['threshold']:.3f}",
        f"{v['support']:,}",
        f"{v['fp']:,}",
        f"{v['fn']:,}",
    ]
    return f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_multilabel_html(report: dict, images: dict) -> str:
    m, r = report["metrics"], report["run"]
    name = _e(Path(r["path"]).name)
    mean_ap = "n/a" if m["mAP"] is None else f"{m['mAP']:.4f}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>cnnkit report: {name}"
        f"</title><style>{CSS}</style></head><body><h1>{name}</h1>",
        f"<p class='muted'>{_e(r['model'])} on {_e(r['data'])} &middot; multi-label, "
        f"{len(r['classes'])} labels &middot; every number below is from the "
        f"<b>{_e(report['split'])}</b> split ({m['num_images']:,} images) "
        f"({_e(report['split_reason'])})</p>",
        f"<p class='caveat'>{_e(report['caveat'])}</p>" if report["caveat"] else "",
        f"<p><span class='big' data-metric='mAP' data-value='{m['mAP']}'>mAP {mean_ap}</span>"
        f" (macro; micro {m['mAP_micro']:.4f}) &middot; at the thresholds: example F1 "
        f"{m['example_f1']:.4f}, Hamming loss {m['hamming_loss']:.4f}, subset accuracy "
        f"{m['subset_accuracy']:.2%}</p>",
        _run_section(r),
    ]
    if "curves" in images:
        parts.append(f"<h2>Learning curves</h2><img class='plot' src='{images['curves']}'>")
    rows = "".join(_label_row(c, v) for c, v in m["per_label"].items())
    parts.append(
        "<section id='labels'><h2>Per label</h2><table><tr><th>label</th><th>AP</th>"
        "<th>precision</th><th>recall</th><th>F1</th><th>threshold</th><th>images</th>"
        f"<th>false positives</th><th>false negatives</th></tr>{rows}</table>"
        f"<img class='plot' src='{images['pr_curves']}' alt='precision-recall curves'>"
        "</section>"
    )
    parts.append(
        "<section id='errors'><h2>Labels wrongly added, by the labels present</h2><p "
        "class='muted'>Row: a label the image holds; column: a label the model added that "
        "it does not hold.</p>"
        f"<img class='plot' src='{images['errors']}' alt='co-occurrence of errors'></section>"
    )
    cards = "".join(
        f"<div class='card'><img src='{shown}'><img src='{overlay}'><br><b>{_e(e['kind'])}"
        f"</b> of {_e(e['label'])}: {e['probability']:.1%}<br>holds: "
        f"{_e(', '.join(e['true_labels']) or 'none')}<br>predicted: "
        f"{_e(', '.join(e['predicted_labels']) or 'none')}<br>"
        f"<span class='muted'>{_e(e['file'])}</span></div>"
        for e, (shown, overlay) in zip(report["worst"], images["galleries"], strict=True)
    )
    parts.append(
        "<section id='worst'><h2>Worst false positives and negatives, per label</h2><p "
        "class='muted'>Each image with Grad-CAM for the label in question.</p>"
        f"<div class='gallery'>{cards or 'none'}</div></section></body></html>"
    )
    return "\n".join(parts)


def write_multilabel_report(run, split: str | None = None, gallery: int = 3):
    """report.json and report.html of a multi-label run; (html path, json path)."""
    report, images = build_multilabel_report(run, split, gallery)
    json_path, html_path = run.path / "report.json", run.path / "report.html"
    json_path.write_text(json.dumps(report, indent=2))
    html_path.write_text(render_multilabel_html(report, images))
    return html_path, json_path
