"""Read run directories back into tables, and the statistics used on them.

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

import glob
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOG_FILE = "log.jsonl"
# any of these marks a directory as a run directory
RUN_MARKERS = (RESULT_FILE, LOG_FILE, PREDICTIONS_FILE, "checkpoints")
# statuses result.json may carry (telepathy/app.py); loaders add the last two
STATUSES = ("completed", "running", "failed", "interrupted", "missing", "malformed")
SCHEMA_VERSION = 1
# result.json objects that must be objects when present; every top-level object
# (these and any other) becomes `section.key` columns
SECTIONS = ("config", "metrics", "bridge", "params", "timing", "memory", "resources", "env", "error")
# top-level keys that are not copied as columns under their own name
OWN_COLUMNS = ("run_dir", "run_id", "status", "task", "method", "seed")
# friendly column -> flattened keys to read it from, first present wins
FRIENDLY = {
    "task": ("config.task.name", "config.task", "task"),
    "method": ("config.method.name", "config.method", "method"),
    "sender": ("config.sender.name", "config.sender"),
    "receiver": ("config.receiver.name", "config.receiver"),
    "seed": ("config.seed", "seed"),
    "compression": ("config.compression", "config.compression.factor", "bridge.compression_factor"),
    "num_latents": ("bridge.num_latents", "config.bridge.num_latents", "config.method.num_latents"),
    "layer": ("config.sender.layer",),
    "model": ("config.method.model",),
    "batch_size": ("config.batch_size", "config.benchmark.batch_size", "config.method.batch_size"),
    "path": ("config.path", "config.benchmark.path", "config.method.path"),
}
# "same experiment across seeds" = same values of these columns
GROUP_KEYS = ["task", "method", "sender", "receiver", "compression", "num_latents", "layer", "model"]
# methods that measure systems, not task quality: plotted, never in the metric tables
BENCHMARK_METHODS = ("latency", "train_throughput")


class MissingMetricError(ValueError):
    """A completed run lacks a metric that other runs of its task report."""


def is_missing(v):
    """None, NaN or <NA>: a value that was not recorded."""
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def is_reused(run):
    """The run copied the result of another seed's run (deterministic method)."""
    src = run.get("reused_from")
    return isinstance(src, str) and bool(src)


# -----------------------------------------------------------------------------
# finding run directories

def _walk_runs(d):
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


def find_run_dirs(paths):
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

def _flatten(d, prefix, out):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            _flatten(v, key, out)
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)  # hashable, and readable in a table
        else:
            out[key] = v
    return out


def _hydra_config(run_dir):
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


def _check_record(rec):
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


def read_run(run_dir):
    """One row (a flat dict) for one run directory."""
    run_dir = Path(run_dir)
    path = run_dir / RESULT_FILE
    row = {"run_dir": str(run_dir), "run_id": run_dir.name}
    flat = {}
    if not path.exists():
        row["status"] = "missing"
        _flatten(_hydra_config(run_dir), "config", flat)
    else:
        problem = None
        try:
            rec = json.loads(path.read_text())
            problem = _check_record(rec)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problem = f"invalid JSON: {e}"
        if problem:
            warnings.warn(f"malformed {path}: {problem}")
            row.update({"status": "malformed", "error.type": "MalformedResult",
                        "error.message": f"{path}: {problem}"})
            _flatten(_hydra_config(run_dir), "config", flat)
        else:
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
                    _flatten(v, k, flat)
                elif k in ("task", "method", "seed"):
                    flat[k] = v
                elif k not in OWN_COLUMNS:
                    row[k] = json.dumps(v) if isinstance(v, list) else v
    for name, keys in FRIENDLY.items():
        row[name] = next((flat[k] for k in keys if flat.get(k) is not None), None)
    _drop_unused(row, flat)
    for k, v in flat.items():
        if k not in ("task", "method", "seed"):
            row[k] = v
    return row


def _drop_unused(row, flat):
    """Blank the friendly columns a method does not use, so that, e.g., a text
    baseline is not grouped or plotted by the (default) compression factor its
    config happens to carry. `method.uses` / `method.models` as in conf/method/."""
    uses, models = flat.get("config.method.uses"), flat.get("config.method.models")
    if uses is not None and not {"bridge", "compression"} & set(json.loads(uses)):
        row["compression"] = row["num_latents"] = None
    if models is not None:
        models = set(json.loads(models))
        for role in ("sender", "receiver"):
            if role not in models:
                row[role] = None
        if "sender" not in models:
            row["layer"] = None


