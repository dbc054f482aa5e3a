import re

from cnnkit.progress import progress


def test_a_step_reports_one_line_with_its_count_time_and_rate_when_not_on_a_terminal(capsys):
    with progress("decoding", 30, unit="images") as advance:
        for _ in range(3):
            advance(10)
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays clean for --json
    assert re.fullmatch(r"decoding: 30 images in \d+\.\ds( \([\d,]+ images/s\))?\n", err)


def test_quiet_and_summary_off_print_nothing(capsys):
    with progress("features", 5, quiet=True) as advance:
        advance(5)
    with progress("features", 5, summary=False) as advance:
        advance(5)
    assert capsys.readouterr() == ("", "")


def test_the_line_is_printed_even_when_the_step_fails(capsys):
    try:
        with progress("report", 10) as advance:
            advance(4)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    err = capsys.readouterr().err
    assert "report: 4 images in" in err and err.endswith(", stopped\n")


def test_a_step_without_a_count_reports_its_time(capsys):
    with progress("int8 quantization", None):
        pass
    assert re.fullmatch(r"int8 quantization: \d+\.\ds\n", capsys.readouterr().err)


def test_evaluate_shows_its_long_step_on_stderr_and_keeps_json_clean(tiny_run, capsys):
    import json

    from cnnkit.cli import main

    assert main(["evaluate", str(tiny_run.path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["split"] == "test"
    assert re.search(r"^evaluating: 10,000 images in \d+\.\ds", err, re.MULTILINE)


def test_a_quiet_training_run_shows_no_progress(tmp_path, monkeypatch):
    """--quiet: no bar for the decoding step of a folder data set (nor any other)."""
    import cnnkit
    import cnnkit.progress as progress_module
    from conftest import make_photos

    shown = []
    real = progress_module._console
    monkeypatch.setattr(progress_module, "_console", lambda: shown.append(1) or real())
    root = make_photos(tmp_path / "photos", per_class=6)
    kw = dict(data=str(root), model="conv8-pool-fc16", epochs=1, image_size=16)
    cnnkit.train(**kw, runs_dir=str(tmp_path / "quiet"), quiet=True)
    assert shown == []
    with progress("decoding", 1) as advance:  # progress is back on after a quiet run
        advance(1)
    assert shown
