"""Progress: tqdm's bar on a terminal (log lines routed above it), tqdm's line as log lines elsewhere."""

import logging
import sys

from telepathy import progress


def test_on_a_terminal_log_lines_go_through_tqdm_while_a_bar_is_shown(monkeypatch):
    """Before: a log line printed onto the bar (the console handler wrote straight to the terminal)."""
    from tqdm.contrib.logging import _TqdmLoggingHandler

    console = logging.StreamHandler(sys.stdout)  # Hydra's console handler
    root = logging.getLogger()
    root.addHandler(console)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    try:
        with progress.progress(3, "train", unit="step") as bar:
            assert console not in root.handlers
            assert any(isinstance(h, _TqdmLoggingHandler) for h in root.handlers)  # tqdm.write: above the bar
            bar.update(3)
        assert console in root.handlers  # put back once the bar is gone
    finally:
        root.removeHandler(console)


def test_without_a_terminal_tqdm_writes_log_lines_without_cursor_moves_or_repeats(caplog, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line at every update
    with caplog.at_level(logging.INFO, logger="telepathy.progress"):
        with progress.progress(2, "train", unit="step") as outer:
            with progress.progress(4, "eval", unit="ex") as inner:  # nested: tqdm would move the cursor up
                inner.update(4)
            outer.set_postfix(loss="0.5000", refresh=False)  # as training.fit: the step's loss, then the count
            outer.update(2)
    lines = [r.getMessage() for r in caplog.records]
    assert all("\x1b" not in line and "  " not in line for line in lines), lines
    assert [line.split(" (")[0] for line in lines] == [
        "train: 0/2 step",
        "eval: 0/4 ex",
        "eval: 4/4 ex",
        "train: 2/2 step",
    ]
    assert lines[2].startswith("eval: 4/4 ex (100%) ") and " ex/s elapsed 00:00 ETA 00:00" in lines[2]
    assert lines[-1].endswith(", loss=0.5000")
