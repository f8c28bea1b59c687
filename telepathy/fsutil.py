"""File writes that other processes may read or repeat at the same time, and the readers of
what they wrote (``read_json``, ``read_jsonl``), which name the file and line of any damage.

Jobs of one sweep share the model cache, the feature cache and the output root, and
SLURM can start two of them at the same moment. Three rules keep them out of each
other's way:

* a reader never sees half a file: ``atomic_path`` hands out a temporary name in the
  target's folder and renames it over the target only once it is complete (a job
  killed mid-write leaves a stray ``.tmp`` file, never a truncated target). It is the one
  writer of every shared file (result.json, predictions.jsonl, heartbeat.json, jobs.json,
  the caches), and what it writes honours the umask (``shared_mode``): in a shared outputs
  dir colleagues read the records as they read any other file of yours;
* work that two writers would both do in full (assembling a GGUF, converting a model)
  runs under ``file_lock``, and the second writer re-checks for the result after it
  gets the lock;
* what is read back is checked: a file damaged on disk (a full disk, a bad copy, bytes
  that are not UTF-8) gives one line naming the file and line, never a raw decoder error,
  and what a cache holds is verified against the sizes and hashes written with it
  (``write_digests`` / ``digest_problem``) before it is used.

``file_lock`` is ``filelock.FileLock``: an ``fcntl.flock`` on a ``.lock`` file, which the
kernel drops when its process dies (even ``kill -9``), so a crashed job never leaves a lock
behind. It holds across nodes on NFSv4 and on Lustre/GPFS mounted with flock support (where
a file system has no flock, filelock falls back to a lock file holding the owner's pid).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
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


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """This process's umask, read without changing it where Linux says it (``os.umask`` can only
    set it, process-wide, so reading it that way races the other threads' file creation)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def shared_mode(mode: int = 0o666) -> int:
    """The permissions ``open()`` would give a new file: ``mode`` less the umask (``tempfile``'s
    names are created 0600, which would keep every record private whatever the umask says)."""
    return mode & ~umask()


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def disk_error(err: BaseException, path: Path) -> OSError | None:
    """``err`` as an OSError naming ``path`` when writing ``path`` failed for want of disk (full,
    over quota, read-only, not writable), else None. Writers word it their own way: ``write()``
    gives an OSError without a file name, safetensors an "os error 28" in its message, and
    ``torch.save`` on a full disk only "unexpected pos", so a full disk is also asked directly."""
    path = Path(path)
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return OSError(err.errno, err.strerror, str(err.filename or path))
    if "os error 28" in str(err) or "No space left" in str(err):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    with contextlib.suppress(OSError):
        folder = next((p for p in (path, *path.parents) if p.exists()), None)
        if folder is not None and os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Re-raise a failed write of ``path`` for want of disk as an OSError that names ``path``
    (``disk_error``); other errors as they are."""
    try:
        yield
    except Exception as err:
        named = disk_error(err, path)
        if named is None or named is err:
            raise
        raise named from err


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``target``; renamed over it when the block ends without error.

    The caller writes the whole file to the yielded path (any writer that takes a
    path: ``save_file``, ``torch.save``, a package's ``assemble``); on an exception the
    temporary file is removed and ``target`` is untouched. The file gets ``shared_mode()``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # writers that refuse to overwrite (``assemble``) get a fresh name
    tmp_path = Path(tmp)
    try:
        with writing(target):
            yield tmp_path
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, shared_mode())
            os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))


# --- reading back what was written -----------------------------------------------------------


def _utf8(path: Path, raw: bytes, line: int, error: type[Exception]) -> str:
    """``raw`` (line ``line`` of ``path``, or the whole file when ``line`` is 0) as text; ``error``
    naming the file, line and byte when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        before = raw[: err.start]
        where = line or before.count(b"\n") + 1
        column = err.start - (before.rfind(b"\n") + 1) + 1
        raise error(f"{path}:{where}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def read_json(path: Path, *, error: type[Exception] = ValueError):
    """The JSON value in ``path`` (strict JSON, as ``results.strict_json`` writes it). A file that is
    not UTF-8 or not JSON raises ``error`` in one line naming the file and line; OSError as is."""
    path = Path(path)
    raw = path.read_bytes()
    text = _utf8(path, raw, 0, error)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:  # NaN / Infinity
        raise error(f"{path}: not valid JSON ({err})") from None


class _Unreadable(ValueError):
    pass


def iter_jsonl(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """``(line number, row, None)`` for each non-blank line of a JSON Lines file, or ``(line
    number, None, why)`` for a line that is not UTF-8 or not JSON (``why`` names the file and
    line). A last line without its newline that does not parse is a ``partly written last
    line`` (what a full disk or a killed writer leaves)."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    for i, chunk in enumerate(lines, 1):
        if not chunk.strip():
            continue
        try:
            row = json.loads(_utf8(path, chunk, i, _Unreadable), parse_constant=_no_constant)
        except _Unreadable as err:
            yield i, None, str(err)
        except ValueError as err:  # JSONDecodeError, NaN / Infinity
            half = i == len(lines)  # no newline after it
            msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            yield i, None, f"{path}:{i}: {'partly written last line' if half else 'not valid JSON'} ({msg})"
        else:
            yield i, row, None


def read_jsonl(path: Path, *, live: bool = False, error: type[Exception] = ValueError) -> list:
    """Rows of a JSON Lines file; blank lines are skipped. A line that is not UTF-8 or not JSON
    raises ``error`` naming the file and line, except, when ``live`` (a log another process is
    still appending to), a last line without its newline: that one is half written, so it is
    skipped with a warning."""
    rows = []
    for _, row, why in iter_jsonl(path):
        if why is None:
            rows.append(row)
        elif live and "partly written last line" in why:
            warnings.warn(f"{why}: skipped", stacklevel=2)
        else:
            raise error(why)
    return rows


# --- what a cache folder holds: sizes and sha256 written with it ----------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_digests(folder: Path, name: str, **fields) -> None:
    """Record size and sha256 of every file of ``folder`` in ``folder/name`` (with ``fields``),
    after the files are written and before the folder is renamed into place."""
    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != name
    }
    write_text(folder / name, json.dumps({**fields, "files": files}, indent=1) + "\n")


def digest_problem(
    folder: Path, name: str, *, required: bool = True, only: Callable[[str], bool] | None = None
) -> str | None:
    """Why ``folder`` does not hold what ``write_digests`` recorded in ``folder/name`` (a file
    missing, of another size, or with another sha256), or None when every file matches. Sizes
    are checked for every file, hashes for those ``only`` accepts (default: all). Without the
    record: a problem when ``required``, else None (written before records were kept)."""
    folder = Path(folder)
    path = folder / name
    if not path.exists():
        return f"no {name} (sizes and hashes of its files)" if required else None
    try:
        files = read_json(path)["files"]
        wanted = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{name} unreadable ({err})"
    for file_name, (size, _) in wanted.items():
        file = folder / file_name
        if not file.is_file():
            return f"{file_name} is missing"
        if file.stat().st_size != size:
            return f"{file_name} has {file.stat().st_size} bytes, {size} were written"
    for file_name, (_, digest) in wanted.items():
        if (only is None or only(file_name)) and sha256(folder / file_name) != digest:
            return f"{file_name} does not match its sha256"
    return None
