"""Aggregate a sweep into paper tables, summary.json and plots.

    python -m telepathy.aggregate outputs/runs [more dirs or globs] [--out DIR]
        [--metric accuracy] [--baseline-method bridge]

Writes, under --out (default: <first input dir>/summary, or <dir>/../summary
for a dir named runs, so outputs/runs -> outputs/summary):
  summary.json   every number in the tables, plus incomplete runs
  summary.md     Markdown tables (metric per task x method; paired comparisons)
  summary.tex    the same tables as LaTeX (booktabs)
  accuracy_vs_compression.{png,pdf}, training_curves.{png,pdf}, latency.{png,pdf}
                 when the runs have what each plot needs
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from telepathy import analysis
from telepathy.analysis import is_missing

METRIC_NAMES = {"accuracy": "Accuracy", "macro_f1": "Macro-F1", "rouge1": "ROUGE-1",
                "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
OPTIONAL_COLUMNS = ["sender", "receiver", "num_latents", "layer", "model"]
COLUMN_NAMES = {"task": "Task", "method": "Method", "sender": "Sender", "receiver": "Receiver",
                "compression": "Compression", "num_latents": "Latents", "layer": "Layer", "model": "Model"}


def build(paths, metric="accuracy", baseline_method="bridge", confidence=0.95, n_boot=10_000, seed=0):
    """Load runs (or take a load_runs DataFrame) and compute everything the
    tables show. Returns a dict of DataFrames: runs, summary, comparisons, logs."""
    runs = paths if isinstance(paths, pd.DataFrame) else analysis.load_runs(paths)
    summary = analysis.summarize(runs, metric, confidence)
    predictions = analysis.load_predictions(runs[runs["status"] == "completed"])
    comparisons = analysis.compare_to_baseline(runs, predictions, summary, metric, baseline_method,
                                               n_boot=n_boot, confidence=confidence, seed=seed)
    logs = analysis.load_logs(runs)
    return {"runs": runs, "summary": summary, "comparisons": comparisons, "logs": logs}


# -----------------------------------------------------------------------------
# formatting

def _fmt(v, scale, digits):
    return "—" if is_missing(v) else f"{v * scale:.{digits}f}"


def _plain(v):
    if is_missing(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return f"{v:g}"
    return str(v)


def metric_cell(g, scale=100.0, digits=1):
    """'mean ± half-width' of the 95% CI; no CI where there is no seed variance to show."""
    if g["n_independent"] == 0:
        return "—"
    if g["n_independent"] >= 2:
        return f"{_fmt(g['mean'], scale, digits)} ± {_fmt(g['ci_half'], scale, digits)}"
    return _fmt(g["mean"], scale, digits)


def n_cell(g):
    n = int(g["n_independent"])
    if g["deterministic"] and n == 1:
        return "1 (det.)"
    if n == 1:
        return "1 (no CI)"
    return str(n)


def _not_completed(g):
    counts = {k: v for k, v in g["status_counts"].items() if k != "completed"}
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def metric_table(summary, metric="accuracy", scale=100.0, digits=1):
    """(header, rows, caption notes) of the main table: one row per experiment."""
    keys = ["task", "method"]
    if summary["compression"].notna().any():
        keys.append("compression")
    constant = {}
    for k in OPTIONAL_COLUMNS:
        vals = summary[k].dropna().map(_plain).unique()
        if len(vals) > 1:
            keys.append(k)
        elif len(vals) == 1:
            constant[k] = vals[0] + (" (where used)" if summary[k].isna().any() else "")
    name = METRIC_NAMES.get(metric, metric) + (" (%)" if scale == 100 else "")
    header = [COLUMN_NAMES[k] for k in keys] + [f"{name}, mean ± 95% CI", "n seeds"]
    show_incomplete = summary.apply(_not_completed, axis=1).ne("").any()
    if show_incomplete:
        header.append("Not completed")
    rows = []
    for g in summary.to_dict("records"):
        row = [_plain(g[k]) for k in keys] + [metric_cell(g, scale, digits), n_cell(g)]
        if show_incomplete:
            row.append(_not_completed(g))
        rows.append(row)
    notes = ["Mean over independent seeds ± half-width of the 95% Student-t interval; "
             "n seeds = independent completed runs."]
    if summary["deterministic"].any():
        notes.append("det. = deterministic method: one result reused across seeds, counted once, no CI.")
    if (~summary["deterministic"] & (summary["n_independent"] == 1)).any():
        notes.append("no CI = a single seed; a CI needs at least 2.")
    if constant:
        notes.append("All rows: " + "; ".join(f"{COLUMN_NAMES[k].lower()} = {v}" for k, v in constant.items()) + ".")
    return header, rows, notes


def _baseline_desc(c, vary):
    parts = []
    for k in vary:
        v = c.get(f"baseline.{k}")
        if not is_missing(v):
            parts.append(f"{COLUMN_NAMES[k].lower()}={_plain(v)}")
    return f"{c['baseline.method']}" + (f" ({', '.join(parts)})" if parts else "")


def comparison_table(comparisons, metric="accuracy", scale=100.0, digits=1):
    keys = ["task", "method"]
    if comparisons["compression"].notna().any():
        keys.append("compression")
    keys += [k for k in OPTIONAL_COLUMNS if comparisons[k].dropna().map(_plain).nunique() > 1]
    unit = " (pp)" if scale == 100 else ""
    mcnemar = (comparisons["test"] == "mcnemar").all()
    header = [COLUMN_NAMES[k] for k in keys] + ["vs", f"Δ{unit} [95% CI]", "pairs",
                                                "p (McNemar)" if mcnemar else "p (paired perm.)", "p (Holm)"]
    if mcnemar:
        header.insert(-2, "wins / losses")
    base_keys = [k for k in ("compression", "num_latents", "layer", "model")
                 if comparisons[f"baseline.{k}"].dropna().map(_plain).nunique() > 1]
    rows = []
    for c in comparisons.to_dict("records"):
        delta = "—" if is_missing(c["delta"]) else (
            f"{c['delta'] * scale:+.{digits}f} [{c['delta_ci_low'] * scale:+.{digits}f}, "
            f"{c['delta_ci_high'] * scale:+.{digits}f}]")
        row = [_plain(c[k]) for k in keys] + [_baseline_desc(c, base_keys), delta, str(int(c["n_pairs"]))]
        if mcnemar:
            row.append("—" if is_missing(c.get("b")) else f"{int(c['b'])} / {int(c['c'])}")
        row += [_pfmt(c["p"]), _pfmt(c["p_holm"])]
        rows.append(row)
    notes = ["Paired on the same test items and seeds; Δ = method − baseline with a paired bootstrap "
             "95% CI (items resampled within each seed). "
             + ("McNemar exact test on pooled discordant pairs; " if mcnemar else "Paired permutation test; ")
             + f"Holm correction over all {len(comparisons)} comparisons."]
    if mcnemar:
        notes.append("wins / losses = items the method gets right and the baseline wrong / the reverse.")
    return header, rows, notes


def _pfmt(p):
    if is_missing(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def to_markdown(header, rows, notes):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    return text + "".join(f"\n_{n}_\n" for n in notes)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s):
    s = "".join(_TEX.get(ch, ch) for ch in str(s))
    return (s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "--")
            .replace("−", "-").replace("<0.001", "$<$0.001"))


def to_latex(header, rows, notes, caption):
    cols = "l" * (len(header) - 1) + "r"
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{_tex(caption)} {' '.join(_tex(n) for n in notes)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# summary.json

def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if is_missing(v):
        return None
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def summary_record(result, paths, metric, baseline_method, confidence):
    runs, summary, comparisons = result["runs"], result["summary"], result["comparisons"]
    reported = set(summary["run_dirs"].explode()) if len(summary) else set()
    not_reported = runs[~runs["run_dir"].isin(reported)]
    incomplete = runs[runs["status"] != "completed"]
    return _jsonable({
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in paths],
        "metric": metric,
        "baseline_method": baseline_method,
        "confidence": confidence,
        "runs": {"total": len(runs), "by_status": runs["status"].value_counts().to_dict()},
        "incomplete": incomplete[["run_dir", "status", "task", "method", "seed", "error.type",
                                  "error.message"]].to_dict("records"),
        "groups": summary.to_dict("records"),
        "comparisons": comparisons.to_dict("records"),
        "not_in_tables": not_reported[["run_dir", "status", "task", "method"]].to_dict("records"),
    })


# -----------------------------------------------------------------------------

def write_outputs(result, out, paths, metric="accuracy", baseline_method="bridge", confidence=0.95,
                  scale=100.0, digits=1):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, comparisons = result["summary"], result["comparisons"]
    name = METRIC_NAMES.get(metric, metric)
    tables = []
    if len(summary):
        tables.append((f"{name} per task and method.", metric_table(summary, metric, scale, digits)))
    if len(comparisons):
        tables.append((f"{name}: paired comparison with {baseline_method}.",
                       comparison_table(comparisons, metric, scale, digits)))
    md = "\n".join(f"### {cap}\n\n{to_markdown(*t)}" for cap, t in tables) or "No task runs to tabulate.\n"
    (out / "summary.md").write_text(md)
    (out / "summary.tex").write_text("\n".join(to_latex(*t, caption=cap) for cap, t in tables))
    record = summary_record(result, paths, metric, baseline_method, confidence)
    (out / "summary.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")

    from telepathy import plots
    written, skipped = ["summary.json", "summary.md", "summary.tex"], []
    jobs = [("accuracy_vs_compression", lambda s: plots.accuracy_vs_compression(summary, metric, scale, s)),
            ("training_curves", lambda s: plots.training_curves(result["logs"], s)),
            ("latency", lambda s: plots.latency(result["runs"], s))]
    for stem, fn in jobs:
        try:
            fn(out / stem)
            written += [f"{stem}.png", f"{stem}.pdf"]
        except ValueError as e:  # the runs lack what this plot needs
            skipped.append(f"{stem}: {e}")
    return md, written, skipped


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m telepathy.aggregate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run dirs, sweep dirs or glob patterns (quote globs)")
    ap.add_argument("--out", help="output dir (default: <first input dir>/summary; outputs/runs -> outputs/summary)")
    ap.add_argument("--metric", default="accuracy", help="key of result.json metrics (default: accuracy)")
    ap.add_argument("--baseline-method", default="bridge", help="method the others are compared with")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed of the bootstrap")
    ap.add_argument("--percent", action=argparse.BooleanOptionalAction, default=True,
                    help="show metrics x100 and differences in percentage points (default: on)")
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
    result = build(args.paths, args.metric, args.baseline_method, args.confidence, args.n_boot, args.seed)
    runs = result["runs"]
    bad = runs[runs["status"] != "completed"]
    for r in bad.to_dict("records"):
        msg = f" ({r['error.type']}: {r['error.message']})" if isinstance(r["error.type"], str) else ""
        print(f"NOT COMPLETED [{r['status']}] {r['run_dir']}{msg}", file=sys.stderr)
    md, written, skipped = write_outputs(result, out, args.paths, args.metric, args.baseline_method,
                                         args.confidence, 100.0 if args.percent else 1.0, args.digits)
    print(md)
    counts = ", ".join(f"{v} {k}" for k, v in runs["status"].value_counts().items())
    print(f"{len(runs)} runs ({counts}); wrote {', '.join(written)} to {out}", file=sys.stderr)
    for s in skipped:
        print(f"no plot {s}", file=sys.stderr)


if __name__ == "__main__":
    main()