def load_runs(paths):
    """Tidy DataFrame, one row per run directory found under `paths`.

    `paths` is a directory, a glob pattern, a result.json path, or a list of
    them; single runs, Hydra multirun dirs and SLURM sweep dirs all work.
    """
    rows = [read_run(d) for d in find_run_dirs(paths)]
    df = pd.DataFrame(rows)
    for col in ("reused_from", "error.type", "error.message"):
        if col not in df:
            df[col] = None
    df["seed"] = pd.array([_as_int(v) for v in df["seed"]], dtype="Int64")
    df["num_latents"] = pd.array([_as_int(v) for v in df["num_latents"]], dtype="Int64")
    df["compression"] = pd.to_numeric(df["compression"], errors="coerce").astype("float64")
    first = ["run_dir", "run_id", "status", *FRIENDLY, "reused_from", "error.type", "error.message"]
    first += [c for c in ("error.oom",) if c in df]
    rest = sorted(c for c in df.columns if c not in first)
    return df[first + rest]


def _as_int(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return pd.NA
    return int(v)


def _runs(runs_or_paths):
    return runs_or_paths if isinstance(runs_or_paths, pd.DataFrame) else load_runs(runs_or_paths)


def _read_jsonl(path):
    """Rows of a JSON Lines file. A cut-off last line (a run still appending to
    its log) is skipped with a warning; a bad line anywhere else is an error."""
    text = Path(path).read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}:{i}: skipped a partly written last line")
                continue
            raise ValueError(f"{path}:{i}: invalid JSON line: {e}") from None
    return rows


def _run_file(run, filename, follow_reuse):
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


def _per_run_rows(runs, filename, follow_reuse):
    out = []
    keep = ["run_dir", "run_id", "status", "seed", "reused_from"] + GROUP_KEYS
    for run in runs.to_dict("records"):
        path = _run_file(run, filename, follow_reuse)
        if path is not None:
            cols = {k: run[k] for k in keep}
            out.extend({**cols, **r} for r in _read_jsonl(path))
    return out


def load_predictions(runs_or_paths):
    """Per-example rows (predictions.jsonl) with their run's columns.

    Runs without a predictions file contribute no rows; `runs` tells you which.
    A reused run reads its source run's predictions if it has none of its own.
    """
    runs = _runs(runs_or_paths)
    return pd.DataFrame(_per_run_rows(runs, PREDICTIONS_FILE, follow_reuse=True))


def load_logs(runs_or_paths):
    """Per-step rows (log.jsonl: training rows and eval rows) with their run's
    columns. A reused run trained nothing and has no rows."""
    runs = _runs(runs_or_paths)
    return pd.DataFrame(_per_run_rows(runs, LOG_FILE, follow_reuse=False))


# -----------------------------------------------------------------------------
# statistics

def mean_ci(values, confidence=0.95):
    """Mean and t-based CI across independent observations (seeds).

    With fewer than 2 values the CI and std are NaN: one seed says nothing
    about seed variance.
    """
    x = np.asarray(values, dtype=float)
    if np.isnan(x).any():
        raise ValueError("mean_ci got NaN values; missing metrics must be handled before")
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else math.nan,
           "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "ci_half": math.nan}
    if n >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * stats.sem(x))
        out.update(std=float(x.std(ddof=1)), ci_half=half,
                   ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def holm(pvalues):
    """Holm step-down adjusted p-values, in the input order; NaN stays NaN and is not counted."""
    p = np.asarray(pvalues, dtype=float)
    adj = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def mcnemar(b, c):
    """Exact McNemar p-value from the discordant counts.

    b: pairs where the method is right and the baseline wrong; c: the reverse.
    """
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5).pvalue)


def paired_bootstrap(diffs_by_stratum, n_boot=10_000, confidence=0.95, seed=0):
    """Percentile CI of the mean paired difference, resampling items within each stratum.

    diffs_by_stratum: list of 1-d arrays, one per seed, of per-item
    differences (method minus baseline). Each resample keeps each stratum's
    size, so seeds are weighted as in the point estimate.
    """
    rng = np.random.default_rng(seed)
    diffs = [np.asarray(d, dtype=float) for d in diffs_by_stratum if len(d)]
    total = sum(len(d) for d in diffs)
    if total == 0:
        return math.nan, math.nan, math.nan
    estimate = float(sum(d.sum() for d in diffs) / total)
    sums = np.zeros(n_boot)
    for d in diffs:
        for start in range(0, n_boot, 1000):  # bounded memory for large test sets
            stop = min(n_boot, start + 1000)
            idx = rng.integers(0, len(d), size=(stop - start, len(d)))
            sums[start:stop] += d[idx].sum(axis=1)
    boot = sums / total
    alpha = 1 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return estimate, float(lo), float(hi)


