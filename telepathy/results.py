"""Results are data: one ``result.json`` per run, written atomically, never lost.

This module writes records; ``telepathy.analysis`` reads them into tables. The
schema is in docs/ARCHITECTURE.md. ``record(...)`` builds every ``result.json`` (train.py
runs and both benchmarks), so each one carries the same fixed ``identity`` block: the
columns an experiment is grouped by, filled in by the writer, which knows what the run
used, rather than guessed by the reader from whatever its config happens to carry.
Every write goes to a temporary file in the same folder and is renamed over the
target, so a reader (or a job killed mid-write) never sees half a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

from telepathy import fsutil
from telepathy.config import num_latents, uses_soft_tokens

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOG_FILE = "log.jsonl"
HYDRA_DIR = ".hydra"  # the run's config.yaml, hydra.yaml, overrides.yaml (secrets redacted: telepathy/lifecycle.py)
# what a run's record may say about it (telepathy/lifecycle.py); readers add "missing" and "malformed"
STATUSES = ("completed", "running", "failed", "interrupted")
# the identity block: what makes two runs the same experiment (up to the seed); None = not used
IDENTITY = ("task", "method", "sender", "receiver", "compression", "num_latents", "layer", "model", "seed")
# fields every run sets for itself; everything else in a completed record is what it measured
RUN_FIELDS = (
    "schema_version",
    "run_id",
    "run_dir",
    "status",
    "task",
    "method",
    "seed",
    "identity",
    "config",
    "config_hash",
    "seedless_hash",
    "overrides",
    "env",
    "resources",
    "batch",
    "reused_from",
    "attempts",
    "memory",
    "error",
    "telemetry",
    "started_at",
    "finished_at",
)
PACKAGES = ("torch", "transformers", "hydra-core", "submitit", "peft", "llmlingua", "numpy", "scikit-learn")


def identity_block(**values) -> dict:
    """The fixed ``identity`` block: every key of IDENTITY, None where the run has no such thing."""
    unknown = set(values) - set(IDENTITY)
    if unknown:
        raise ValueError(f"identity has no field(s) {sorted(unknown)}; fields: {', '.join(IDENTITY)}")
    return {key: values.get(key) for key in IDENTITY}


def run_identity(cfg, latents: int | None = None) -> dict:
    """The identity of a ``train.py`` run, from its (composed or recorded) config.

    ``sender`` / ``receiver`` / ``layer`` only when the method loads that role
    (``method.models``); ``compression`` and ``num_latents`` only when it gives the
    receiver soft tokens (``config.uses_soft_tokens``); ``model`` is ``method.model``
    for single-model methods. A text baseline is thus never grouped or plotted by
    the default compression factor its config carries. ``latents``: the run's M where the config
    alone does not say it (``compression_basis=measured``: ``compression.latents``); default the
    cap-based M of ``config.num_latents`` (and of every record written before the key existed).
    """
    cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    method = cfg.method
    models = [str(m) for m in (method.get("models") or ["sender", "receiver"])]
    soft = uses_soft_tokens(cfg)
    sender = cfg.get("sender") or {}
    return identity_block(
        task=cfg.task.name,
        method=method.name,
        seed=cfg.get("seed"),
        sender=sender.get("name") if "sender" in models else None,
        receiver=(cfg.get("receiver") or {}).get("name") if "receiver" in models else None,
        layer=sender.get("layer") if "sender" in models else None,
        compression=cfg.get("compression") if soft else None,
        num_latents=(latents or num_latents(cfg)) if soft else None,
        model=method.get("model"),
    )


def record(status: str, *, run_id: str, run_dir, identity: dict, config: dict, **fields) -> dict:
    """One ``result.json`` object: schema, run, status, ``identity`` (``identity_block``) and the
    resolved config, then ``fields`` as given (metrics, params, timing, error, method sections ...).

    ``task``, ``method`` and ``seed`` are also top-level fields (as readers of older records expect).
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    if tuple(identity) != IDENTITY:
        raise ValueError(f"identity must have exactly the fields {', '.join(IDENTITY)}; got {', '.join(identity)}")
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "status": status,
        "task": identity["task"],
        "method": identity["method"],
        "seed": identity["seed"],
        "identity": identity,
        "config": config,
        **fields,
    }


def measured(record: dict) -> dict:
    """What a completed run measured: its record without the fields each run sets for itself
    (a deterministic method's other seeds copy exactly this)."""
    return {k: v for k, v in record.items() if k not in RUN_FIELDS}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _epoch(iso: str | None) -> float | None:
    try:
        return _dt.datetime.fromisoformat(iso).timestamp() if iso else None
    except (TypeError, ValueError):
        return None


