"""One live job per run dir, and a heartbeat that tells the status command it is alive.

Why both:

* **The lock.** Two launches of the same sweep, a manual rerun next to a queued job,
  or a requeue racing a job that is still stopping would put two processes in one run
  dir: both train, both append to ``log.jsonl``, both write ``result.json``. ``hold``
  takes an exclusive ``flock`` on ``<run_dir>/.run.lock`` before anything is written;
  a second job exits at once with "already running as job N" and writes nothing. The
  kernel drops the lock when its process dies (``kill -9``, node loss), so a dead job
  never blocks the requeued one.
* **The heartbeat.** A run killed without a signal (``kill -9`` outside SLURM, OOM
  killer, node loss without a manifest) leaves ``result.json`` at ``running`` for good.
  While the run holds its lock a thread rewrites ``heartbeat.json`` (host, pid, SLURM
  job, time) every ``run.heartbeat_s`` seconds; ``telepathy.cluster.status`` calls a
  run whose process is gone, or whose heartbeat is older than ``STALE_BEATS`` beats,
  ``interrupted (stale)``: relaunching resumes it from its last checkpoint.

On a filesystem without ``flock`` support (Lustre mounted without ``-o flock``) the
lock degrades to the heartbeat: a fresh heartbeat of another live job refuses the run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from telepathy.fsutil import LockHeld, file_lock, read_json
from telepathy.results import write_json

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
HEARTBEAT_FILE = "heartbeat.json"
STALE_BEATS = 4  # a heartbeat older than this many intervals means the process is gone


class RunLocked(RuntimeError):
    """Another live job holds this run dir; this one must not write anything."""


def job_id() -> str | None:
    """This process's SLURM job as the manifests name it (``<array>_<task>`` for array tasks)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def read_heartbeat(run_dir: Path) -> dict | None:
    """The run dir's heartbeat, or None when it has none or it cannot be read (damaged on disk)."""
    try:
        beat = read_json(Path(run_dir) / HEARTBEAT_FILE)
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def staleness(beat: dict | None, now: float | None = None) -> str | None:
    """Why the process behind a heartbeat is gone ("pid 123 on this host has exited", "no
    heartbeat for 300s"), or None when it may still be alive (or there is no heartbeat)."""
    if not beat:
        return None
    now = time.time() if now is None else now
    if beat.get("host") == socket.gethostname() and not _pid_alive(int(beat.get("pid", 0))):
        return f"pid {beat.get('pid')} on {beat.get('host')} has exited"
    age = now - float(beat.get("time", 0))
    if age > STALE_BEATS * float(beat.get("interval_s", 30)):
        return f"no heartbeat for {age:.0f}s from {beat.get('host')} (pid {beat.get('pid')})"
    return None


def _who(beat: dict | None) -> str:
    if not beat:
        return "another process (no heartbeat yet)"
    age = time.time() - float(beat.get("time", 0))
    return (
        f"job {beat.get('slurm_job_id') or '-'} on {beat.get('host')} (pid {beat.get('pid')}, heartbeat {age:.0f}s ago)"
    )


class Lease:
    """This job's hold on a run dir: the heartbeat it rewrites, and what the previous holder left.

    ``previous`` is the heartbeat found when the hold began (None if none): when that attempt
    was killed without a signal, its last beat is when it ended (``results.earlier_attempts``).
    ``note(**fields)`` adds fields to every beat from now on (the lifecycle keeps the run's
    ``attempts`` there, so they survive a result.json that is lost or damaged).
    """

    def __init__(self, run_dir: Path, interval_s: float, previous: dict | None):
        self.path = Path(run_dir) / HEARTBEAT_FILE
        self.interval_s = interval_s
        self.previous = previous
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.fields: dict = {}
        self._lock = threading.Lock()

    def beat(self) -> None:
        with self._lock:
            write_json(
                self.path,
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "slurm_job_id": job_id(),
                    "started_at": self.started,
                    "time": time.time(),
                    "interval_s": self.interval_s,
                    **self.fields,
                },
            )

    def note(self, **fields) -> None:
        """Keep ``fields`` in the heartbeat (written now, and in every later beat)."""
        with self._lock:
            self.fields.update(fields)
        try:
            self.beat()
        except OSError as err:  # a full or flaky disk must not kill the run
            log.warning("heartbeat not written: %s", err)


@contextlib.contextmanager
def hold(run_dir: Path, interval_s: float = 30.0) -> Iterator[Lease]:
    """Own ``run_dir`` for the ``with`` block: lock it (or raise RunLocked) and keep a heartbeat."""
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(run_dir / LOCK_FILE, blocking=False))
        except LockHeld:
            raise RunLocked(
                f"{run_dir} is already running as {_who(read_heartbeat(run_dir))}; this job exits without touching it"
            ) from None
        except OSError as err:  # no flock on this filesystem: fall back to the heartbeat
            beat = read_heartbeat(run_dir)
            if (
                beat
                and beat.get("pid") != os.getpid()
                and staleness(beat) is None
                and beat.get("slurm_job_id") != job_id()
            ):
                raise RunLocked(
                    f"{run_dir} is already running as {_who(beat)} (no file locks here: "
                    f"{err}); this job exits without touching it"
                ) from None
            log.warning("run-dir lock unavailable (%s); relying on the heartbeat", err)
        lease = Lease(run_dir, interval_s, read_heartbeat(run_dir))
        lease.beat()
        stop = threading.Event()

        def loop():
            while not stop.wait(interval_s):
                try:
                    lease.beat()
                except OSError as err:  # a full or flaky disk must not kill the run
                    log.warning("heartbeat not written: %s", err)

        thread = threading.Thread(target=loop, name="telepathy-heartbeat", daemon=True)
        thread.start()
        try:
            yield lease
        finally:
            stop.set()
            thread.join(timeout=5)