def paired_permutation_p(x, y, n_resamples=9_999, seed=0):
    """Two-sided paired permutation test (sign flips) of mean(x - y), via scipy."""
    res = stats.permutation_test(
        (np.asarray(x, float), np.asarray(y, float)),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        permutation_type="samples", n_resamples=n_resamples, vectorized=True,
        alternative="two-sided", rng=np.random.default_rng(seed))
    return float(res.pvalue)


# -----------------------------------------------------------------------------
# aggregation across seeds

def _group_key(row):
    return tuple(None if is_missing(row[k]) else row[k] for k in GROUP_KEYS)


def metric_column(metric):
    return metric if metric.startswith("metrics.") else f"metrics.{metric}"


def _independent(completed):
    """Completed runs that are independent observations, and whether the group
    is deterministic. A run reused from another (`reused_from`) and its source
    are one observation; the source run is kept when it is present."""
    obs = {}
    for run in completed:
        own = Path(run["run_dir"]).name
        key = Path(run["reused_from"]).name if is_reused(run) else own
        if key not in obs or own == key:
            obs[key] = run
    return list(obs.values()), any(is_reused(r) for r in completed)


def _groups(runs):
    """{group key: [run rows]}. A run that did not complete has no recorded
    num_latents (it comes from result.json's `bridge`); it joins the group
    that matches it on every other key, when there is exactly one."""
    groups = {}
    records = runs.to_dict("records")
    for run in records:
        if run["status"] == "completed":
            groups.setdefault(_group_key(run), []).append(run)
    i = GROUP_KEYS.index("num_latents")
    for run in records:
        if run["status"] == "completed":
            continue
        key = _group_key(run)
        if key[i] is None:
            same = [k for k in groups if k[:i] + k[i + 1:] == key[:i] + key[i + 1:]]
            if len(same) == 1:
                key = same[0]
        groups.setdefault(key, []).append(run)
    return groups


def summarize(runs, metric="accuracy", confidence=0.95):
    """One row per experiment (GROUP_KEYS), with mean and CI of `metric` across seeds.

    Runs of BENCHMARK_METHODS, and of tasks whose completed runs do not report
    the metric (e.g. accuracy for xsum), are left out; the caller can list them
    from `runs`. A task with no completed run stays in, its groups without a value. Within a task that reports it, a completed run without the
    metric raises MissingMetricError.
    """
    col = metric_column(metric)
    runs = runs[~runs["method"].isin(BENCHMARK_METHODS)]
    if not len(runs):
        return pd.DataFrame(columns=GROUP_KEYS + ["n_runs", "n_completed", "n_independent", "deterministic",
                                                  "mean", "ci_low", "ci_high", "ci_half", "run_dirs"])
    if col not in runs:
        raise MissingMetricError(f"no run reports {col}")
    completed = runs[runs["status"] == "completed"]
    # tasks that report the metric, and tasks with no completed run at all
    # (which might: their failures must show, not vanish from the table)
    tasks = set(completed.loc[completed[col].notna(), "task"]) | (set(runs["task"]) - set(completed["task"]))
    bad = completed[completed["task"].isin(tasks) & completed[col].isna()]
    if len(bad):
        raise MissingMetricError(f"completed runs without {col}:\n  " + "\n  ".join(bad["run_dir"]))
    no_seed = completed[completed["task"].isin(tasks) & completed["seed"].isna()]
    if len(no_seed):
        raise ValueError("completed runs without a seed:\n  " + "\n  ".join(no_seed["run_dir"]))
    dup = completed[completed.duplicated("run_id", keep=False)]
    if len(dup):
        raise ValueError("the same run_id appears in several directories:\n  " + "\n  ".join(dup["run_dir"]))

    groups = _groups(runs[runs["task"].isin(tasks)])
    out = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "completed"]
        indep, deterministic = _independent(done)
        ci = mean_ci([r[col] for r in indep], confidence)
        by_status = pd.Series([r["status"] for r in members]).value_counts().to_dict()
        out.append({
            **dict(zip(GROUP_KEYS, key)),
            "metric": metric, "n_runs": len(members), "n_completed": len(done),
            "n_independent": ci["n"], "deterministic": deterministic,
            "mean": ci["mean"], "std": ci["std"], "ci_low": ci["ci_low"],
            "ci_high": ci["ci_high"], "ci_half": ci["ci_half"],
            "seeds": sorted(int(r["seed"]) for r in done),
            "values": [float(r[col]) for r in indep],
            "status_counts": by_status,
            "incomplete": sorted(r["run_dir"] for r in members if r["status"] != "completed"),
            "run_dirs": sorted(r["run_dir"] for r in members),
        })
    df = pd.DataFrame(out)
    return df.sort_values(["task", "method", "compression"], na_position="first", kind="stable",
                          ignore_index=True)


