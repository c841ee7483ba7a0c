"""The run's display: what a stage's libraries log, warn or print goes to its log file and is
counted; bars never hide one another."""

import logging
import warnings

from edgedistill import progress


def test_a_stage_sends_library_output_to_its_log_and_counts_the_warnings(tmp_path, capsys):
    log_file = tmp_path / "logs" / "export.log"
    with progress.stage("[3/6] export", log_file):
        logging.getLogger("optimum.exporters").warning("a library's warning")
        logging.getLogger("edgedistill.export").info("our own note")
        warnings.warn("a python warning", UserWarning)
        print("Collecting tensor data ...")  # a library printing its progress
    text = log_file.read_text()
    assert "a library's warning" in text and "our own note" in text
    assert "a python warning" in text and "Collecting tensor data" in text
    out, err = capsys.readouterr()
    assert "Collecting" not in out  # stdout stays free for --json
    assert "[3/6] export" in err and f"2 library warnings in {log_file}" in err


def test_a_hidden_bar_leaves_the_stages_other_bars_alone(tmp_path):
    with progress.stage("[5/6] evaluate", tmp_path / "evaluate.log"):
        display = progress._display
        display.disable = False  # as on a terminal
        with progress.Bar("teacher cache", 10, show=False):
            pass
        assert display.disable is False
        assert list(progress.track(range(3), "evaluate student")) == [0, 1, 2]
        assert not display.tasks or all(t.finished for t in display.tasks)
