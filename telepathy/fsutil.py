"""File writes that other processes may read or repeat at the same time (and ``read_jsonl``,
which reads a JSON Lines file that one of them may still be appending to).

Jobs of one sweep share the model cache, the feature cache and the output root, and
SLURM can start two of them at the same moment. Two rules keep them out of each
other's way:

* a reader never sees half a file: ``atomic_path`` hands out a temporary name in the
  target's folder and renames it over the target only once it is complete (a job
  killed mid-write leaves a stray ``.tmp`` file, never a truncated target);
* work that two writers would both do in full (assembling a GGUF, converting a model)
  runs under ``file_lock``, and the second writer re-checks for the result after it
  gets the lock.

``file_lock`` is ``filelock.FileLock``: an ``fcntl.flock`` on a ``.lock`` file, which the
kernel drops when its process dies (even ``kill -9``), so a crashed job never leaves a lock
behind. It holds across nodes on NFSv4 and on Lustre/GPFS mounted with flock support (where
a file system has no flock, filelock falls back to a lock file holding the owner's pid).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """A non-blocking ``file_lock`` found the lock taken by another process."""


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True, waiting_message: str | None = None) -> Iterator[FileLock]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``blocking=False`` raises ``LockHeld`` at once when another process holds it;
    otherwise it waits, logging ``waiting_message`` (if given) when it has to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False)  # a new instance: a second holder in this process waits too
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if not blocking:
            raise LockHeld(str(path)) from None
        if waiting_message:
            log.warning("%s", waiting_message)
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``target``; renamed over it when the block ends without error.

    The caller writes the whole file to the yielded path (any writer that takes a
    path: ``save_file``, ``torch.save``, a package's ``assemble``); on an exception the
    temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # writers that refuse to overwrite (``assemble``) get a fresh name
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp names are private; other users of a shared scratch read it
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def read_jsonl(path: Path, *, live: bool = False, error: type[Exception] = ValueError) -> list[dict]:
    """Rows of a JSON Lines file; blank lines are skipped. A line that is not JSON raises
    ``error`` naming the file and line, except, when ``live`` (a log another process is still
    appending to), a last line without its newline: that one is half written, so it is
    skipped with a warning."""
    text = Path(path).read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if live and i == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}:{i}: skipped a partly written last line", stacklevel=2)
                continue
            raise error(f"{path}:{i}: not valid JSON ({err.msg})") from None
    return rows
