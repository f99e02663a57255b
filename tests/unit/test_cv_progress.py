"""The CV's progress: a bar on a terminal, log lines elsewhere (batch_training.train.CvProgress)."""
from __future__ import annotations

import io
import logging

from batch_training.train import CvProgress

FOLD = {"als": {"map": 0.05}, "popularity": {"map": 0.02}}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_no_per_fit_lines(caplog):
    caplog.set_level(logging.INFO, logger="batch_training.train")
    terminal = Terminal()
    progress = CvProgress(total=4, n_folds=2, metric="map", stream=terminal)
    for fold in (1, 1, 2, 2):
        progress.fitted(fold, "rank=64", FOLD)
    progress.close()
    text = terminal.getvalue()
    assert "cross-validation" in text and "4/4" in text and "best als 0.0500" in text
    assert not [r for r in caplog.records if r.getMessage().startswith("CV fold")]


def test_a_log_file_gets_one_line_per_fit_with_the_time_left(caplog):
    caplog.set_level(logging.INFO, logger="batch_training.train")
    redirected = io.StringIO()                     # e.g. stderr to a file under a scheduler
    progress = CvProgress(total=2, n_folds=1, metric="map", stream=redirected)
    progress.fitted(1, "rank=64", FOLD)
    progress.fitted(1, "rank=128", FOLD)
    progress.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CV fold")]
    assert len(lines) == 2 and "[1/2 fits" in lines[0] and "[2/2 fits" in lines[1] and "s left]" in lines[0]
    assert redirected.getvalue() == ""
