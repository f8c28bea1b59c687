"""Summarise runs into one row per experiment (mean and CI across seeds) and compare methods pairwise."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from telepathy.analysis.runs import (
    BENCHMARK_METHODS,
    CONFIG_KEY,
    GROUP_KEYS,
    MEASURED,
    MissingMetricError,
    Run,
    is_missing,
    is_reused,
)
from telepathy.stats import holm, item_means, mean_ci, mean_difference_p, seeds_and_items_bootstrap

# aggregation across seeds

# an experiment: the table's columns plus the seedless config id (runs.CONFIG_KEY)
EXPERIMENT_KEYS = GROUP_KEYS + [CONFIG_KEY]
# keys a run that did not complete may lack (they come from result.json); it joins the one
# group that matches it on every other key
_MAY_LACK = [EXPERIMENT_KEYS.index("num_latents"), EXPERIMENT_KEYS.index(CONFIG_KEY)]


def _group_key(row: Run) -> tuple:
    return tuple(None if is_missing(row.get(k)) else row[k] for k in EXPERIMENT_KEYS)


def metric_column(metric: str) -> str:
    return metric if metric.startswith("metrics.") else f"metrics.{metric}"


def _independent(completed: list[dict]) -> tuple[list[dict], bool]:
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


def _groups(runs: pd.DataFrame) -> dict[tuple, list[dict]]:
    """{experiment key: [run rows]}. A run that did not complete may have no
    recorded num_latents or config id (a run that died before result.json); it
    joins the group that matches it on every other key, when there is exactly one."""
    groups = {}
    records = runs.to_dict("records")
    for run in records:
        if run["status"] == "completed":
            groups.setdefault(_group_key(run), []).append(run)
    for run in records:
        if run["status"] == "completed":
            continue
        key = _group_key(run)
        known = [i for i in range(len(key)) if i not in _MAY_LACK or key[i] is not None]
        if len(known) < len(key):
            same = [k for k in groups if all(k[i] == key[i] for i in known)]
            if len(same) == 1:
                key = same[0]
        groups.setdefault(key, []).append(run)
    return groups


def run_flags(run: dict) -> list[str]:
    """The run's ``bridge.flags`` (results.FLAGS: single class, below majority + 0.1, sender unread)."""
    listed = run.get("bridge.flags")
    return [] if is_missing(listed) or not listed else list(json.loads(listed))


def _flagged(done: list[dict]) -> dict[str, list[str]]:
    """{seed: flags} of a group's completed runs that carry any: counted in the mean, marked in every table."""
    return {str(r["seed"]): run_flags(r) for r in done if run_flags(r)}


def _revision(run: dict) -> str | None:
    """The code revision a run recorded (``env.git_rev``, ``+dirty`` for uncommitted changes)."""
    rev = run.get("env.git_rev")
    if is_missing(rev) or not rev:
        return None
    return str(rev)[:10] + ("+dirty" if run.get("env.git_dirty") is True else "")


def _mean_of(runs: list[dict], col: str) -> float:
    """Mean of a measured column over runs that recorded it; NaN when none did."""
    vals = [float(r[col]) for r in runs if not is_missing(r.get(col))]
    return sum(vals) / len(vals) if vals else math.nan


def settings(run: Run) -> dict[str, Any]:
    """The run's config without its seed and the keys that do not define a result
    (`run.id_exclude`), as {dotted key: value}."""
    listed = run.get("config.run.id_exclude")  # NaN in a frame that also holds records without it (latency)
    exclude = (json.loads(listed) if not is_missing(listed) and listed else []) + ["seed", "run"]
    out = {}
    for k, v in run.items():
        if not k.startswith("config.") or is_missing(v):
            continue
        key = k.removeprefix("config.")
        if not any(key == e or key.startswith(e + ".") for e in exclude):
            out[key] = v
    return out


def differing_keys(configs: list[dict]) -> list[str]:
    """The keys whose value is not the same in every one of `configs` ({key: value} dicts,
    a key one of them lacks counts as None), sorted."""
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def _differing_settings(groups: dict[tuple, list[dict]]) -> dict[tuple, dict[str, Any]]:
    """{experiment key: {setting: value}} for experiments that share every table column
    (GROUP_KEYS) but not their config: the settings in which they differ, so that a
    table shows them as separate, labelled rows instead of averaging them."""
    by_columns = {}
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "completed"] or members
        by_columns.setdefault(key[: len(GROUP_KEYS)], []).append((key, settings(done[0])))
    out = {}
    for same in by_columns.values():
        if len(same) < 2:
            continue
        differ = differing_keys([s for _, s in same])
        for key, s in same:
            out[key] = {k: s.get(k) for k in differ}
    return out