def attempt(status: str, started_at: str, seconds: float | None, *, gpus, job: str | None, end: str = "record") -> dict:
    """One attempt of a run (one process that held its run dir): when, how long, where, on how many GPUs.

    ``end`` says where ``finished_at`` comes from: ``record`` (the attempt wrote it),
    ``heartbeat`` (killed without a signal: its last heartbeat) or ``unknown``.
    """
    start = _epoch(started_at)
    finished = (
        None if seconds is None or start is None else _dt.datetime.fromtimestamp(start + seconds, _dt.timezone.utc)
    )
    return {
        "status": status,
        "started_at": started_at,
        "finished_at": finished.isoformat(timespec="seconds") if finished else None,
        "seconds": None if seconds is None else round(float(seconds), 3),
        "end": end if seconds is not None else "unknown",
        "slurm_job_id": job,
        "gpus": gpus,
    }


def gpus_held(resources: dict | None, env: dict | None) -> float | None:
    """GPUs a run held: the launcher's ``resources.gpus``, else the GPUs it saw, else 0 on CPU; None if unknown."""
    resources, env = resources or {}, env or {}
    if resources.get("gpus") is not None:
        return resources["gpus"]
    if env.get("gpu_names") is not None:
        return len(env["gpu_names"])
    return 0 if str(env.get("device") or "").startswith("cpu") else None


def _killed_at_beat(last: dict, beat: dict | None, status: str | None) -> dict:
    """An attempt that never closed itself (killed without a signal), closed at its last heartbeat."""
    start = _epoch(last.get("started_at"))
    beat_time = float((beat or {}).get("time", 0) or 0) or None
    seconds = max(0.0, beat_time - start) if start is not None and beat_time else None
    return attempt(
        status if status in ("failed", "interrupted") else "interrupted",
        last.get("started_at"),
        seconds,
        gpus=last.get("gpus"),
        job=last.get("slurm_job_id"),
        end="heartbeat",
    )


def attempts_from_beat(beat: dict | None) -> list[dict]:
    """The attempts a heartbeat carries (``runlock.Lease.note``: the lifecycle keeps them there as
    well as in result.json, so they survive a record that is lost or damaged on disk): every one
    when its attempt closed them (``ended``), else the earlier ones plus the attempt that wrote the
    beat, killed without a signal and ended at that beat."""
    if not beat or not isinstance(beat.get("attempts"), list):
        return []
    attempts = [dict(a) for a in beat["attempts"] if isinstance(a, dict)]
    if beat.get("ended"):
        return attempts
    current = {"started_at": beat.get("started_at"), "gpus": beat.get("gpus"), "slurm_job_id": beat.get("slurm_job_id")}
    return [*attempts, _killed_at_beat(current, beat, None)]


def earlier_attempts(previous: dict | None, beat: dict | None) -> list[dict]:
    """The attempts a resumed run inherits from the record it finds in its run dir, each closed.

    Why: GPU time is spent by every attempt of a run that was preempted, killed or failed and
    then resumed, not only by the one that completes; the cost of a run is their sum
    (``attempts_seconds``). An attempt the previous record still shows as running was killed
    without a signal (``kill -9``, OOM killer, node loss): it ended at its last heartbeat
    (``beat``, read before this attempt's first beat replaces it). A record written before
    attempts were kept stands for one attempt of its own start/finish times. Without a
    readable record (lost, or damaged on disk) the heartbeat's copy of the attempts stands in.
    """
    if not previous:
        return attempts_from_beat(beat)
    attempts = [dict(a) for a in previous.get("attempts") or []]
    if not attempts:  # an older record: one attempt, from its own times
        start, end = _epoch(previous.get("started_at")), _epoch(previous.get("finished_at"))
        attempts = [
            attempt(
                previous.get("status", "running"),
                previous.get("started_at"),
                None if start is None or end is None else end - start,
                gpus=gpus_held(previous.get("resources"), previous.get("env")),
                job=(previous.get("env") or {}).get("slurm_job_id"),
            )
        ]
    if attempts[-1].get("seconds") is None:  # still "running": killed without a signal
        attempts[-1] = _killed_at_beat(attempts[-1], beat, previous.get("status"))
    return attempts


def attempts_seconds(record: dict) -> float | None:
    """Wall seconds of every attempt of a run (the measure GPU-hours multiply); None if it recorded none."""
    attempts = record.get("attempts") or []
    known = [float(a["seconds"]) for a in attempts if a.get("seconds") is not None]
    return sum(known) if known else None


