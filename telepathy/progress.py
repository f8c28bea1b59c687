"""Progress of long loops: a tqdm bar on a terminal, periodic log lines everywhere else.

A SLURM log or a piped output cannot show a bar (it fills with carriage returns and
redraws), so without a TTY the same calls log ``desc: n/total unit (pct) rate ETA`` at the
start, every ``LogProgress.EVERY_S`` seconds and at the end, through ``logging``: the
lines land in the run's ``train.log`` and in the SLURM log.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("telepathy.progress")


def progress(total: int, desc: str, unit: str = "it", initial: int = 0):
    """A context manager with tqdm's ``update(n)`` and ``set_postfix(**kw)``."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, mininterval=5)
    return LogProgress(total, desc, unit, initial)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogProgress:
    EVERY_S = 30.0

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start = initial
        self.t0 = time.monotonic()
        self.postfix = ""
        self._last = self.t0
        self._report()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.n != self._reported:
            self._report()

    def set_postfix(self, **values) -> None:
        self.postfix = " " + " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.EVERY_S or self.n >= self.total:
            self._last = now
            self._report()

    def _report(self) -> None:
        self._reported = self.n
        elapsed = time.monotonic() - self.t0
        done = self.n - self.start
        rate = done / elapsed if done and elapsed > 0 else None
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        speed = f" {rate:.2f} {self.unit}/s" if rate else ""
        eta = _duration((self.total - self.n) / rate) if rate else "?"
        log.info(
            "%s: %d/%d %s%s%s elapsed %s ETA %s%s",
            self.desc,
            self.n,
            self.total,
            self.unit,
            pct,
            speed,
            _duration(elapsed),
            eta,
            self.postfix,
        )