def summarise(runs: pd.DataFrame, metric: str = "accuracy", confidence: float = 0.95) -> pd.DataFrame:
    """One row per experiment (GROUP_KEYS), with mean and CI of `metric` across seeds.

    Runs of BENCHMARK_METHODS, and of tasks whose completed runs do not report
    the metric (e.g. accuracy for xsum), are left out; the caller can list them
    from `runs`. A task with no completed run stays in, its groups without a value.
    Within a task that reports it, a completed run without the metric raises MissingMetricError.
    """
    col = metric_column(metric)
    runs = runs[~runs["method"].isin(BENCHMARK_METHODS)]
    if not len(runs):
        return pd.DataFrame(
            columns=EXPERIMENT_KEYS
            + [
                "differs",
                "n_runs",
                "n_completed",
                "n_independent",
                "deterministic",
                "mean",
                "ci_low",
                "ci_high",
                "ci_half",
                "run_dirs",
                "flagged",
                "revisions",
            ]
        )
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
    differs = _differing_settings(groups)
    out = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "completed"]
        indep, deterministic = _independent(done)
        ci = mean_ci([r[col] for r in indep], confidence)
        by_status = pd.Series([r["status"] for r in members]).value_counts().to_dict()
        out.append(
            {
                **dict(zip(EXPERIMENT_KEYS, key)),
                "differs": differs.get(key, {}),
                "metric": metric,
                "n_runs": len(members),
                "n_completed": len(done),
                "n_independent": ci["n"],
                "deterministic": deterministic,
                **{k: _mean_of(done, k) for k in MEASURED},
                "mean": ci["mean"],
                "std": ci["std"],
                "ci_low": ci["ci_low"],
                "ci_high": ci["ci_high"],
                "ci_half": ci["ci_half"],
                "seeds": sorted(int(r["seed"]) for r in done),
                "values": [float(r[col]) for r in indep],
                "status_counts": by_status,
                "incomplete": sorted(r["run_dir"] for r in members if r["status"] != "completed"),
                "run_dirs": sorted(r["run_dir"] for r in members),
                "flagged": _flagged(done),
                "revisions": sorted({_revision(r) for r in done} - {None}),
            }
        )
    df = pd.DataFrame(out)
    return df.sort_values(
        ["task", "method", "compression", CONFIG_KEY], na_position="first", kind="stable", ignore_index=True
    )


# -----------------------------------------------------------------------------
# paired comparisons against a baseline method


def item_column(metric: str) -> str:
    """The predictions.jsonl column that holds ``metric`` per item: ``correct`` for accuracy."""
    return "correct" if metric_column(metric) == "metrics.accuracy" else metric.removeprefix("metrics.")


def _item_key(df: pd.DataFrame) -> str:
    return "id" if "id" in df and df["id"].notna().all() else "idx"


def _strata(group_runs: list[dict], predictions: pd.DataFrame, value_col: str) -> dict[int | str, pd.DataFrame]:
    """{seed or '*': DataFrame(item, value)} for a group's completed runs."""
    done = [r for r in group_runs if r["status"] == "completed"]
    indep, deterministic = _independent(done)
    out = {}
    for run in indep[:1] if deterministic else done:
        p = predictions[predictions["run_dir"] == run["run_dir"]]
        if not len(p) or value_col not in p:
            continue
        key = _item_key(p)
        vals = p[[key, value_col]].rename(columns={key: "item", value_col: "value"})
        out["*" if deterministic else int(run["seed"])] = vals.astype({"value": float})
    return out


