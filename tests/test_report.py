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
