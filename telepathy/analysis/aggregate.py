"""Aggregate a sweep into paper tables, summary.json and plots.

    python -m telepathy aggregate outputs/runs [more dirs or globs] [--out DIR]
        [--metric accuracy] [--baseline-method bridge] [--reference SETTING=VALUE ...]

Writes, under --out (default: <first input dir>/summary, or <dir>/../summary
for a dir named runs, so outputs/runs -> outputs/summary):
  summary.json   every number in the tables, plus incomplete runs
  summary.md     Markdown tables (metric per task x method with the shuffled-sender control and
                 flags; paired comparisons with the baseline method; settings of one method
                 compared with its reference setting)
  summary.tex    the same tables as LaTeX (booktabs)
  accuracy_vs_compression.{png,pdf}, training_curves.{png,pdf}, latency.{png,pdf}
                 when the runs have what each plot needs
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import pandas as pd

from telepathy import analysis
from telepathy.analysis.runs import RunPaths
from telepathy.analysis.tables import (
    METRIC_NAMES,
    comparison_table,
    jsonable,
    metric_table,
    sender_cut_note,
    to_latex,
    to_markdown,
)


def build(
    paths: pd.DataFrame | RunPaths,
    metric: str = "accuracy",
    baseline_method: str = "bridge",
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    reference: dict[str, str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Load runs (or take a load_runs DataFrame) and compute everything the tables show. Returns
    a dict of DataFrames: runs, summary (with the shuffled-sender control's columns), comparisons
    (with ``baseline_method``), settings (each setting against the ``reference`` one), logs."""
    runs = paths if isinstance(paths, pd.DataFrame) else analysis.load_runs(paths)
    summary = analysis.summarise(runs, metric, confidence)
    predictions = analysis.load_predictions(runs[runs["status"] == "completed"])
    stats = {"n_boot": n_boot, "confidence": confidence, "seed": seed}
    comparisons = analysis.compare_to_baseline(runs, predictions, summary, metric, baseline_method, **stats)
    summary = analysis.sender_controls(runs, predictions, summary, metric, **stats)
    settings = analysis.compare_settings(runs, predictions, summary, metric, reference, **stats)
    logs = with_settings(analysis.load_logs(runs), summary)
    return {"runs": runs, "summary": summary, "comparisons": comparisons, "settings": settings, "logs": logs}


