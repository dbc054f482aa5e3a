"""The label-error audit's HTML page: what was audited and how, then one card per suspect
(the image, its given and suggested label, both probabilities), most suspicious first.
Self-contained: the images are data: URIs."""

from __future__ import annotations

import html

import torch

from .report import _image_uri
from .report_page import CSS


def image_uri(image: torch.Tensor) -> str:
    """A uint8 (C, H, W) image as a PNG data: URI, small ones enlarged pixel-exact."""
    from PIL import Image

    array = image.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    return _image_uri(pil)


def render_audit_html(summary: dict, cards: list[tuple[dict, str]]) -> str:
    """``summary``: AuditResult.to_dict(); ``cards``: (issue row, image data URI)."""
    e = html.escape
    head = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>label audit: "
        f"{e(summary['data'])}</title><style>{CSS}</style></head><body>"
        f"<h1>Label audit: {e(summary['data'])}</h1>"
        f"<p>{summary['images']:,} images, {len(summary['classes'])} classes. Out-of-sample "
        f"probabilities: {e(summary['method'])} (cross-validated accuracy against the given "
        f"labels {summary['cross_validated_accuracy']:.2%}). Confident learning flags "
        f"<b>{summary['flagged']:,}</b> images as likely label errors; the "
        f"{len(cards)} most suspicious are below, lowest probability of the given label first."
        f"</p><p class='muted'>To act on them: edit audit.csv (delete the rows you disagree "
        f"with; change <code>label</code> where the suggestion is wrong too), then train with "
        f"<code>--relabel audit.csv</code> or <code>--exclude audit.csv</code>.</p>"
        "<div class='gallery'>"
    )
    body = [
        f"<div class='card'><img alt='image' src='{uri}'><br>#{row['rank']} "
        f"{e(row['name'])}<br>given <b>{e(row['given'])}</b> "
        f"{row['given_probability']:.1%}<br>suggested <b>{e(row['suggested'])}</b> "
        f"{row['suggested_probability']:.1%}</div>"
        for row, uri in cards
    ]
    return head + "\n".join(body) + ("" if cards else "<p>none</p>") + "</div></body></html>"