# -----------------------------------------------------------------------------
# paired comparisons against a baseline method

def _item_key(df):
    return "id" if "id" in df and df["id"].notna().all() else "idx"


def _strata(group_runs, predictions, value_col):
    """{seed or '*': DataFrame(item, value)} for a group's completed runs."""
    done = [r for r in group_runs if r["status"] == "completed"]
    indep, deterministic = _independent(done)
    out = {}
    for run in (indep[:1] if deterministic else done):
        p = predictions[predictions["run_dir"] == run["run_dir"]]
        if not len(p) or value_col not in p:
            continue
        key = _item_key(p)
        vals = p[[key, value_col]].rename(columns={key: "item", value_col: "value"})
        out["*" if deterministic else int(run["seed"])] = vals.astype({"value": float})
    return out


def _matches(a, b):
    """Two groups of one task are comparable when every key both define agrees."""
    for k in GROUP_KEYS:
        if k in ("method", "model"):
            continue
        if not is_missing(a[k]) and not is_missing(b[k]) and a[k] != b[k]:
            return False
    return a["task"] == b["task"]


def compare_to_baseline(runs, predictions, summary, metric="accuracy", baseline_method="bridge",
                        n_boot=10_000, confidence=0.95, seed=0):
    """Paired comparison of every group in `summary` against the baseline group(s)
    of the same task (and same sender/receiver where both define them).

    Accuracy: per-item `correct`, exact McNemar p-value. Other metrics: a
    per-item column named like the metric, paired permutation p-value.
    Holm correction over all comparisons made.
    """
    value_col = "correct" if metric_column(metric) == "metrics.accuracy" else metric.removeprefix("metrics.")
    test = "mcnemar" if value_col == "correct" else "permutation"
    if predictions is None or not len(predictions) or value_col not in predictions:
        return pd.DataFrame()
    members = _groups(runs)
    groups = summary.to_dict("records")
    rows = []
    for g in groups:
        if g["method"] == baseline_method:
            continue
        for base in groups:
            if base["method"] != baseline_method or not _matches(g, base):
                continue
            row = {**{k: g[k] for k in GROUP_KEYS},
                   **{f"baseline.{k}": base[k] for k in GROUP_KEYS if k not in ("task",)},
                   "test": test}
            a = _strata(members[_group_key(g)], predictions, value_col)
            b = _strata(members[_group_key(base)], predictions, value_col)
            if "*" in a and "*" in b:
                pairs = [("*", "*")]
            elif "*" in a:
                pairs = [("*", s) for s in sorted(b)]
            elif "*" in b:
                pairs = [(s, "*") for s in sorted(a)]
            else:
                pairs = [(s, s) for s in sorted(set(a) & set(b))]
            diffs, xs, ys, unpaired = [], [], [], 0
            for sa, sb in pairs:
                m = a[sa].merge(b[sb], on="item", suffixes=("_m", "_b"))
                unpaired += len(a[sa]) + len(b[sb]) - 2 * len(m)
                diffs.append((m["value_m"] - m["value_b"]).to_numpy())
                xs.append(m["value_m"].to_numpy())
                ys.append(m["value_b"].to_numpy())
            n_pairs = sum(len(d) for d in diffs)
            row.update(n_strata=len(pairs), n_pairs=n_pairs, n_unpaired=unpaired)
            if n_pairs == 0:
                row.update(delta=math.nan, delta_ci_low=math.nan, delta_ci_high=math.nan, p=math.nan,
                           note="no paired predictions (missing files or no common seeds)")
                rows.append(row)
                continue
            delta, lo, hi = paired_bootstrap(diffs, n_boot, confidence, seed)
            x, y = np.concatenate(xs), np.concatenate(ys)
            if test == "mcnemar":
                bb, cc = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
                row.update(b=bb, c=cc, p=mcnemar(bb, cc))
            else:
                row["p"] = paired_permutation_p(x, y, seed=seed)
            row.update(delta=delta, delta_ci_low=lo, delta_ci_high=hi,
                       note=f"{unpaired} unpaired items ignored" if unpaired else "")
            rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["p_holm"] = holm(df["p"].to_numpy())
    return df
