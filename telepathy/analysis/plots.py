"""Figures for papers and notebooks. Each function returns a matplotlib Figure
(built without pyplot, so no global state and no display needed) and, given
`stem`, writes stem.png and stem.pdf.

What every figure keeps, so that a reader can compare them side by side:

* one colour per method, the same in every panel and every figure (``PALETTE``; the latency
  benchmark's paths take the colour of the method they time); the variants of a method (another
  compression factor, model, setting) are shades of its colour, in numeric order;
* legends in numeric order (compression 4, 8, 16, never 16, 4, 8);
* metrics in the table's units (x100 with ``scale=100``), and confidence bands clipped to the
  metric's range (an accuracy CI never leaves [0, 100] %);
* horizontal baselines at the same value drawn with interleaved dashes, so both stay visible.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from telepathy.analysis.runs import BENCHMARK_METHODS, is_missing
from telepathy.analysis.summarise import differing_keys, settings
from telepathy.analysis.tables import METRIC_NAMES, settings_cell

# one colour per method (matplotlib's tab10), in the order of telepathy.methods.REGISTRY
PALETTE = {
    "bridge": "#1f77b4",
    "zeroshot": "#ff7f0e",
    "fewshot": "#2ca02c",
    "text_relay": "#d62728",
    "llmlingua": "#9467bd",
    "ensemble": "#8c564b",
    "linear_probe": "#e377c2",
    "prompt_tuning": "#7f7f7f",
    "lora": "#bcbd22",
}
OTHER_COLOURS = ["#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
# the latency benchmark's paths, drawn in the colour of the method whose inference they time
PATH_METHOD = {"bridge": "bridge", "text_relay": "text_relay", "direct": "zeroshot"}


def colour(method: str) -> str:
    """The method's colour in every figure (any other name: a fixed colour of its own)."""
    if method in PALETTE:
        return PALETTE[method]
    return OTHER_COLOURS[zlib.crc32(str(method).encode()) % len(OTHER_COLOURS)]


def shade(base: str, i: int, n: int) -> tuple[float, float, float]:
    """The i-th of n shades of ``base``: darker to lighter, the middle one ``base`` itself."""
    if n <= 1:
        return to_rgb(base)
    t = -0.35 + 0.75 * i / (n - 1)  # < 0: towards black, > 0: towards white
    target = 1.0 if t > 0 else 0.0
    return tuple(c + abs(t) * (target - c) for c in to_rgb(base))


def value_range(metric: str, scale: float) -> tuple[float, float] | None:
    """The range a metric can take, in plot units: fractions (accuracy, F1, ROUGE) are [0, scale]."""
    name = metric.removeprefix("eval_")
    if name in METRIC_NAMES or re.search(r"(accuracy|f1|rouge\w*)$", name):
        return 0.0, scale
    return None


def _clip(values, bounds):
    if bounds is None:
        return values
    return values.clip(*bounds)


def _number(v):
    """A sort key that orders numbers as numbers (4 < 8 < 16) and everything else as text after them."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, math.inf, str(v))


def _order(text: str) -> tuple:
    """Natural order of a label: ``bridge compression=4`` before ``bridge compression=16``."""
    return tuple(_number(part) for part in re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", text) if part)


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


def _colours(labels_by_method: dict[str, set[str]], method_of=lambda m: m) -> dict[str, tuple]:
    """label -> colour: the method's colour, one shade per label of that method in natural order."""
    out = {}
    for method, labels in labels_by_method.items():
        ordered = sorted(labels, key=_order)
        for i, label in enumerate(ordered):
            out[label] = shade(colour(method_of(method)), i, len(ordered))
    return out


def _legend_below(fig: Figure, handles: dict[str, Line2D], ncol: int = 3) -> None:
    """One legend for every panel, under them, in natural order read row by row (matplotlib fills
    a legend's columns first, so the entries are handed to it column by column)."""
    labels = sorted(handles, key=_order)
    ncol = min(ncol, len(labels)) or 1
    rows = math.ceil(len(labels) / ncol)
    by_column = [labels[r * ncol + c] for c in range(ncol) for r in range(rows) if r * ncol + c < len(labels)]
    fig.legend(
        [handles[k] for k in by_column], by_column, loc="outside lower center", ncol=ncol, fontsize=7, frameon=False
    )