def record_cost(record: dict, default_gpus: float | None = None) -> tuple[float | None, float | None, int]:
    """(wall seconds, GPU-hours, attempts) a run cost: the sum over every attempt it recorded; a
    record without ``attempts`` (older code) is one attempt of ``timing.total_s`` x ``default_gpus``.
    A reused run (deterministic method: ``reused_from``) copies its source's timing but computed
    nothing: 0. None where unknown."""
    if record.get("reused_from"):
        return 0.0, 0.0, 0
    if record.get("attempts"):
        gpu_s = attempts_gpu_seconds(record, default_gpus)
        return attempts_seconds(record), None if gpu_s is None else gpu_s / 3600, len(record["attempts"])
    seconds = (record.get("timing") or {}).get("total_s")
    if seconds is None:
        return None, None, 0
    return float(seconds), None if default_gpus is None else float(default_gpus) * float(seconds) / 3600, 1


def attempts_gpu_seconds(record: dict, default_gpus: float | None = None) -> float | None:
    """GPU-seconds of every attempt (its GPUs, else ``default_gpus``, x its seconds); None if it
    recorded no attempt of known length or the GPUs of one are unknown."""
    timed = [a for a in record.get("attempts") or [] if a.get("seconds") is not None]
    gpus = [a.get("gpus") if a.get("gpus") is not None else default_gpus for a in timed]
    if not timed or any(g is None for g in gpus):
        return None
    return sum(float(g) * float(a["seconds"]) for g, a in zip(gpus, timed))


NONFINITE_KEY = "nonfinite"


def _finite(obj, where: str, found: dict):
    """obj with every NaN / ±Infinity float replaced by None; found[dotted path] = what it was."""
    if isinstance(obj, float) and not math.isfinite(obj):
        found[where] = repr(obj)  # 'nan', 'inf', '-inf'
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj


# --- secrets never reach a record or a log ------------------------------------------------------

SECRET_WORDS = {"TOKEN", "KEY", "APIKEY", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "CREDENTIALS"}
REDACTED = "***"
MIN_SECRET_CHARS = 6  # a secret's value is also replaced inside other strings when at least this long


def secret_name(name) -> bool:
    """A name that looks like it holds a secret: its last dotted part begins or ends with TOKEN,
    KEY, PASSWORD, SECRET, ... (``HF_TOKEN``, ``WANDB_API_KEY``, ``db.password``), not
    ``num_key_value_heads`` or ``max_new_tokens``. Only text values are secrets: a number under
    such a name (LLMLingua's ``target_token: 4``) is a count."""
    words = [w for w in re.split(r"[_\-]", str(name).rsplit(".", 1)[-1].upper()) if w]
    return bool(words) and (words[0] in SECRET_WORDS or words[-1] in SECRET_WORDS)


_OVERRIDE = re.compile(r"^[+~]*([\w.\-/@]+)=(.+)$")
_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?")


def _secret_override(text: str) -> re.Match | None:
    """``text`` as a ``key=value`` override of a secret-named key with a text value, else None."""
    match = _OVERRIDE.match(text)
    if match and secret_name(match.group(1)) and not _NUMBER.fullmatch(match.group(2)):
        return match
    return None


def secret_values(*objs) -> set[str]:
    """The values of secret-named keys in ``objs`` (dicts, lists, ``key=value`` override strings)
    and in this process's environment, as text."""
    found: set[str] = set()

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if secret_name(k) and isinstance(v, str) and v:
                    found.add(v)
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif isinstance(obj, str):
            for part in obj.split():  # an override, or a command line of them
                match = _secret_override(part.strip("'\""))
                if match:
                    found.add(match.group(2).strip("'\""))

    walk(list(objs))
    found |= {v for k, v in os.environ.items() if secret_name(k) and v}
    return found


def redact(obj, secrets: set[str] | None = None):
    """``obj`` with every value of a secret-named key replaced by ``***``, and every secret value
    (``secret_values``: of such keys, of ``KEY=value`` overrides, of secret-named environment
    variables) at least ``MIN_SECRET_CHARS`` long replaced inside any other string too (a command
    line, Hydra's override_dirname, an error message)."""
    secrets = secret_values(obj) if secrets is None else secrets
    long = sorted((v for v in secrets if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)

    def clean(value, name=None):
        if name is not None and secret_name(name) and isinstance(value, str):
            return value and REDACTED
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, str):
            for secret in long:
                value = value.replace(secret, REDACTED)
            match = _secret_override(value)
            if match and match.group(2) != REDACTED:
                value = value[: match.start(2)] + REDACTED
        return value

    return clean(obj)


