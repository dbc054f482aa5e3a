"""The report, opened in a real headless Chromium (Debian's), checked against report.json."""

import json

SECTIONS = [
    "run",
    "curves",
    "diagnosis",
    "metrics",
    "confusion",
    "calibration",
    "mistakes",
    "correct",
]


def check_page(browser, run) -> tuple[dict, object]:
    html_path, json_path = run.report()
    report = json.loads(json_path.read_text())
    page = browser.new_page()
    page.goto(html_path.as_uri())
    for section in SECTIONS:
        assert page.locator(f"section#{section}").count() == 1, section
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(images) >= 5 and all(done and width > 0 for done, width in images)

    m = report["metrics"]
    shown = page.locator("[data-metric=accuracy]")
    assert float(shown.get_attribute("data-value")) == m["accuracy"]
    assert shown.inner_text() == f"{m['accuracy']:.2%}"
    for name, values in m["per_class"].items():
        cells = page.locator(f"#per-class tr[data-class='{name}'] td[data-value]")
        assert [float(c) for c in cells.evaluate_all("els => els.map(e => e.dataset.value)")] == [
            values["precision"],
            values["recall"],
            values["f1"],
        ]
    macro = page.locator("tr[data-average=macro_avg] td[data-value]").get_attribute("data-value")
    assert float(macro) == m["macro_avg"]["f1"]
    ece = page.locator("[data-metric=ece]").get_attribute("data-value")
    assert float(ece) == report["calibration"]["ece"]
    verdicts = page.locator("[data-verdict]").evaluate_all("els => els.map(e => e.dataset.verdict)")
    assert verdicts == [v["verdict"] for v in report["diagnosis"]]
    assert page.locator("#mistakes .card").count() == len(report["mistakes"])
    assert page.locator("#correct .card").count() == len(report["correct_sample"])
    return report, page


def test_mnist_report_in_a_browser(browser, tiny_run):
    report, page = check_page(browser, tiny_run)
    assert report["split"] == "test" and report["metrics"]["num_images"] == 10_000
    assert report["mistakes"] and "mnist test #" in page.locator("#mistakes").inner_text()
    probs = [e["probability"] for e in report["mistakes"]]
    assert probs == sorted(probs, reverse=True)  # most confident first
    assert all(e["true"] != e["predicted"] for e in report["mistakes"])
    page.close()


def test_folder_report_shows_real_file_names(browser, cats_run):
    run = cats_run
    report, page = check_page(browser, run)
    assert report["split"] == "val" and report["metrics"]["num_images"] == 400
    files = [e["file"] for e in report["mistakes"] + report["correct_sample"]]
    assert all(f.startswith("validation/") and f.endswith(".jpg") for f in files)
    assert files[0] in page.locator("body").inner_text()
    page.close()


def hand_made_report() -> tuple[dict, dict]:
    """A small report dict (as build_report makes it) whose names need escaping."""
    classes = ["<b>cat</b>", "dog & 'friend'"]
    per_class = {
        "<b>cat</b>": {"precision": 0.75, "recall": 0.6, "f1": 2 / 3, "support": 5},
        "dog & 'friend'": {"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3},
    }
    mistake = {
        "file": "val/<odd>.png",
        "true": classes[0],
        "predicted": classes[1],
        "probability": 0.875,
        "true_probability": 0.125,
    }
    report = {
        "run": {
            "path": "/runs/cats<1>",
            "data": "pets",
            "model": "seed-cnn",
            "parameters": 12345,
            "classes": classes,
            "weights": "best.pt (epoch 2)",
            "training_seconds": 3.21,
            "epochs": 2,
            "created": "2024-05-01T12:00:00",
            "hardware": {"device": "cpu", "python": "3.12", "machine": "x86_64"},
            "config": {"model": {"name": "seed-cnn<x>"}},
        },
        "split": "val",
        "history": [],
        "diagnosis": [
            {
                "verdict": "underfitting",
                "summary": "accuracy < 85%",
                "evidence": {},
                "remedies": ["train <longer>"],
            }
        ],
        "metrics": {
            "num_images": 8,
            "accuracy": 0.625,
            "loss": 0.69314,
            "top_k_accuracy": {"1": 0.625, "2": 1.0},
            "warnings": ["class <b>cat</b> is rare"],
            "per_class": per_class,
            "macro_avg": {"precision": 0.625, "recall": 0.6333, "f1": 0.619},
            "weighted_avg": {"precision": 0.65625, "recall": 0.625, "f1": 0.631},
        },
        "most_confused": [
            {"true": classes[0], "predicted": classes[1], "count": 2, "share_of_true_class": 0.4}
        ],
        "calibration": {"ece": 0.0625, "bins": []},
        "mistakes": [mistake],
        "correct_sample": [],
        "grad_cam_layer": "features.0",
    }
    images = {
        "confusion_counts": "data:image/png;base64,COUNTS",
        "confusion_normalized": "data:image/png;base64,NORMALIZED",
        "reliability": "data:image/png;base64,RELIABILITY",
        "mistakes": [("data:image/png;base64,PLAIN", "data:image/png;base64,CAM")],
        "correct": [],
    }
    return report, images


def test_render_html_from_a_hand_made_report():
    """The page without training: every section once, the numbers, and names escaped."""
    from html.parser import HTMLParser

    from cnnkit.evaluate.report_page import render_html

    report, images = hand_made_report()
    page = render_html(report, images)

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.sections, self.data_values, self.classes = [], {}, []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "section":
                self.sections.append(a["id"])
            if "data-metric" in a:
                self.data_values[a["data-metric"]] = a["data-value"]
            if "data-class" in a:
                self.classes.append(a["data-class"])

    parsed = Collect()
    parsed.feed(page)
    assert parsed.sections == SECTIONS
    assert parsed.data_values == {"accuracy": "0.625", "top2": "1.0", "ece": "0.0625"}
    assert parsed.classes == ["<b>cat</b>", "dog & 'friend'"]  # unescaped by the parser
    assert page.startswith("<!doctype html>") and page.endswith("</body></html>")
    assert "<title>cnnkit report: cats&lt;1&gt;</title>" in page
    assert "62.50%</span> accuracy &middot; loss 0.6931 &middot; top-2" in page
    assert "<b>cat</b>" not in page and "<odd>" not in page and "<longer>" not in page
    assert page.count("&lt;b&gt;cat&lt;/b&gt;") == 5  # table row (2), warning, pair, card
    assert "dog &amp; &#x27;friend&#x27;" in page
    assert "val/&lt;odd&gt;.png" in page and "87.5%" in page
    assert "<p>no metrics.csv</p>" in page  # no curves image
    assert "<section id='correct'>" in page and "<p>none</p>" in page  # empty gallery
    assert "torch ?, cnnkit ?" in page  # versions missing from the checkpoint
    assert "&quot;seed-cnn&lt;x&gt;&quot;" in page  # the resolved config, escaped
    assert "src='data:image/png;base64,CAM'" in page