def accuracy_vs_compression(
    summary: pd.DataFrame, metric: str = "accuracy", scale: float = 100.0, stem: str | Path | None = None
) -> Figure:
    """Mean metric vs nominal compression factor, one panel per task, CI bands across seeds;
    each point is labelled with its measured compression (text tokens per soft token).

    Methods without a compression factor are horizontal lines (band = CI); lines at the same
    value interleave their dashes. Groups without a CI (one seed, deterministic) have no band.
    One legend under the panels: a method's colour is the same in every panel.
    """
    s = summary[summary["n_independent"] > 0]
    if not len(s):
        raise ValueError("no group has a value to plot")
    tasks = sorted(s["task"].unique())
    bounds = value_range(metric, scale)
    fig = Figure(figsize=(4.2 * len(tasks), 3.9), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    vary = _varying(s, ["sender", "receiver", "layer", "model"])
    labels = s.apply(lambda r: _label(r, vary), axis=1)
    by_method: dict[str, set[str]] = {}
    for method, label in zip(s["method"], labels):
        by_method.setdefault(method, set()).add(label)
    colour_of = _colours(by_method)
    handles: dict[str, Line2D] = {}
    for ax, task in zip(axes, tasks):
        t = s[s["task"] == task]
        with_c = t[t["compression"].notna()]
        for label, g in sorted(with_c.groupby(labels[with_c.index], sort=False), key=lambda kv: _order(kv[0])):
            g = g.sort_values("compression")
            color = colour_of[label]
            x = g["compression"].to_numpy(float)
            y = (g["mean"] * scale).to_numpy(float)
            (handles[label],) = ax.plot(x, y, "o-", color=color, label=label)
            for xi, yi, mc in zip(x, y, g.get("measured_compression", [None] * len(g))):
                if not is_missing(mc):  # the measured ratio beside the nominal factor
                    ax.annotate(
                        f"{mc:.1f}×", (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=6, color=color
                    )
            ok = g["ci_low"].notna().to_numpy()
            low, high = _clip(g["ci_low"] * scale, bounds)[ok], _clip(g["ci_high"] * scale, bounds)[ok]
            ax.fill_between(x[ok], low, high, color=color, alpha=0.2, lw=0)
        flat = t[t["compression"].isna()]
        levels = flat["mean"].mul(scale).round(6)
        for _, r in sorted(flat.iterrows(), key=lambda kv: _order(labels[kv[0]])):
            label, color = labels[r.name], colour_of[labels[r.name]]
            same = sorted(flat.index[levels == levels[r.name]], key=lambda i: _order(labels[i]))
            k, n = same.index(r.name), len(same)  # n lines at this value: dashes of 4 pt, n - 1 gaps, offset k
            dashes = (4.0 * k, (4.0, 4.0 * (n - 1))) if n > 1 else (0, (4.0, 2.0))
            ax.axhline(r["mean"] * scale, color=color, ls=dashes, lw=1.6, label=label)
            handles[label] = Line2D([], [], color=color, ls=(0, (4.0, 2.0)), lw=1.6)  # the legend: plain dashes
            if not is_missing(r["ci_low"]):
                low, high = _clip(pd.Series([r["ci_low"] * scale, r["ci_high"] * scale]), bounds)
                ax.axhspan(low, high, color=color, alpha=0.12, lw=0)
        if len(with_c):
            ax.set_xscale("log", base=2)
            ticks = sorted(with_c["compression"].unique())
            ax.set_xticks(ticks, [f"{c:g}" for c in ticks])
            ax.margins(x=0.12)  # room for the measured-ratio label of the last point
        ax.set_title(task)
        ax.set_xlabel("nominal compression factor (labels: measured ×)")
        ax.set_ylabel(METRIC_NAMES.get(metric, metric) + (" (%)" if scale == 100 else ""))
        if bounds is not None:
            lo, hi = ax.get_ylim()
            pad = 0.03 * (bounds[1] - bounds[0])
            ax.set_ylim(max(lo, bounds[0] - pad), min(hi, bounds[1] + pad))
    _legend_below(fig, handles)
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
    separate lines, and the legend names the settings in which lines differ. A path has the
    colour of the method it times (the direct path: zero-shot), its configs shades of it."""
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
    paths = dict(zip(r["line"], r["path"].astype(str)))
    by_path: dict[str, set[str]] = {}
    for line, path in paths.items():
        by_path.setdefault(path, set()).add(line)
    colour_of = _colours(by_path, lambda path: PATH_METHOD.get(path, path))
    fig = Figure(figsize=(8.4, 3.9), layout="constrained")
    ax_lat, ax_thr = fig.subplots(1, 2)
    handles = {}
    for line, g in sorted(agg.groupby("line", sort=False), key=lambda kv: _order(kv[0])):
        color = colour_of[line]
        ax_lat.plot(g["batch_size"], g["metrics.p50_ms"], "o-", color=color, label=f"{line} p50")
        ax_lat.plot(g["batch_size"], g["metrics.p99_ms"], "x--", color=color, label=f"{line} p99")
        (handles[line],) = ax_thr.plot(g["batch_size"], g["metrics.throughput_eps"], "o-", color=color, label=line)
    for ax in (ax_lat, ax_thr):
        ax.set_xscale("log", base=2)
        ticks = sorted(agg["batch_size"].unique())
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.set_xlabel("batch size")
    ax_lat.set_yscale("log")  # paths an order of magnitude apart (the relay generates) stay readable
    ax_lat.set_ylabel("latency per batch (ms, log scale)")
    styles = [Line2D([], [], color="0.3", marker="o", ls="-"), Line2D([], [], color="0.3", marker="x", ls="--")]
    ax_lat.legend(styles, ["p50", "p99"], fontsize=7, loc="upper left")
    ax_thr.set_ylabel("throughput (examples/s)")
    _legend_below(fig, handles)
    if stem:
        save(fig, stem)
    return fig


def training_curves(logs: pd.DataFrame, stem: str | Path | None = None, scale: float = 100.0) -> Figure:
    """Training loss and eval accuracy (in the table's units: x ``scale``) vs step, one row per
    task, one line per run, one colour per experiment (its method's, a shade per variant)."""
    if logs is None or not len(logs) or "step" not in logs:
        raise ValueError("no training logs to plot")
    has_loss = logs["loss"].notna() if "loss" in logs else pd.Series(False, index=logs.index)
    has_eval = logs["eval_accuracy"].notna() if "eval_accuracy" in logs else pd.Series(False, index=logs.index)
    logs = logs[has_loss | has_eval]
    if not len(logs):
        raise ValueError("logs have neither loss nor eval_accuracy rows")
    tasks = sorted(logs["task"].dropna().unique())
    fig = Figure(figsize=(8.4, 3.0 * len(tasks) + 0.6), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    vary = _varying(logs, ["compression", "sender", "receiver", "layer", "model"])
    labels = logs.apply(lambda r: _label(r, vary), axis=1)
    by_method: dict[str, set[str]] = {}
    for method, label in zip(logs["method"], labels):
        by_method.setdefault(method, set()).add(label)
    colour_of = _colours(by_method)
    bounds = value_range("eval_accuracy", scale)
    handles: dict[str, Line2D] = {}
    for (ax_loss, ax_eval), task in zip(axes, tasks):
        t = logs[logs["task"] == task]
        for _run_dir, g in sorted(t.groupby("run_dir", sort=True), key=lambda kv: _order(labels[kv[1].index[0]])):
            lab = labels[g.index[0]]
            kw = {"color": colour_of[lab], "alpha": 0.8, "lw": 1}
            loss = g[has_loss[g.index]].sort_values("step")
            ev = g[has_eval[g.index]].sort_values("step")
            if len(loss):
                (handles[lab],) = ax_loss.plot(loss["step"], loss["loss"], **kw)
            if len(ev):
                (line,) = ax_eval.plot(ev["step"], _clip(ev["eval_accuracy"] * scale, bounds), "o-", ms=3, **kw)
                handles.setdefault(lab, line)
        ax_loss.set_title(f"{task}: training loss")
        ax_eval.set_title(f"{task}: eval accuracy (held-out training items)")
        ax_eval.set_ylabel("accuracy" + (" (%)" if scale == 100 else ""))
        if bounds is not None:
            ax_eval.set_ylim(bounds[0] - 0.03 * bounds[1], bounds[1] * 1.03)
        ax_loss.set_ylabel("loss")
        ax_eval.sharex(ax_loss)  # the same steps on both panels, whole steps only
        for ax in (ax_loss, ax_eval):
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(fig, handles)
    if stem:
        save(fig, stem)
    return fig


def probes_by_layer(points: list[dict], stem: str | Path | None = None, scale: float = 100.0) -> Figure:
    """Linear-probe accuracy against relative depth (block / blocks), one panel per task, one line per
    probed model (shades of the probe's colour, a marker each), the 95% CI as a band, and the test
    split's majority rate as the floor (dotted). ``points``: ``telepathy.analysis.paper.probe_table``'s rows."""
    if not points:
        raise ValueError("no probe results to plot")
    df = pd.DataFrame(points)
    tasks = sorted(df["task"].unique())
    models = sorted(df["model"].unique(), key=_order)
    colour_of = {m: shade(colour("linear_probe"), i, len(models)) for i, m in enumerate(models)}
    markers = dict(zip(models, "os^Dv"))
    fig = Figure(figsize=(3.6 * len(tasks), 3.5), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    handles: dict[str, Line2D] = {}
    for ax, task in zip(axes, tasks):
        t = df[df["task"] == task]
        for model in models:
            g = t[t["model"] == model].sort_values("depth")
            if not len(g):
                continue
            x = (g["depth"] * 100).to_numpy(float)
            label = f"{model} ({int(g['num_layers'].iloc[0])} blocks)"
            (handles[label],) = ax.plot(
                x, g["accuracy"] * scale, marker=markers.get(model, "o"), color=colour_of[model], label=label
            )
            ax.fill_between(x, g["ci_low"] * scale, g["ci_high"] * scale, color=colour_of[model], alpha=0.18, lw=0)
        floor = float(t["majority"].iloc[0]) * scale
        ax.axhline(floor, color="0.45", ls=":", lw=1.2)
        handles["majority class (test split)"] = Line2D([], [], color="0.45", ls=":", lw=1.2)
        ax.set_title(task)
        ax.set_xlabel("relative depth of the probed block (%)")
        ax.set_ylabel("probe accuracy (%)" if scale == 100 else "probe accuracy")
        ax.set_xlim(0, 105)
        ax.set_ylim(0, scale * 1.02)
    _legend_below(fig, handles, ncol=3)
    if stem:
        save(fig, stem)
    return fig


def latency_heatmap(cells: list[dict], stem: str | Path | None = None) -> Figure:
    """Two heat maps over compression factor (rows) x batch size (columns), each cell annotated: the bridge
    path's median latency per call (ms), and the text relay's median over the bridge's on a log colour scale
    centred on 1 (blue, the bridge's colour: the bridge answers faster; red, the relay's: the relay does).
    ``cells``: ``telepathy.analysis.paper.latency_cells``'s rows."""
    import numpy as np

    if not cells:
        raise ValueError("no latency cells to plot")
    df = pd.DataFrame(cells)
    comps = sorted(df["compression"].unique())
    batches = sorted(df["batch_size"].unique())

    def grid(col: str):
        out = np.full((len(comps), len(batches)), np.nan)
        for c in cells:
            out[comps.index(c["compression"]), batches.index(c["batch_size"])] = c[col]
        return out

    fig = Figure(figsize=(9.0, 0.55 * len(comps) + 2.4), layout="constrained")
    ax_ms, ax_ratio = fig.subplots(1, 2)
    ms = grid("bridge_p50_ms")
    image = ax_ms.imshow(ms, cmap="Blues", aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax_ms, shrink=0.85, label="ms")
    ratio = grid("relay_over_bridge")
    span = max(1.0, float(np.nanmax(np.abs(np.log2(ratio)))))
    image = ax_ratio.imshow(np.log2(ratio), cmap="RdBu", vmin=-span, vmax=span, aspect="auto", origin="lower")
    bar = fig.colorbar(image, ax=ax_ratio, shrink=0.85, label="relay / bridge")
    ticks = [t for t in range(-int(span), int(span) + 1)]
    bar.set_ticks(ticks, labels=[f"{2**t}×" if t >= 0 else f"1/{2**-t}×" for t in ticks])
    for ax, values, fmt, level in ((ax_ms, ms, "{:.0f}", 0.6 * np.nanmax(ms)), (ax_ratio, ratio, "{:.1f}×", None)):
        for i in range(len(comps)):
            for j in range(len(batches)):
                v = values[i, j]
                if np.isnan(v):
                    continue
                dark = v > level if level is not None else abs(math.log2(v)) > 0.6 * span
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(comps)), [f"{c:g}" for c in comps])
        ax.set_xlabel("batch size")
        ax.set_ylabel("compression factor")
    ax_ms.set_title("bridge: median latency per call (ms)", fontsize=9)
    ax_ratio.set_title("text relay / bridge, median latency (> 1: the bridge is faster)", fontsize=9)
    if stem:
        save(fig, stem)
    return fig