def strict_json(obj, *, secrets: set[str] | None = None, **kwargs) -> str:
    """Strict JSON text of a record (or a log row), with its secrets redacted (``redact``): NaN
    and ±Infinity are not JSON (json.dumps writes them anyway, and strict readers reject the
    file), so each becomes null and the record gets ``"nonfinite": {"dotted.key": "inf"}``
    saying which values were not finite and what they were."""
    found: dict = {}
    clean = _finite(redact(obj, secrets), "", found)
    if found and isinstance(clean, dict):
        clean[NONFINITE_KEY] = {**(clean.get(NONFINITE_KEY) or {}), **found}
    return json.dumps(clean, default=str, allow_nan=False, **kwargs)


def write_json(path: Path, obj) -> None:
    fsutil.write_text(path, strict_json(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    fsutil.write_text(path, text)


def write_jsonl(path: Path, rows) -> None:
    rows = list(rows)
    secrets = secret_values(rows)
    fsutil.write_text(path, "".join(strict_json(r, secrets=secrets) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """One line per call (the per-step training log). A line is written whole by one write()."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fsutil.writing(path), open(path, "a") as f:
        f.write(strict_json(row) + "\n")


# --- the one reader of result.json ----------------------------------------------------------


class UnreadableRecord(ValueError):
    """A result.json that exists but is not a record (not UTF-8, not JSON, not an object)."""


@dataclass(frozen=True)
class ReadBack:
    """What a run dir's result.json holds: the record, or why there is none.

    ``problem`` is one line naming the file (and line) when the file exists but cannot be read
    as a record; ``status`` is the record's status, ``missing`` without a file, ``malformed``
    with a problem (the words the read side uses for them).
    """

    path: Path
    record: dict | None
    problem: str | None = None

    @property
    def status(self) -> str:
        if self.problem is not None:
            return "malformed"
        return "missing" if self.record is None else str(self.record.get("status"))


def load_result(run_dir: Path) -> ReadBack:
    """Read ``<run_dir>/result.json`` (``run_dir`` may also be the file itself). Every reader of a
    record comes here: the lifecycle, the sweep planner, status, the plan checklist, reports,
    the read side and the benchmarks, so a damaged record reads the same everywhere."""
    path = Path(run_dir)
    path = path if path.name == RESULT_FILE else path / RESULT_FILE
    if not path.exists():
        return ReadBack(path, None)
    try:
        record = fsutil.read_json(path, error=UnreadableRecord)
    except UnreadableRecord as err:
        return ReadBack(path, None, str(err))
    except OSError as err:  # a result.json that is a directory, or not readable
        return ReadBack(path, None, f"{path}: cannot read ({type(err).__name__}: {err.strerror or err})")
    if not isinstance(record, dict):
        return ReadBack(path, None, f"{path}: top level is {type(record).__name__}, not an object")
    return ReadBack(path, record)


def read_result(run_dir: Path) -> dict | None:
    """The record of a run dir; None when it has none or it is unreadable (``load_result`` says why)."""
    return load_result(run_dir).record


def require_result(run_dir: Path) -> dict:
    """The record of a run dir that must have one (benchmarks reading the runs they started);
    UnreadableRecord, one line naming the file, when it is missing or damaged."""
    found = load_result(run_dir)
    if found.record is None:
        raise UnreadableRecord(found.problem or f"{found.path}: missing")
    return found.record


def git_info(repo: Path | None = None) -> dict:
    repo = repo or Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)

    try:
        rev = git("rev-parse", "HEAD")
        if rev.returncode != 0:
            return {"git_rev": None, "git_dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"git_rev": rev.stdout.strip(), "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_rev": None, "git_dirty": None}


# a bridge run's ``bridge.flags``: what makes its number not what it seems; every table marks the runs
# that carry one and never averages them in silently (docs/results.md)
FLAGS = {
    "single_class": "the readout answers one class for every test item (the bridge collapsed): its accuracy is "
    "a majority rate",
    "unparsed": "no test answer could be parsed (every item counts as wrong, so accuracy is 0, not the majority "
    "rate); see predictions.jsonl",
    "below_majority": "accuracy below the test split's majority rate + 0.1: the bridge did not learn the task",
    "sender_unread": "no better than the same bridge reading another item's sender states (the shuffled-sender "
    "control): the result does not show that the receiver reads the sender",
}

# variables that pick the CPU kernels torch, MKL and oneDNN run (benchmarks/robustness.py sets them)
CPU_KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def environment(device: str | None = None) -> dict:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    env = {
        **git_info(),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "packages": packages,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        # they change float summation order, and so short runs' results (benchmarks/README.md §3)
        env["cpu_threads"] = torch.get_num_threads()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["cpu_kernel_env"] = {k: os.environ[k] for k in CPU_KERNEL_ENV if k in os.environ}
    except ImportError:
        pass
    return env


def peak_memory() -> dict:
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mb": None}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_mb"] = (
                sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
            )
    except ImportError:
        pass
    return out
