"""Find run directories and read them back into tables (the read side of telepathy/results.py).

The write side is telepathy/results.py; this module only reads. Layout it
expects (docs/ARCHITECTURE.md): one directory per run holding result.json,
predictions.jsonl and log.jsonl.

Rules that keep the numbers honest:
- every run directory found is a row; a run without result.json has status
  "missing", an unreadable result.json has status "malformed" and its path in
  `error.message`. Nothing is dropped and no value is filled in: a metric or
  seed that was not recorded is NaN / <NA>.
- a 95% CI needs at least 2 independent seeds; with fewer it is NaN and the
  group is flagged, never collapsed to the mean.
- runs with `reused_from` set (deterministic methods) are one observation, not
  one per seed.
"""

from __future__ import annotations

import glob
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf.errors import OmegaConfBaseException

from telepathy.fsutil import read_jsonl
from telepathy.results import (
    IDENTITY,
    LOG_FILE,
    PREDICTIONS_FILE,
    RESULT_FILE,
    SCHEMA_VERSION,
    identity_block,
    load_result,
    run_identity,
)
from telepathy.results import STATUSES as RECORD_STATUSES

if TYPE_CHECKING:
    from pandas.api.typing import NAType

# what the loaders accept: a directory, a glob pattern, a run file, or several of them
RunPaths = str | Path | Iterable[str | Path]
# one run: a loaded row (``DataFrame.to_dict("records")``, a ``Series``) or ``read_run``'s dict
Run = Mapping[str, Any] | pd.Series

# any of these marks a directory as a run directory
RUN_MARKERS = (RESULT_FILE, LOG_FILE, PREDICTIONS_FILE, "checkpoints")
# statuses result.json may carry (telepathy/results.py); loaders add the last two
STATUSES = (*RECORD_STATUSES, "missing", "malformed")
# result.json objects that must be objects when present; every top-level object
# (these and any other) becomes `section.key` columns
SECTIONS = ("identity", "config", "metrics", "bridge", "params", "timing", "memory", "resources", "env", "error")
# top-level keys that are not copied as columns under their own name (the identity block has them)
OWN_COLUMNS = ("run_dir", "run_id", "status", "task", "method", "seed", "identity")
# the latency benchmark's own columns: its config says which path and batch size a record timed
BENCHMARK_COLUMNS = ("batch_size", "path")
# measured, not nominal: text tokens read per receiver position (bridge: / M; LLMLingua:
# original / kept text tokens), and the receiver positions that carry the input;
# column -> flattened keys to read it from, first present wins
MEASURED_SOURCES = {
    "measured_compression": ("bridge.measured_compression_mean", "metrics.compression_ratio"),
    "positions": (
        "bridge.num_latents",
        "prompt_tuning.num_virtual_tokens",
        "metrics.compressed_tokens_mean",
        "metrics.relay_tokens_mean",
    ),
    # test texts the sender's token cap (task.max_input_tokens) cut after the word cap every
    # method reads (task.max_text_words): > 0 means this row read less text than the others
    "sender_truncated_items": ("bridge.truncated_test_items", "probe.truncated_test_items"),
}
# columns that describe a run's outcome: averaged per experiment, never grouped by; majority_floor is
# the test split's majority rate (metrics.majority_accuracy of records that also carry
# train_majority_accuracy: older ones scored the training split's majority label there)
MEASURED = (*MEASURED_SOURCES, "majority_floor")
# "same experiment across seeds" = same values of these columns (the identity block, less the seed)
# and the same CONFIG_KEY (result.json's hash of the config without its seed): runs that differ
# in any other setting (learning rate, test size, bridge depth, ...) are never pooled as seeds
GROUP_KEYS = [k for k in IDENTITY if k != "seed"]
CONFIG_KEY = "seedless_hash"
# methods that measure systems, not task quality: plotted, never in the metric tables
BENCHMARK_METHODS = ("latency", "train_throughput")


class RunReadError(ValueError):
    """A run directory whose record cannot be turned into a row; the message names the directory."""


class MissingMetricError(ValueError):
    """A completed run lacks a metric that other runs of its task report."""


def is_missing(v: object) -> bool:
    """None, NaN or <NA>: a value that was not recorded."""
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def is_reused(run: Run) -> bool:
    """The run copied the result of another seed's run (deterministic method)."""
    src = run.get("reused_from")
    return isinstance(src, str) and bool(src)


# -----------------------------------------------------------------------------
# finding run directories