def _paired_sides(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """[method seeds, items] and [baseline seeds, items] arrays of the values on the items every
    stratum of both sides has (aligned columns), and how many item rows could not be paired."""
    strata = [*a.values(), *b.values()]
    if not strata:
        return np.empty((0, 0)), np.empty((0, 0)), 0
    common = sorted(set.intersection(*(set(s["item"]) for s in strata)), key=str)

    def matrix(side: dict) -> np.ndarray:
        ordered = [side[k] for k in sorted(side, key=str)]
        return np.array([s.set_index("item").loc[common, "value"].to_numpy(float) for s in ordered])

    rows = sum(len(s) for s in strata)
    xs, ys = matrix(a), matrix(b)
    return xs, ys, rows - len(common) * len(strata)


def paired_comparison(
    a: dict, b: dict, binary: bool, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Δ (method - baseline), its CI and p on the items both sides have: ``a`` and ``b`` are
    ``_strata`` (seed -> per-item values). Items are resampled jointly for every seed, and each
    side's seeds independently (``stats.seeds_and_items_bootstrap``); p is McNemar's for one seed a
    side on 0/1 values, else the permutation test of the mean paired difference
    (``stats.mean_difference_p``). ``b``/``c``: items where the method's seed mean is above/below."""
    xs, ys, unpaired = _paired_sides(a, b)
    n_items = xs.shape[1] if xs.size else 0
    out = {"n_seeds": len(a), "baseline_seeds": len(b), "n_items": n_items, "n_unpaired": unpaired}
    if n_items == 0:
        return {
            **out,
            "delta": math.nan,
            "delta_ci_low": math.nan,
            "delta_ci_high": math.nan,
            "p": math.nan,
            "test": "",
            "note": "no paired predictions (missing files or no common items)",
        }
    delta, lo, hi = seeds_and_items_bootstrap(xs, ys, n_boot, confidence, seed)
    p, test = mean_difference_p(xs, ys, binary, seed=seed)
    x, y = item_means(xs), item_means(ys)
    return {
        **out,
        "delta": delta,
        "delta_ci_low": lo,
        "delta_ci_high": hi,
        "p": p,
        "test": test,
        "b": int((x > y).sum()),
        "c": int((x < y).sum()),
        "note": f"{unpaired} unpaired item rows ignored" if unpaired else "",
    }


def _matches(a: dict, b: dict) -> bool:
    """Two groups of one task are comparable when every key both define agrees."""
    for k in GROUP_KEYS:
        if k in ("method", "model"):
            continue
        if not is_missing(a[k]) and not is_missing(b[k]) and a[k] != b[k]:
            return False
    return a["task"] == b["task"]


def _paired_row(g: dict, base: dict, members, predictions, value_col, n_boot, confidence, seed) -> dict:
    """One row of a comparison table: experiment ``g`` (its columns), ``base`` as ``baseline.*`` and
    ``paired_comparison`` of the two on the items both have."""
    row = {
        **{k: g[k] for k in EXPERIMENT_KEYS},
        "differs": g["differs"],
        **{f"baseline.{k}": base[k] for k in EXPERIMENT_KEYS + ["differs"] if k != "task"},
    }
    a = _strata(members[_group_key(g)], predictions, value_col)
    b = _strata(members[_group_key(base)], predictions, value_col)
    return {**row, **paired_comparison(a, b, value_col == "correct", n_boot, confidence, seed)}


def _with_holm(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table, with Holm's correction over all of them (``p_holm``)."""
    df = pd.DataFrame(rows)
    if len(df):
        df["p_holm"] = holm(df["p"].to_numpy())
    return df


def compare_to_baseline(
    runs: pd.DataFrame,
    predictions: pd.DataFrame | None,
    summary: pd.DataFrame,
    metric: str = "accuracy",
    baseline_method: str = "bridge",
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired comparison of every group in `summary` against the baseline group(s)
    of the same task (and same sender/receiver where both define them).

    ``paired_comparison`` on the items both groups have (docs/results.md says what is resampled):
    Δ = the method's mean over its seeds - the baseline's over its seeds (a deterministic side is
    its one run), CI resampling items and each side's seeds, p of the mean difference (McNemar for
    one seed a side on accuracy's per-item `correct`). Other metrics: the per-item column named
    like the metric. Holm correction over all comparisons made.
    """
    value_col = item_column(metric)
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
            rows.append(_paired_row(g, base, members, predictions, value_col, n_boot, confidence, seed))
    return _with_holm(rows)


def sender_controls(
    runs: pd.DataFrame,
    predictions: pd.DataFrame | None,
    summary: pd.DataFrame,
    metric: str = "accuracy",
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """``summary`` with the shuffled-sender control's columns (``control_delta``, ``control_ci_low``,
    ``control_ci_high``, ``control_p``, ``control_seeds``; NaN where a row has no control): for each
    experiment whose runs scored it (the trained bridge, each test item reading another item's sender
    states), Δ = own - shuffled sender, what the result owes to the sender. Own and control come from
    the same run, so each seed's per-item difference is one row; the CI resamples items (jointly) and
    seeds, p tests the mean (McNemar for one seed on accuracy)."""
    value_col = item_column(metric)
    control_col = f"{value_col}_shuffled_sender"
    cols = ["control_delta", "control_ci_low", "control_ci_high", "control_p", "control_seeds"]
    out = summary.copy()
    for c in cols:
        out[c] = math.nan
    if predictions is None or not len(predictions) or control_col not in predictions or not len(summary):
        return out
    members = _groups(runs)
    for index, g in zip(summary.index, summary.to_dict("records")):
        control = _strata(members[_group_key(g)], predictions, control_col)
        control = {k: v.dropna(subset=["value"]) for k, v in control.items() if v["value"].notna().any()}
        own = {k: v for k, v in _strata(members[_group_key(g)], predictions, value_col).items() if k in control}
        xs, ys, _ = _paired_sides(own, control)
        if not control or not xs.size:
            continue
        delta, lo, hi = seeds_and_items_bootstrap(xs - ys, np.zeros((1, xs.shape[1])), n_boot, confidence, seed)
        p, _ = mean_difference_p(xs, ys, value_col == "correct", seed=seed)
        out.loc[index, cols] = [delta, lo, hi, p, len(xs)]
    return out


def compare_settings(
    runs: pd.DataFrame,
    predictions: pd.DataFrame | None,
    summary: pd.DataFrame,
    metric: str = "accuracy",
    reference: dict[str, str] | None = None,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Ablations are comparisons too: every experiment that shares all table columns (task, method,
    models, compression, ...) with others but differs in a setting (``differs``: a learning rate, a
    bridge init, ...) against the reference setting of its set, paired on the same items as in
    ``compare_to_baseline`` (Δ, CI over items and seeds, p of the mean; Holm over this table).
    ``reference``: {setting: value} the reference must have (``--reference bridge.init=text``); without
    it, or where no member matches, the reference is the member whose settings sort first, and the
    row names it."""
    value_col = item_column(metric)
    if predictions is None or not len(predictions) or value_col not in predictions or not len(summary):
        return pd.DataFrame()
    members = _groups(runs)
    by_columns: dict[tuple, list[dict]] = {}
    for g in summary.to_dict("records"):
        if isinstance(g["differs"], dict) and g["differs"]:
            by_columns.setdefault(tuple(g[k] for k in GROUP_KEYS), []).append(g)
    rows = []
    for same in by_columns.values():
        same.sort(key=lambda g: json.dumps(g["differs"], sort_keys=True, default=str))
        wanted = (reference or {}).items()
        matching = [g for g in same if wanted and all(str(g["differs"].get(k)) == str(v) for k, v in wanted)]
        ref = (matching or same)[0]
        for g in same:
            if g is ref:
                continue
            row = _paired_row(g, ref, members, predictions, value_col, n_boot, confidence, seed)
            rows.append({**row, "reference_named": bool(matching)})
    return _with_holm(rows)


def compare_to_reference(
    runs: pd.DataFrame,
    predictions: pd.DataFrame | None,
    summary: pd.DataFrame,
    metric: str = "accuracy",
    reference: dict[str, str] | None = None,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Ablations across the table's columns (P6: one pair of models against another): every experiment
    against the experiment of the same task and method whose columns match ``reference`` ({column:
    value}, e.g. {"sender": "smollm2_135m", "receiver": "gemma3_270m"}), paired on the items both have as in
    ``compare_to_baseline``: Δ, its CI resampling items (jointly) and each side's seeds, p of the mean
    difference; Holm over this table. Rows carry the reference's columns as ``baseline.*``."""
    value_col = item_column(metric)
    if not reference or predictions is None or not len(predictions) or value_col not in predictions:
        return pd.DataFrame()
    members = _groups(runs)
    groups = summary.to_dict("records")
    rows = []
    for ref in groups:
        if not all(not is_missing(ref.get(k)) and str(ref[k]) == str(v) for k, v in reference.items()):
            continue
        for g in groups:
            if g is ref or g["task"] != ref["task"] or g["method"] != ref["method"]:
                continue
            rows.append(_paired_row(g, ref, members, predictions, value_col, n_boot, confidence, seed))
    return _with_holm(rows)
