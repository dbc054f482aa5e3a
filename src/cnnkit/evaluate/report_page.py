"""The report's HTML page, rendered from the dict that report.json holds plus its images.

One function per section of the page, each returning its HTML; ``render_html`` joins them.
Images arrive as data: URIs, so the page is self-contained and opens from disk.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import NamedTuple

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
.caveat{padding:.6em .9em;border-left:5px solid #e8b44c;background:#fdf9f0}
"""


def _e(x) -> str:
    return html.escape(str(x))


def render_html(report: dict, images: dict) -> str:
    """The whole page for a report dict (see build_report) and its images (data: URIs)."""
    parts = [
        _header(report),
        _run_section(report["run"]),
        _curves_and_diagnosis_sections(report["diagnosis"], images),
        _metrics_section(report["metrics"], report["split"]),
        _confusion_section(report["most_confused"], images),
        _calibration_section(report["calibration"], images),
        *(_gallery_section(gallery, report, images) for gallery in GALLERIES),
        "</body></html>",
    ]
    return "\n".join(parts)


def _header(report: dict) -> str:
    """The document head, the title and the line saying which split the numbers are from."""
    r, m = report["run"], report["metrics"]
    name = _e(Path(r["path"]).name)
    return "\n".join(
        [
            f"<!doctype html><html><head><meta charset='utf-8'><title>cnnkit report: "
            f"{name}</title><style>{CSS}</style></head><body>",
            f"<h1>{name}</h1>",
            f"<p class='muted'>{_e(r['model'])} on {_e(r['data'])} &middot; every number below "
            f"is from the <b>{_e(report['split'])}</b> split ({m['num_images']:,} images) "
            f"unless it says otherwise</p>",
            # a report before split_reason / caveat existed has neither
            f"<p class='caveat'><b>Caveat:</b> {_e(report['caveat'])}</p>"
            if report.get("caveat")
            else "",
        ]
    )


def _run_section(run: dict) -> str:
    """What was trained, on what, for how long, and the resolved config."""
    hw = run["hardware"]
    rows = [
        ("data set", run["data"]),
        ("model", run["model"]),
        ("parameters", f"{run['parameters']:,}"),
        ("weights", run["weights"]),
        ("epochs", run["epochs"]),
        ("training time", f"{run['training_seconds']:.1f} s"),
        (
            "hardware",
            f"{hw['device']}, {hw['machine']}, torch {hw.get('torch', '?')}, "
            f"cnnkit {hw.get('cnnkit', '?')}",
        ),
        ("created", run["created"]),
    ]
    return "\n".join(
        [
            "<section id='run'><h2>Run</h2><table>",
            *(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows),
            "</table><details><summary>resolved config</summary><pre>"
            f"{_e(json.dumps(run['config'], indent=2))}</pre></details></section>",
        ]
    )


def _curves_and_diagnosis_sections(diagnosis: list[dict], images: dict) -> str:
    """The training curves plot, then one box per diagnosis verdict with its remedies."""
    out = ["<section id='curves'><h2>Training curves</h2>"]
    if "curves" in images:
        out.append(f"<img class='plot' alt='training curves' src='{images['curves']}'>")
    else:
        out.append("<p>no metrics.csv</p>")
    out.append("</section><section id='diagnosis'><h2>Diagnosis</h2>")
    for v in diagnosis:
        cls = "ok" if v["verdict"] == "healthy" else "bad"
        out.append(
            f"<div class='verdict {cls}' data-verdict='{_e(v['verdict'])}'>"
            f"<b>{_e(v['verdict'])}</b>: {_e(v['summary'])}"
        )
        if v["remedies"]:
            out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in v["remedies"]) + "</ul>")
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def _metrics_section(metrics: dict, split: str) -> str:
    """Accuracy, loss and top-k, the data warnings, then precision / recall / F1 per class."""
    m = metrics
    topk = " &middot; ".join(
        f"top-{k} <span data-metric='top{k}' data-value='{v}'>{v:.2%}</span>"
        for k, v in m["top_k_accuracy"].items()
        if k != "1"
    )
    out = [
        f"<section id='metrics'><h2>Metrics ({_e(split)})</h2>"
        f"<p><span class='big' data-metric='accuracy' data-value='{m['accuracy']}'>"
        f"{m['accuracy']:.2%}</span> accuracy &middot; loss {m['loss']:.4f}"
        f"{' &middot; ' + topk if topk else ''}</p>"
    ]
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
    return "\n".join(out)