def with_settings(per_run: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """``per_run`` rows (logs, predictions) with their experiment's ``differs``: the settings in which it
    differs from experiments of the same columns, so a plot labels each setting (two learning rates of
    the bridge are two labelled lines, never one)."""
    if not len(per_run) or not len(summary):
        return per_run
    differs = {run_dir: g["differs"] for g in summary.to_dict("records") for run_dir in g["run_dirs"]}
    return per_run.assign(differs=per_run["run_dir"].map(differs))


def summary_record(
    result: dict[str, pd.DataFrame], paths: list[str | Path], metric: str, baseline_method: str, confidence: float
) -> dict:
    runs, summary, comparisons = result["runs"], result["summary"], result["comparisons"]
    reported = set(summary["run_dirs"].explode()) if len(summary) else set()
    not_reported = runs[~runs["run_dir"].isin(reported)]
    incomplete = runs[runs["status"] != "completed"]
    return jsonable(
        {
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "inputs": [str(p) for p in paths],
            "metric": metric,
            "baseline_method": baseline_method,
            "confidence": confidence,
            "runs": {"total": len(runs), "by_status": runs["status"].value_counts().to_dict()},
            "incomplete": incomplete[
                ["run_dir", "status", "task", "method", "seed", "error.type", "error.message"]
            ].to_dict("records"),
            "groups": summary.to_dict("records"),
            "comparisons": comparisons.to_dict("records"),
            "settings_comparisons": result["settings"].to_dict("records"),
            "not_in_tables": not_reported[["run_dir", "status", "task", "method"]].to_dict("records"),
        }
    )


# -----------------------------------------------------------------------------


def write_outputs(
    result: dict[str, pd.DataFrame],
    out: str | Path,
    paths: list[str | Path],
    metric: str = "accuracy",
    baseline_method: str = "bridge",
    confidence: float = 0.95,
    scale: float = 100.0,
    digits: int = 1,
) -> tuple[str, list[str], list[str]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, comparisons = result["summary"], result["comparisons"]
    name = METRIC_NAMES.get(metric, metric)
    tables = []
    if len(summary):
        tables.append((f"{name} per task and method.", metric_table(summary, metric, scale, digits)))
    if len(comparisons):
        tables.append(
            (f"{name}: paired comparison with {baseline_method}.", comparison_table(comparisons, metric, scale, digits))
        )
    if len(result["settings"]):
        tables.append(
            (
                f"{name}: each setting against the reference setting of the same method and columns.",
                comparison_table(result["settings"], metric, scale, digits),
            )
        )
    md = "\n".join(f"### {cap}\n\n{to_markdown(*t)}" for cap, t in tables) or "No task runs to tabulate.\n"
    (out / "summary.md").write_text(md)
    (out / "summary.tex").write_text("\n".join(to_latex(*t, caption=cap) for cap, t in tables))
    record = summary_record(result, paths, metric, baseline_method, confidence)
    (out / "summary.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")

    from telepathy.analysis import plots

    written, skipped = ["summary.json", "summary.md", "summary.tex"], []
    jobs = [
        ("accuracy_vs_compression", lambda s: plots.accuracy_vs_compression(summary, metric, scale, s)),
        ("training_curves", lambda s: plots.training_curves(result["logs"], s, scale)),
        ("latency", lambda s: plots.latency(result["runs"], s)),
    ]
    for stem, fn in jobs:
        try:
            fn(out / stem)
            written += [f"{stem}.png", f"{stem}.pdf"]
        except ValueError as e:  # the runs lack what this plot needs
            skipped.append(f"{stem}: {e}")
    return md, written, skipped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m telepathy aggregate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("paths", nargs="+", help="run dirs, sweep dirs or glob patterns (quote globs)")
    ap.add_argument("--out", help="output dir (default: <first input dir>/summary; outputs/runs -> outputs/summary)")
    ap.add_argument("--metric", default="accuracy", help="key of result.json metrics (default: accuracy)")
    ap.add_argument("--baseline-method", default="bridge", help="method the others are compared with")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed of the bootstrap")
    ap.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="the reference of the settings comparisons (repeatable, e.g. bridge.init=text); default: the "
        "setting that sorts first",
    )
    ap.add_argument(
        "--percent",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show metrics x100 and differences in percentage points (default: on)",
    )
    ap.add_argument("--digits", type=int, default=1)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    out = args.out
    if out is None:
        first = Path(args.paths[0])
        if not first.is_dir():
            ap.error("--out is required when the first input is not a directory")
        # beside a runs/ dir, not in it: every entry of runs/ is a run
        out = (first.parent if first.resolve().name == "runs" else first) / "summary"
    bad_ref = [r for r in args.reference if "=" not in r]
    if bad_ref:
        ap.error(f"--reference {bad_ref[0]!r} is not allowed; allowed: SETTING=VALUE, e.g. bridge.init=text")
    reference = dict(r.split("=", 1) for r in args.reference)
    result = build(args.paths, args.metric, args.baseline_method, args.confidence, args.n_boot, args.seed, reference)
    runs = result["runs"]
    bad = runs[runs["status"] != "completed"]
    for r in bad.to_dict("records"):
        msg = f" ({r['error.type']}: {r['error.message']})" if isinstance(r["error.type"], str) else ""
        print(f"NOT COMPLETED [{r['status']}] {r['run_dir']}{msg}", file=sys.stderr)
    md, written, skipped = write_outputs(
        result,
        out,
        args.paths,
        args.metric,
        args.baseline_method,
        args.confidence,
        100.0 if args.percent else 1.0,
        args.digits,
    )
    print(md)
    cut_note = sender_cut_note(result["summary"])  # also in summary.md/.tex under the table
    if cut_note:
        print(f"WARNING: {cut_note}", file=sys.stderr)
    counts = ", ".join(f"{v} {k}" for k, v in runs["status"].value_counts().items())
    print(f"{len(runs)} runs ({counts}); wrote {', '.join(written)} to {out}", file=sys.stderr)
    for s in skipped:
        print(f"no plot {s}", file=sys.stderr)


if __name__ == "__main__":
    main()