def _walk_runs(d: Path) -> Iterator[Path]:
    """Run directories at or under d. A directory holding only Hydra's `.hydra/`
    is a run that died before writing anything, unless run directories lie
    below it (a job dir that writes one run per subdirectory)."""
    if any((d / m).exists() for m in RUN_MARKERS):
        yield d
        return
    below = False
    for child in sorted(d.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            for run in _walk_runs(child):
                below = True
                yield run
    if not below and (d / ".hydra").is_dir():
        yield d


def find_run_dirs(paths: RunPaths) -> list[Path]:
    """Run directories under one or more paths or glob patterns.

    A pattern that matches nothing, or a path with no run directory under it,
    is an error: an empty result must never look like a finished sweep.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = set()
    for p in paths:
        p = str(p)
        if any(ch in p for ch in "*?["):
            matches = sorted(glob.glob(p, recursive=True))
        else:
            matches = [p] if Path(p).exists() else []
        if not matches:
            raise FileNotFoundError(f"no files match {p!r}")
        here = set()
        for m in map(Path, matches):
            if m.is_file():
                if m.name not in (RESULT_FILE, LOG_FILE, PREDICTIONS_FILE):
                    raise ValueError(f"{m} is not a run directory or a run file")
                m = m.parent
            if not m.is_dir():
                continue
            here.update(d.resolve() for d in _walk_runs(m))
        if not here:
            raise FileNotFoundError(f"no run directories under {p!r}")
        found |= here
    return sorted(found)


# -----------------------------------------------------------------------------
# loading


def _flatten(d: dict, prefix: str, out: dict) -> dict:
    """Dotted keys, like pandas.json_normalize, except lists: json_normalize keeps them as
    Python lists, which cannot be grouped or compared across runs; here they are JSON text."""
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            _flatten(v, key, out)
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)  # hashable, and readable in a table
        else:
            out[key] = v
    return out


def _hydra_config(run_dir: Path) -> dict:
    """Config of a run that left no result.json, from Hydra's saved copy."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # custom resolvers (telepathy.run_dir) are not registered here
        return OmegaConf.to_container(cfg, resolve=False)


def _check_record(rec: object) -> str | None:
    """Reason the record is not a usable result.json, or None."""
    if not isinstance(rec, dict):
        return f"top level is {type(rec).__name__}, not an object"
    if rec.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        return f"schema_version {rec['schema_version']!r}, this reader knows {SCHEMA_VERSION}"
    if not isinstance(rec.get("status"), str) or rec["status"] in ("missing", "malformed", ""):
        return f"status {rec.get('status')!r} is not a run status"
    if not isinstance(rec.get("config"), dict):
        return "no 'config' object"
    for s in SECTIONS:
        if rec.get(s) is not None and not isinstance(rec[s], dict):
            return f"'{s}' is {type(rec[s]).__name__}, not an object"
    if rec["status"] == "completed" and not isinstance(rec.get("metrics"), dict):
        return "completed run without a 'metrics' object"
    return None


def read_run(run_dir: str | Path) -> dict:
    """One row (a flat dict) for one run directory."""
    run_dir = Path(run_dir)
    path = run_dir / RESULT_FILE
    row = {"run_dir": str(run_dir), "run_id": run_dir.name}
    flat = {}
    rec = {}
    read = load_result(run_dir)  # the one reader of result.json (telepathy/results.py)
    if read.status == "missing":
        row["status"] = "missing"
        config = _hydra_config(run_dir)
        _flatten(config, "config", flat)
    else:
        rec = read.record
        problem = read.problem
        if problem is None and _check_record(rec) is not None:
            problem = f"{path}: {_check_record(rec)}"
        if problem:
            warnings.warn(f"malformed {problem}", stacklevel=2)
            row.update({"status": "malformed", "error.type": "MalformedResult", "error.message": problem})
            rec, config = {}, _hydra_config(run_dir)
            _flatten(config, "config", flat)
        else:
            config = rec["config"]
            row["status"] = rec["status"]
            row["run_id"] = rec.get("run_id") or run_dir.name
            row["recorded_run_dir"] = rec.get("run_dir")  # differs when copied from a cluster
            for k, v in rec.items():
                if isinstance(v, dict):
                    v = dict(v)
                    if k == "env":
                        v.pop("packages", None)  # dozens of columns; still in result.json
                    if k == "error":
                        v.pop("traceback", None)  # long; still in result.json
                    if k != "identity":
                        _flatten(v, k, flat)
                elif k not in OWN_COLUMNS:
                    row[k] = json.dumps(v) if isinstance(v, list) else v
            row[CONFIG_KEY] = rec.get(CONFIG_KEY) or _seedless_fallback(rec["config"])
    row.update(_identity(rec, config))
    for name in BENCHMARK_COLUMNS:
        row[name] = flat.get(f"config.{name}")
    for name, keys in MEASURED_SOURCES.items():
        row[name] = next((flat[k] for k in keys if flat.get(k) is not None), None)
    new_floor = flat.get("metrics.train_majority_accuracy") is not None
    row["majority_floor"] = flat.get("metrics.majority_accuracy") if new_floor else None
    row.update(flat)
    return row


def _seedless_fallback(config: dict) -> str:
    """A config id for a record written before result.json had `seedless_hash`: the whole
    recorded config without its seed. It may split runs that differ only in paths, never pools
    runs that differ in a setting."""
    import hashlib

    rest = {k: v for k, v in config.items() if k != "seed"}
    return "cfg-" + hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _identity(rec: dict, config: dict) -> dict:
    """The record's ``identity`` block (telepathy/results.py writes it). A record written
    before the block existed, or a run that left only Hydra's config, gets the block the
    writer would have written, computed from its config by the writer's own function."""
    if isinstance(rec.get("identity"), dict):
        return {k: rec["identity"].get(k) for k in IDENTITY}
    try:
        return run_identity(config)
    except (AttributeError, KeyError, TypeError, ValueError, OmegaConfBaseException):
        return identity_block()  # a config too partial to tell (e.g. a job that died while composing)


def load_runs(paths: RunPaths) -> pd.DataFrame:
    """Tidy DataFrame, one row per run directory found under `paths`.

    `paths` is a directory, a glob pattern, a result.json path, or a list of
    them; single runs, Hydra multirun dirs and SLURM sweep dirs all work.
    """
    rows = []
    for d in find_run_dirs(paths):
        try:
            rows.append(read_run(d))
        except Exception as err:  # a record this reader does not expect: say which run, keep the cause
            raise RunReadError(f"cannot read run {d}: {type(err).__name__}: {err}") from err
    df = pd.DataFrame(rows)
    for col in ("reused_from", "error.type", "error.message", CONFIG_KEY):
        if col not in df:
            df[col] = None
    for col in ("seed", "num_latents"):
        df[col] = pd.array([_as_int(v, col, d) for v, d in zip(df[col], df["run_dir"])], dtype="Int64")
    for col in ("compression", *MEASURED):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    first = [
        "run_dir",
        "run_id",
        "status",
        *IDENTITY,
        *BENCHMARK_COLUMNS,
        *MEASURED,
        "reused_from",
        "error.type",
        "error.message",
    ]
    first += [c for c in ("error.oom",) if c in df]
    rest = sorted(c for c in df.columns if c not in first)
    return df[first + rest]


def _as_int(v: object, column: str, run_dir: str) -> int | NAType:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return pd.NA
    try:
        return int(v)
    except (TypeError, ValueError) as err:
        raise RunReadError(f"cannot read run {run_dir}: {column}={v!r} is not an integer") from err


def _runs(runs_or_paths: pd.DataFrame | RunPaths) -> pd.DataFrame:
    return runs_or_paths if isinstance(runs_or_paths, pd.DataFrame) else load_runs(runs_or_paths)


def _run_file(run: Run, filename: str, follow_reuse: bool) -> Path | None:
    """The run's own file, else (follow_reuse) the file of the run it reuses; None if neither exists."""
    own = Path(run["run_dir"]) / filename
    if own.exists():
        return own
    if follow_reuse and is_reused(run):
        src = Path(run["reused_from"])
        for cand in (src / filename, own.parent.parent / src.name / filename):  # as recorded, or a sibling
            if cand.exists():
                return cand
    return None


def _per_run_rows(runs: pd.DataFrame, filename: str, follow_reuse: bool) -> list[dict]:
    out = []
    keep = ["run_dir", "run_id", "status", "seed", "reused_from", CONFIG_KEY] + GROUP_KEYS
    for run in runs.to_dict("records"):
        path = _run_file(run, filename, follow_reuse)
        if path is not None:
            cols = {k: run[k] for k in keep}
            out.extend({**cols, **r} for r in read_jsonl(path, live=True))
    return out


def load_predictions(runs_or_paths: pd.DataFrame | RunPaths) -> pd.DataFrame:
    """Per-example rows (predictions.jsonl) with their run's columns.

    Runs without a predictions file contribute no rows; `runs` tells you which.
    A reused run reads its source run's predictions if it has none of its own.
    """
    runs = _runs(runs_or_paths)
    return pd.DataFrame(_per_run_rows(runs, PREDICTIONS_FILE, follow_reuse=True))


def load_logs(runs_or_paths: pd.DataFrame | RunPaths) -> pd.DataFrame:
    """Per-step rows (log.jsonl: training rows and eval rows) with their run's
    columns. A reused run trained nothing and has no rows."""
    runs = _runs(runs_or_paths)
    return pd.DataFrame(_per_run_rows(runs, LOG_FILE, follow_reuse=False))
