"""``cnnkit report``: one self-contained HTML page (report.html, images embedded, opens from
disk) and report.json with every number on it.

Every number comes from one pass over one split (test if the run has one, else
validation), in file order, so a folder data set shows its real file names. The HTML is
rendered from the same dict that report.json holds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
from pathlib import Path

import torch

from cnnkit.data.augment import center_crop

from .diagnosis import diagnose
from .explain import GradCAM, overlay
from .metrics import ConfusionMatrix, calibration, classification_report


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
    from cnnkit.train.api import load_data

    data = load_data(
        run.config, None, split_file=run.path / "split.json", preprocessing=run.preprocessing
    )
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
    cam = GradCAM(run.model)
    images: dict = {"mistakes": [], "correct": []}
    entries: dict = {"mistakes": [], "correct": []}
    for kind, index in (("mistakes", wrong), ("correct", right)):
        if not len(index):
            continue
        raw = part.images[index.cpu()].to(run.device)
        heat, _ = cam(normalizer(raw), predicted[index])
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
            images[kind].append(
                (_image_uri(_to_pil(shown[j])), _image_uri(overlay(shown[j], heat[j])))
            )

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
        "grad_cam_layer": cam.layer,
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


# ---------------------------------------------------------------- HTML

CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1.5em;
color:#1d232a}
h1{margin-bottom:0}h2{border-bottom:2px solid #dde3ea;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{padding:.25em .7em;border-bottom:1px solid
#e5e9ee;text-align:right}td:first-child,th:first-child{text-align:left}
.muted{color:#66707a}.verdict{padding:.6em .9em;border-left:5px solid #4c9be8;margin:.6em 0;
background:#f4f8fc}.verdict.bad{border-color:#e8744c;background:#fdf5f2}
.verdict.ok{border-color:#46b36b;background:#f3faf5}img.plot{max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e0e5ea;padding:6px;
border-radius:6px;width:236px;font-size:13px}.card img{width:112px;height:112px;
object-fit:contain;image-rendering:pixelated}.big{font-size:1.6em;font-weight:600}
details pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:12px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def render_html(report: dict, images: dict) -> str:
    r, m = report["run"], report["metrics"]
    split = report["split"]
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>cnnkit report: "
        f"{_e(Path(r['path']).name)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(Path(r['path']).name)}</h1>",
        f"<p class='muted'>{_e(r['model'])} on {_e(r['data'])} &middot; every number below "
        f"is from the <b>{_e(split)}</b> split ({m['num_images']:,} images) unless it says "
        f"otherwise</p>",
    ]

    # run
    hw = r["hardware"]
    out.append("<section id='run'><h2>Run</h2><table>")
    rows = [
        ("data set", r["data"]),
        ("model", r["model"]),
        ("parameters", f"{r['parameters']:,}"),
        ("weights", r["weights"]),
        ("epochs", r["epochs"]),
        ("training time", f"{r['training_seconds']:.1f} s"),
        (
            "hardware",
            f"{hw['device']}, {hw['machine']}, torch {hw.get('torch', '?')}, "
            f"cnnkit {hw.get('cnnkit', '?')}",
        ),
        ("created", r["created"]),
    ]
    out += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows]
    out.append(
        "</table><details><summary>resolved config</summary><pre>"
        f"{_e(json.dumps(r['config'], indent=2))}</pre></details></section>"
    )

    # curves and diagnosis
    out.append("<section id='curves'><h2>Training curves</h2>")
    if "curves" in images:
        out.append(f"<img class='plot' alt='training curves' src='{images['curves']}'>")
    else:
        out.append("<p>no metrics.csv</p>")
    out.append("</section><section id='diagnosis'><h2>Diagnosis</h2>")
    for v in report["diagnosis"]:
        cls = "ok" if v["verdict"] == "healthy" else "bad"
        out.append(
            f"<div class='verdict {cls}' data-verdict='{_e(v['verdict'])}'>"
            f"<b>{_e(v['verdict'])}</b>: {_e(v['summary'])}"
        )
        if v["remedies"]:
            out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in v["remedies"]) + "</ul>")
        out.append("</div>")
    out.append("</section>")

    # metrics
    topk = " &middot; ".join(
        f"top-{k} <span data-metric='top{k}' data-value='{v}'>{v:.2%}</span>"
        for k, v in m["top_k_accuracy"].items()
        if k != "1"
    )
    out.append(
        f"<section id='metrics'><h2>Metrics ({_e(split)})</h2>"
        f"<p><span class='big' data-metric='accuracy' data-value='{m['accuracy']}'>"
        f"{m['accuracy']:.2%}</span> accuracy &middot; loss {m['loss']:.4f}"
        f"{' &middot; ' + topk if topk else ''}</p>"
    )
    out += [f"<p class='verdict bad'>{_e(w)}</p>" for w in m["warnings"]]
    out.append(
        "<table id='per-class'><tr><th>class</th><th>precision</th><th>recall</th>"
        "<th>F1</th><th>support</th></tr>"
    )
    for name, v in m["per_class"].items():
        out.append(
            f"<tr data-class='{_e(name)}'><td>{_e(name)}</td>"
            f"<td data-value='{v['precision']}'>{v['precision']:.4f}</td>"
            f"<td data-value='{v['recall']}'>{v['recall']:.4f}</td>"
            f"<td data-value='{v['f1']}'>{v['f1']:.4f}</td><td>{v['support']:,}</td></tr>"
        )
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        a = m[key]
        out.append(
            f"<tr data-average='{key}'><td><b>{label}</b></td>"
            f"<td>{a['precision']:.4f}</td><td>{a['recall']:.4f}</td>"
            f"<td data-value='{a['f1']}'>{a['f1']:.4f}</td>"
            f"<td>{m['num_images']:,}</td></tr>"
        )
    out.append("</table></section>")

    # confusion
    out.append(
        "<section id='confusion'><h2>Confusion matrix</h2>"
        f"<img class='plot' alt='confusion matrix, counts' "
        f"src='{images['confusion_counts']}'>"
        f"<img class='plot' alt='confusion matrix, row-normalised' "
        f"src='{images['confusion_normalized']}'>"
        "<h3>Most confused pairs</h3><table><tr><th>true</th><th>predicted as</th>"
        "<th>images</th><th>share of the true class</th></tr>"
    )
    out += [
        f"<tr><td>{_e(c['true'])}</td><td>{_e(c['predicted'])}</td><td>{c['count']}</td>"
        f"<td>{c['share_of_true_class']:.1%}</td></tr>"
        for c in report["most_confused"]
    ]
    out.append("</table></section>")

    # calibration
    ece = report["calibration"]["ece"]
    out.append(
        "<section id='calibration'><h2>Calibration</h2><p>Expected calibration error "
        f"<b data-metric='ece' data-value='{ece}'>{ece:.4f}</b>: on average the "
        "confidence differs from the accuracy by this much (0 is perfect).</p>"
        f"<img class='plot' alt='reliability diagram' src='{images['reliability']}'>"
        "</section>"
    )

    # galleries
    for key, section, title, intro in (
        (
            "mistakes",
            "mistakes",
            "Most confident mistakes",
            "Wrong predictions the model was surest of, with Grad-CAM: red is where the "
            "evidence for the predicted class lies.",
        ),
        (
            "correct_sample",
            "correct",
            "A sample of correct predictions",
            "Chosen at random (seeded), with Grad-CAM for the predicted class.",
        ),
    ):
        out.append(
            f"<section id='{section}'><h2>{title}</h2><p class='muted'>{intro} "
            f"Layer: {_e(report['grad_cam_layer'])}.</p><div class='gallery'>"
        )
        pics = images["mistakes" if key == "mistakes" else "correct"]
        for e, (plain, cam) in zip(report[key], pics, strict=True):
            out.append(
                f"<div class='card'><img alt='image' src='{plain}'> "
                f"<img alt='Grad-CAM' src='{cam}'><br>{_e(e['file'])}<br>"
                f"true <b>{_e(e['true'])}</b>, predicted <b>{_e(e['predicted'])}</b> "
                f"{e['probability']:.1%}</div>"
            )
        if not report[key]:
            out.append("<p>none</p>")
        out.append("</div></section>")
    out.append("</body></html>")
    return "\n".join(out)
