"""Phase report: did every run of a phase finish, what did it cost, and can its
numbers go in a paper.

    python -m telepathy report outputs/phase1 [--metric accuracy] [--out DIR] [--check]

Prints Markdown: runs by status; failed and unfinished runs with their error
type; GPU-hours in total and per run (every attempt of a resumed run counts);
peak GPU memory per run against the planned estimate; GPU utilisation where a run recorded it; and the phase's
success checks:

  all runs completed | no out-of-memory failure | valid result.json for every
  run | 3 seeds with confidence intervals (every experiment has >= 3 independent
  seeds, or is deterministic)

``SUCCESS_CHECKS`` is the one list of the plan's success checks, in one wording: this report
shows those the run directories answer; ``python -m telepathy status --plan``
(telepathy/cluster/checklist.py) reads the same list and adds those that need the plan.

--out writes report.md and report.json; --check exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from telepathy import analysis
from telepathy.analysis.tables import jsonable, plain, to_markdown
from telepathy.results import gpus_held, read_result, record_cost

SEEDS_NEEDED = 3  # independent seeds an experiment needs for its CI (a deterministic method needs one)
UTIL_TARGET = 80.0  # % average GPU utilisation the plan aims for
# the success checks, by key: their one wording, here and in `status --plan` (cluster/checklist.py)
SUCCESS_CHECKS = {
    "window": "every phase done in the window",  # needs the plan: status --plan
    "gpu_util": f">{UTIL_TARGET:g}% average GPU utilisation",  # needs the plan's runs' telemetry: status --plan
    "completed": "all runs completed",
    "oom": "no out-of-memory failure",
    "valid": "valid result.json for every run",
    "seeds": f"{SEEDS_NEEDED} seeds with confidence intervals",
}


def gpu_count(run: dict) -> float:
    """GPUs the run held (``results.gpus_held`` on a loaded run's flattened columns); NaN if unknown."""
    names = run.get("env.gpu_names")
    gpus = gpus_held(
        {"gpus": None if analysis.is_missing(run.get("resources.gpus")) else run["resources.gpus"]},
        {"gpu_names": json.loads(names) if isinstance(names, str) else None, "device": run.get("env.device")},
    )
    return np.nan if gpus is None else float(gpus)


def computed_estimate_gb(run: dict) -> float:
    """GPU-memory estimate of telepathy.resources for the run's config, when the
    launcher did not record one (local runs)."""
    from omegaconf import OmegaConf

    from telepathy import resources

    config = (read_result(Path(run["run_dir"])) or {})["config"]
    return float(resources.estimate(OmegaConf.create(config)).total_gb)


def run_cost(run: dict, gpus: float) -> tuple[float, float, int]:
    """(wall seconds, GPU-hours, attempts) of a loaded run over every attempt it recorded
    (``results.record_cost``); NaN where unknown."""
    attempts = run.get("attempts")
    seconds, hours, n = record_cost(
        {
            "reused_from": run.get("reused_from") if analysis.is_reused(run) else None,
            "attempts": json.loads(attempts) if isinstance(attempts, str) else None,  # lists load as JSON text
            "timing": {} if analysis.is_missing(run.get("timing.total_s")) else {"total_s": run["timing.total_s"]},
        },
        None if analysis.is_missing(gpus) else gpus,
    )
    return np.nan if seconds is None else seconds, np.nan if hours is None else hours, n


def resource_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per run that has a result.json: GPU-hours, peak memory vs estimate, utilisation."""
    util_cols = [c for c in runs.columns if "util" in c.lower() and not c.startswith("config.")]
    rows = []
    for run in runs[runs["status"].isin(["completed", "failed", "interrupted", "running"])].to_dict("records"):
        reused = analysis.is_reused(run)
        gpus = gpu_count(run)
        total_s, hours, n_attempts = run_cost(run, gpus)
        est, source = run.get("resources.estimate_gb", np.nan), "recorded"
        if analysis.is_missing(est) and not reused:
            try:
                est, source = computed_estimate_gb(run), "computed"
            except Exception as e:  # an old or foreign config: say so, do not guess
                est, source = np.nan, f"unavailable ({type(e).__name__})"
        peak_mb = run.get("memory.peak_gpu_mb", np.nan)
        rss = run.get("memory.peak_rss_mb", np.nan)
        peak_gb = np.nan if analysis.is_missing(peak_mb) else peak_mb / 1024
        rows.append(
            {
                "run_id": run["run_id"],
                "status": run["status"],
                "reused": reused,
                "gpus": gpus,
                "attempts": n_attempts,
                "total_s": total_s,
                "gpu_hours": hours,
                "peak_gpu_gb": peak_gb,
                "estimate_gb": est,
                "estimate_source": source if not analysis.is_missing(est) or source != "recorded" else "not recorded",
                "peak_over_estimate": (peak_gb / est)
                if not (analysis.is_missing(peak_gb) or analysis.is_missing(est) or est == 0)
                else np.nan,
                "peak_rss_gb": np.nan if analysis.is_missing(rss) else rss / 1024,
                **{c: run.get(c) for c in util_cols},
            }
        )
    return pd.DataFrame(rows), util_cols


def checks(runs: pd.DataFrame, metric: str = "accuracy") -> list[tuple[str, bool, str]]:
    """The phase's success criteria that its run directories answer, each (name, passed, detail)."""
    out = []
    n = len(runs)
    done = int((runs["status"] == "completed").sum())
    out.append((SUCCESS_CHECKS["completed"], done == n, f"{done}/{n} completed"))
    oom = runs["error.oom"].fillna(False).astype(bool) if "error.oom" in runs else pd.Series(False, index=runs.index)
    oom |= runs["error.type"].fillna("").str.contains("OutOfMemory")
    out.append(
        (
            SUCCESS_CHECKS["oom"],
            not oom.any(),
            f"{int(oom.sum())} OOM: " + ", ".join(runs.loc[oom, "run_id"]) if oom.any() else "none",
        )
    )
    bad = runs["status"].isin(["missing", "malformed"])
    out.append(
        (
            SUCCESS_CHECKS["valid"],
            not bad.any(),
            f"{int(bad.sum())} without one: " + ", ".join(runs.loc[bad, "run_id"]) if bad.any() else "all valid",
        )
    )
    try:
        s = analysis.summarise(runs, metric)
        short = s[(s["n_independent"] < SEEDS_NEEDED) & ~s["deterministic"]]
        detail = (
            f"{len(s) - len(short)}/{len(s)} experiments have >= {SEEDS_NEEDED} seeds of {metric} "
            "or are deterministic"
            + (
                "; short: "
                + "; ".join(
                    f"{r.task}/{r.method}"
                    + (f"/c{plain(r.compression)}" if not analysis.is_missing(r.compression) else "")
                    + f" n={r.n_independent}"
                    for r in short.itertuples()
                )
                if len(short)
                else ""
            )
        )
        out.append((SUCCESS_CHECKS["seeds"], len(s) > 0 and not len(short), detail))
    except ValueError as e:  # MissingMetricError, missing seeds, duplicated runs
        out.append((SUCCESS_CHECKS["seeds"], False, str(e).replace("\n", " ")))
    return out


def _num(v: float, fmt: str) -> str:
    return "—" if analysis.is_missing(v) else format(v, fmt)


def build_report(phase_dir: str | Path, metric: str = "accuracy") -> tuple[str, dict]:
    runs = analysis.load_runs(phase_dir)
    res, util_cols = resource_table(runs)
    results = checks(runs, metric)
    lines = [f"# Phase report: {phase_dir}", ""]

    counts = runs["status"].value_counts()
    lines += ["## Runs by status", "", to_markdown(["status", "runs"], [[k, str(v)] for k, v in counts.items()], [])]

    bad = runs[runs["status"] != "completed"]
    if len(bad):
        rows = [
            [
                r["run_id"],
                r["status"],
                plain(r["error.type"]) or "—",
                "yes" if not analysis.is_missing(r.get("error.oom")) and bool(r["error.oom"]) else "",
                (plain(r["error.message"]) or "").splitlines()[0][:120] if plain(r["error.message"]) else "",
                r["run_dir"],
            ]
            for r in bad.to_dict("records")
        ]
        lines += [
            "## Not completed",
            "",
            to_markdown(["run", "status", "error type", "OOM", "message", "run dir"], rows, []),
        ]

    total = res["gpu_hours"].sum(min_count=1) if len(res) else np.nan
    unknown = int(res["gpu_hours"].isna().sum()) if len(res) else 0
    lines += [
        "## Compute and memory",
        "",
        f"Total GPU-hours: {_num(total, '.3f')}"
        + (f" ({unknown} runs with unknown GPU count or time not included)" if unknown else "")
        + f"; wall-clock hours of all runs: {_num(res['total_s'].sum() / 3600 if len(res) else np.nan, '.3f')}.",
        "",
    ]
    if len(res):
        header = [
            "run",
            "status",
            "GPUs",
            "attempts",
            "time (s)",
            "GPU-h",
            "peak GPU (GB)",
            "estimate (GB)",
            "peak / est.",
            "peak RSS (GB)",
        ] + util_cols
        rows = [
            [
                r["run_id"] + (" (reused)" if r["reused"] else ""),
                r["status"],
                _num(r["gpus"], "g"),
                str(r["attempts"]),
                _num(r["total_s"], ".0f"),
                _num(r["gpu_hours"], ".3f"),
                _num(r["peak_gpu_gb"], ".2f"),
                _num(r["estimate_gb"], ".2f") + (" (computed)" if r["estimate_source"] == "computed" else ""),
                _num(r["peak_over_estimate"], ".2f"),
                _num(r["peak_rss_gb"], ".2f"),
            ]
            + [plain(r[c]) or "—" for c in util_cols]
            for r in res.to_dict("records")
        ]
        notes = [
            "Time and GPU-h sum every attempt of a run (a preempted, killed or failed run that resumed "
            "paid for each). Reused runs (deterministic methods) computed nothing: 0 s, 0 GPU-h. Peak GPU memory is "
            "torch's max allocated, summed over devices; — = not recorded (CPU run or not measured)."
        ]
        notes.append("GPU utilisation: " + (", ".join(util_cols) if util_cols else "not recorded by these runs") + ".")
        no_est = res[res["estimate_source"].str.startswith("unavailable")]
        if len(no_est):
            notes.append(
                f"{len(no_est)} runs recorded no estimate and none could be computed from their config: "
                + ", ".join(f"{r.run_id} {r.estimate_source}" for r in no_est.itertuples())
                + "."
            )
        over = res[res["peak_over_estimate"] > 1]
        if len(over):
            notes.append(f"{len(over)} runs peaked above their estimate: " + ", ".join(over["run_id"]) + ".")
        lines += [to_markdown(header, rows, notes)]

    lines += [
        "## Success checks",
        "",
        to_markdown(
            ["check", "result", "detail"],
            [[name, "PASS" if ok else "FAIL", detail] for name, ok, detail in results],
            [],
        ),
    ]
    record = jsonable(
        {
            "phase_dir": str(phase_dir),
            "metric": metric,
            "runs_by_status": counts.to_dict(),
            "not_completed": bad[["run_dir", "status", "error.type", "error.message"]].to_dict("records"),
            "gpu_hours_total": total,
            "runs": res.to_dict("records"),
            "checks": [{"check": n, "passed": ok, "detail": d} for n, ok, d in results],
        }
    )
    return "\n".join(lines), record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m telepathy report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("phase_dir", help="a phase's output dir (or any dir / glob of runs)")
    ap.add_argument("--metric", default="accuracy", help="metric whose seeds and CIs are checked")
    ap.add_argument("--out", help="also write report.md and report.json here")
    ap.add_argument("--check", action="store_true", help="exit 1 when a success check fails")
    args = ap.parse_args(argv)
    md, record = build_report(args.phase_dir, args.metric)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(md)
        (out / "report.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    if args.check and not all(c["passed"] for c in record["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
