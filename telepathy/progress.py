"""Progress of long loops, with tqdm: a bar on a terminal, periodic log lines everywhere else.

* On a terminal: tqdm's bar, and while it is shown, log lines go through tqdm
  (``logging_redirect_tqdm``) so that they print above the bar instead of onto it.
* Elsewhere (a SLURM log, a piped output), a bar would fill the file with carriage returns
  and redraws: tqdm writes its line to the ``telepathy.progress`` logger instead, at the start,
  every ``EVERY_S`` seconds and at the end (``desc: n/total unit (pct) rate elapsed ETA``); the
  lines land in the run's ``train.log`` and in the SLURM log.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("telepathy.progress")

EVERY_S = 30.0  # seconds between two progress lines in a log
LINE = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) {rate_noinv_fmt} elapsed {elapsed} ETA {remaining}"
LINE += "{postfix}"


class _LogLines:
    """A file for tqdm that turns each of its refreshes into one log line (no cursor moves, no padding)."""

    def write(self, text: str) -> None:
        line = " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).split())
        if line:
            log.info("%s", line)

    def flush(self) -> None:
        pass


class _LogBar(tqdm):
    """tqdm whose line is written once per count: closing right after a refresh repeats nothing."""

    def display(self, msg=None, pos=None):
        if msg is None and getattr(self, "_shown_n", None) == self.n:
            return True
        self._shown_n = self.n
        return super().display(msg, pos)


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str = "it", initial: int = 0):
    """A tqdm (``update(n)``, ``set_postfix(..., refresh=False)``) for ``with progress(...) as bar``."""
    if sys.stderr.isatty():
        with logging_redirect_tqdm(), tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=5) as bar:
            yield bar
        return
    with _LogBar(
        total=total,
        initial=initial,
        desc=desc,
        unit=f" {unit}",  # "512.00 ex/s": the rate's unit after a space
        file=_LogLines(),
        mininterval=EVERY_S,
        bar_format=LINE.replace("{unit}", unit),
        position=0,  # a bar inside another (eval inside training) is a line of its own, not a cursor move
    ) as bar:
        yield bar
