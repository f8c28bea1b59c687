"""Figures for papers and notebooks. Each function returns a matplotlib Figure
(built without pyplot, so no global state and no display needed) and, given
`stem`, writes stem.png and stem.pdf."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from telepathy.analysis.runs import BENCHMARK_METHODS, is_missing
from telepathy.analysis.summarise import differing_keys, settings
from telepathy.analysis.tables import settings_cell


def save(fig: Figure, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    return paths


def _label(row: pd.Series, vary: list[str]) -> str:
    """Legend label: the method, the columns that vary, and the settings in which an
    experiment differs from others with the same columns (never one line for two configs)."""
    parts = [str(row["method"])]
    for k in vary:
        v = row[k]
        if not is_missing(v):
            parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    if settings_cell(row.get("differs")):
        parts.append(settings_cell(row["differs"]))
    return " ".join(parts)


def _varying(df: pd.DataFrame, keys: list[str]) -> list[str]:
    return [k for k in keys if k in df and df[k].dropna().astype(str).nunique() > 1]


def accuracy_vs_compression(
    summary: pd.DataFrame, metric: str = "accuracy", scale: float = 100.0, stem: str | Path | None = None
) -> Figure:
    """Mean metric vs nominal compression factor, one panel per task, CI bands across seeds;
    each point is labelled with its measured compression (text tokens per soft token).

    Methods without a compression factor are horizontal lines (band = CI).
    Groups without a CI (one seed, deterministic) are drawn without a band.
    """
    s = summary[summary["n_independent"] > 0]
    if not len(s):
        raise ValueError("no group has a value to plot")
    tasks = sorted(s["task"].unique())
    fig = Figure(figsize=(4.2 * len(tasks), 3.4), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    vary = _varying(s, ["sender", "receiver", "layer", "model"])
    for ax, task in zip(axes, tasks):
        t = s[s["task"] == task]
        with_c = t[t["compression"].notna()]
        colors = iter(f"C{i}" for i in range(100))
        for label, g in with_c.groupby(with_c.apply(lambda r: _label(r, vary), axis=1), sort=True):
            g = g.sort_values("compression")
            color = next(colors)
            x = g["compression"].to_numpy(float)
            ax.plot(x, g["mean"] * scale, "o-", color=color, label=label)
            for xi, yi, mc in zip(x, g["mean"] * scale, g.get("measured_compression", [None] * len(g))):
                if not is_missing(mc):  # the measured ratio beside the nominal factor
                    ax.annotate(
                        f"{mc:.1f}×", (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=6, color=color
                    )
            ok = g["ci_low"].notna().to_numpy()
            ax.fill_between(x[ok], (g["ci_low"] * scale)[ok], (g["ci_high"] * scale)[ok], color=color, alpha=0.2)
        for _, r in t[t["compression"].isna()].iterrows():
            color = next(colors)
            ax.axhline(r["mean"] * scale, color=color, ls="--", label=_label(r, vary))
            if not is_missing(r["ci_low"]):
                ax.axhspan(r["ci_low"] * scale, r["ci_high"] * scale, color=color, alpha=0.12)
        if len(with_c):
            ax.set_xscale("log", base=2)
            ticks = sorted(with_c["compression"].unique())
            ax.set_xticks(ticks, [f"{c:g}" for c in ticks])
        ax.set_title(task)
        ax.set_xlabel("nominal compression factor (labels: measured ×)")
        ax.set_ylabel(metric + (" (%)" if scale == 100 else ""))
        ax.legend(fontsize=7)
    if stem:
        save(fig, stem)
    return fig


# the keys a latency line runs along (its x axis: conf/latency.yaml's batch_size is
# ${eval.batch_size}) and the path that names it; a line's runs agree on every other setting
LATENCY_AXES = ("batch_size", "eval.batch_size", "path")


def latency(runs: pd.DataFrame, stem: str | Path | None = None) -> Figure:
    """Latency per batch (p50, p99 dashed) and throughput vs batch size, from completed
    latency-benchmark runs: one line per path and benchmark config (the runs' settings less
    the batch size). Repeats of one config (seeds) are averaged; runs that differ in any other
    setting (compression, models, task, relay.max_new_tokens, answer, iterations, ...) are
    separate lines, and the legend names the settings in which lines differ."""
    r = runs[runs["method"].isin(BENCHMARK_METHODS) & (runs["status"] == "completed")]
    need = ["batch_size", "path", "metrics.p50_ms", "metrics.p99_ms", "metrics.throughput_eps"]
    missing = [c for c in need if c not in r or r[c].isna().all()]
    if not len(r) or missing:
        raise ValueError(f"no latency results to plot (missing {missing or 'runs'})")
    r = r.astype({"batch_size": int})
    configs = [{k: v for k, v in settings(run).items() if k not in LATENCY_AXES} for run in r.to_dict("records")]
    differ = differing_keys(configs)
    labels = [
        " ".join([str(path)] + ([cell] if (cell := settings_cell({k: c.get(k) for k in differ})) else []))
        for path, c in zip(r["path"], configs)
    ]
    r = r.assign(line=labels)
    agg = r.groupby(["line", "batch_size"], sort=True)[need[2:]].mean().reset_index()
    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    ax_lat, ax_thr = fig.subplots(1, 2)
    for i, (path, g) in enumerate(agg.groupby("line", sort=True)):
        color = f"C{i}"
        ax_lat.plot(g["batch_size"], g["metrics.p50_ms"], "o-", color=color, label=f"{path} p50")
        ax_lat.plot(g["batch_size"], g["metrics.p99_ms"], "x--", color=color, label=f"{path} p99")
        ax_thr.plot(g["batch_size"], g["metrics.throughput_eps"], "o-", color=color, label=path)
    for ax in (ax_lat, ax_thr):
        ax.set_xscale("log", base=2)
        ticks = sorted(agg["batch_size"].unique())
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.set_xlabel("batch size")
        ax.legend(fontsize=7)
    ax_lat.set_ylabel("latency per batch (ms)")
    ax_thr.set_ylabel("throughput (examples/s)")
    if stem:
        save(fig, stem)
    return fig


def training_curves(logs: pd.DataFrame, stem: str | Path | None = None) -> Figure:
    """Training loss and eval accuracy vs step, one row per task, one line per
    run, one colour per experiment."""
    if logs is None or not len(logs) or "step" not in logs:
        raise ValueError("no training logs to plot")
    has_loss = logs["loss"].notna() if "loss" in logs else pd.Series(False, index=logs.index)
    has_eval = logs["eval_accuracy"].notna() if "eval_accuracy" in logs else pd.Series(False, index=logs.index)
    logs = logs[has_loss | has_eval]
    if not len(logs):
        raise ValueError("logs have neither loss nor eval_accuracy rows")
    tasks = sorted(logs["task"].dropna().unique())
    fig = Figure(figsize=(8.4, 3.0 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    vary = _varying(logs, ["compression", "sender", "receiver", "layer", "model"])
    for (ax_loss, ax_eval), task in zip(axes, tasks):
        t = logs[logs["task"] == task]
        labels = t.apply(lambda r: _label(r, vary), axis=1)
        color_of = {lab: f"C{i}" for i, lab in enumerate(sorted(labels.unique()))}
        shown = set()
        for _run_dir, g in t.groupby("run_dir", sort=True):
            lab = labels[g.index[0]]
            kw = {"color": color_of[lab], "alpha": 0.8, "lw": 1}
            if lab not in shown:
                kw["label"] = lab
                shown.add(lab)
            loss = g[has_loss[g.index]].sort_values("step")
            ev = g[has_eval[g.index]].sort_values("step")
            if len(loss):
                ax_loss.plot(loss["step"], loss["loss"], **kw)
            if len(ev):
                ax_eval.plot(
                    ev["step"], ev["eval_accuracy"], "o-", ms=3, **{k: v for k, v in kw.items() if k != "label"}
                )
        ax_loss.set_title(f"{task}: training loss")
        ax_eval.set_title(f"{task}: eval accuracy")
        for ax in (ax_loss, ax_eval):
            ax.set_xlabel("step")
        ax_loss.legend(fontsize=7)
    if stem:
        save(fig, stem)
    return fig
