"""``fsutil.file_lock`` (filelock): one holder at a time across processes, released when its holder dies."""

import subprocess
import sys
import time

import pytest

from helpers import REPO
from telepathy.fsutil import LockHeld, file_lock

HOLD = """import sys, time
from telepathy.fsutil import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lock_held_by_another_process_is_refused_then_free_once_it_is_killed(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld), file_lock(lock, blocking=False):
            pass
        holder.kill()  # kill -9: no code of it runs; the kernel drops its flock
        holder.wait()
        t0 = time.monotonic()
        with file_lock(lock, blocking=False):
            with pytest.raises(LockHeld), file_lock(lock, blocking=False):  # a second holder in this process too
                pass
        assert time.monotonic() - t0 < 5 and lock.exists()  # the file stays: waiters share its inode
    finally:
        holder.kill()
        holder.wait()