def _confusion_section(most_confused: list[dict], images: dict) -> str:
    """The confusion matrix plots (counts and row-normalised) and the most confused pairs."""
    return "\n".join(
        [
            "<section id='confusion'><h2>Confusion matrix</h2>"
            f"<img class='plot' alt='confusion matrix, counts' "
            f"src='{images['confusion_counts']}'>"
            f"<img class='plot' alt='confusion matrix, row-normalised' "
            f"src='{images['confusion_normalized']}'>"
            "<h3>Most confused pairs</h3><table><tr><th>true</th><th>predicted as</th>"
            "<th>images</th><th>share of the true class</th></tr>",
            *(
                f"<tr><td>{_e(c['true'])}</td><td>{_e(c['predicted'])}</td>"
                f"<td>{c['count']}</td><td>{c['share_of_true_class']:.1%}</td></tr>"
                for c in most_confused
            ),
            "</table></section>",
        ]
    )


def _calibration_section(calib: dict, images: dict) -> str:
    """The expected calibration error and the reliability diagram; with temperature
    scaling, both before and after it."""
    ece = calib["ece"]
    scaled = ""
    plots = f"<img class='plot' alt='reliability diagram' src='{images['reliability']}'>"
    if "uncalibrated" in calib:
        before = calib["uncalibrated"]["ece"]
        scaled = (
            f" The probabilities are temperature-scaled (T = {calib['temperature']:.3f}, "
            f"fitted on the validation split): before scaling the ECE here was "
            f"<b data-metric='ece_uncalibrated' data-value='{before}'>{before:.4f}</b>."
        )
        plots = (
            f"<img class='plot' alt='reliability before scaling' "
            f"src='{images['reliability_before']}'> " + plots
        )
    return (
        "<section id='calibration'><h2>Calibration</h2><p>Expected calibration error "
        f"<b data-metric='ece' data-value='{ece}'>{ece:.4f}</b>: on average the "
        f"confidence differs from the accuracy by this much (0 is perfect).{scaled}</p>"
        f"{plots}</section>"
    )


class Gallery(NamedTuple):
    """One gallery of image cards: its entries in the report dict and its page section."""

    entries: str  # key of the report dict holding one dict per image
    section: str  # the section's id, also the key of its (image, overlay) pairs in images
    title: str
    intro: str


GALLERIES = (
    Gallery(
        "mistakes",
        "mistakes",
        "Most confident mistakes",
        "Wrong predictions the model was surest of, with Grad-CAM: red is where the "
        "evidence for the predicted class lies.",
    ),
    Gallery(
        "correct_sample",
        "correct",
        "A sample of correct predictions",
        "Chosen at random (seeded), with Grad-CAM for the predicted class.",
    ),
)


def _gallery_section(gallery: Gallery, report: dict, images: dict) -> str:
    """One card per image: the image, its Grad-CAM overlay, file, true and predicted class."""
    out = [
        f"<section id='{gallery.section}'><h2>{gallery.title}</h2><p class='muted'>"
        f"{gallery.intro} Layer: {_e(report['grad_cam_layer'])}.</p><div class='gallery'>"
    ]
    entries = report[gallery.entries]
    for e, (plain, cam) in zip(entries, images[gallery.section], strict=True):
        out.append(
            f"<div class='card'><img alt='image' src='{plain}'> "
            f"<img alt='Grad-CAM' src='{cam}'><br>{_e(e['file'])}<br>"
            f"true <b>{_e(e['true'])}</b>, predicted <b>{_e(e['predicted'])}</b> "
            f"{e['probability']:.1%}</div>"
        )
    if not entries:
        out.append("<p>none</p>")
    out.append("</div></section>")
    return "\n".join(out)
