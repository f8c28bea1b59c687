"""Paper tables from summaries: metric and comparison tables as Markdown and LaTeX, JSON-safe values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from telepathy.analysis.runs import is_missing

# (header, rows, caption notes) of one table
Table = tuple[list[str], list[list[str]], list[str]]

METRIC_NAMES = {
    "accuracy": "Accuracy",
    "macro_f1": "Macro-F1",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
}
OPTIONAL_COLUMNS = ["sender", "receiver", "num_latents", "layer", "model"]
COLUMN_NAMES = {
    "task": "Task",
    "method": "Method",
    "sender": "Sender",
    "receiver": "Receiver",
    "compression": "Compression",
    "num_latents": "Latents",
    "layer": "Layer",
    "model": "Model",
    "measured_compression": "Measured ×",
    "positions": "Receiver positions",
}


def _fmt(v: float | None, scale: float, digits: int) -> str:
    return "—" if is_missing(v) else f"{v * scale:.{digits}f}"


def plain(v: object) -> str:
    if is_missing(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return f"{v:g}"
    return str(v)


def settings_cell(differs: object) -> str:
    """'key=value; ...' of the settings in which an experiment differs from others with the
    same table columns (summarise: `differs`); '' when it differs in none."""
    if not isinstance(differs, dict):
        return ""
    return "; ".join(f"{k}={'—' if is_missing(v) else plain(v)}" for k, v in sorted(differs.items()))


def _measured_cell(v: float | None, key: str) -> str:
    if is_missing(v):
        return ""
    return f"{v:.1f}×" if key == "measured_compression" else f"{v:.1f}".removesuffix(".0")


def sender_cut_note(summary: pd.DataFrame) -> str:
    """A note naming the rows whose sender's token cap (``task.max_input_tokens``) cut test
    texts that every other method reads whole up to ``task.max_text_words`` (the recorded
    ``bridge.truncated_test_items`` / ``probe.truncated_test_items``); '' when none did."""
    if "sender_truncated_items" not in summary:
        return ""
    cut = summary[summary["sender_truncated_items"].fillna(0) > 0]
    if not len(cut):
        return ""
    rows = []
    for g in cut.to_dict("records"):
        name = " ".join(plain(g[k]) for k in ("task", "method") if not is_missing(g[k]))
        name += f" c{plain(g['compression'])}" if not is_missing(g["compression"]) else ""
        name += f" ({settings_cell(g['differs'])})" if settings_cell(g.get("differs")) else ""
        rows.append(f"{name}: {g['sender_truncated_items']:.3g} items")
    return (
        "Not the same text: the sender's token cap (task.max_input_tokens) cut test texts that the "
        "other methods read whole (up to task.max_text_words) in " + "; ".join(rows) + " (mean over seeds)."
    )


def metric_cell(g: dict, scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± half-width' of the 95% CI; no CI where there is no seed variance to show."""
    if g["n_independent"] == 0:
        return "—"
    if g["n_independent"] >= 2:
        return f"{_fmt(g['mean'], scale, digits)} ± {_fmt(g['ci_half'], scale, digits)}"
    return _fmt(g["mean"], scale, digits)


def n_cell(g: dict) -> str:
    n = int(g["n_independent"])
    if g["deterministic"] and n == 1:
        return "1 (det.)"
    if n == 1:
        return "1 (no CI)"
    return str(n)


def _not_completed(g: dict | pd.Series) -> str:
    counts = {k: v for k, v in g["status_counts"].items() if k != "completed"}
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def metric_table(summary: pd.DataFrame, metric: str = "accuracy", scale: float = 100.0, digits: int = 1) -> Table:
    """(header, rows, caption notes) of the main table: one row per experiment."""
    keys = ["task", "method"]
    if summary["compression"].notna().any():
        keys.append("compression")
    constant = {}
    for k in OPTIONAL_COLUMNS:
        vals = summary[k].dropna().map(plain).unique()
        if len(vals) > 1:
            keys.append(k)
        elif len(vals) == 1:
            constant[k] = vals[0] + (" (where used)" if summary[k].isna().any() else "")
    name = METRIC_NAMES.get(metric, metric) + (" (%)" if scale == 100 else "")
    show_settings = summary["differs"].map(settings_cell).ne("").any()
    measured = [k for k in ("measured_compression", "positions") if k in summary and summary[k].notna().any()]
    header = (
        [COLUMN_NAMES[k] for k in keys]
        + (["Settings"] if show_settings else [])
        + [COLUMN_NAMES[k] for k in measured]
        + [f"{name}, mean ± 95% CI", "n seeds"]
    )
    show_incomplete = summary.apply(_not_completed, axis=1).ne("").any()
    if show_incomplete:
        header.append("Not completed")
    rows = []
    for g in summary.to_dict("records"):
        row = (
            [plain(g[k]) for k in keys]
            + ([settings_cell(g["differs"])] if show_settings else [])
            + [_measured_cell(g[k], k) for k in measured]
            + [metric_cell(g, scale, digits), n_cell(g)]
        )
        if show_incomplete:
            row.append(_not_completed(g))
        rows.append(row)
    notes = [
        "Mean over independent seeds ± half-width of the 95% Student-t interval; "
        "n seeds = independent completed runs of one config (runs that differ in any setting "
        "but the seed are separate rows)."
    ]
    if show_settings:
        notes.append("Settings = the config values in which rows with the same other columns differ.")
    if "measured_compression" in measured:
        notes.append(
            "Compression = nominal factor (M = ceil(max input tokens / factor)); Measured × = text "
            "tokens actually read per receiver position (bridge: per soft token; LLMLingua: original / "
            "kept text tokens), mean over test items."
        )
    if "positions" in measured:
        notes.append(
            "Receiver positions = what carries the input to the receiver: M soft tokens (bridge, "
            "prompt tuning), kept text tokens (LLMLingua) or message tokens (text relay), mean."
        )
    cut_note = sender_cut_note(summary)
    if cut_note:
        notes.append(cut_note)
    if summary["deterministic"].any():
        notes.append("det. = deterministic method: one result reused across seeds, counted once, no CI.")
    if (~summary["deterministic"] & (summary["n_independent"] == 1)).any():
        notes.append("no CI = a single seed; a CI needs at least 2.")
    if constant:
        notes.append("All rows: " + "; ".join(f"{COLUMN_NAMES[k].lower()} = {v}" for k, v in constant.items()) + ".")
    return header, rows, notes


def _baseline_desc(c: dict, vary: list[str]) -> str:
    parts = []
    for k in vary:
        v = c.get(f"baseline.{k}")
        if not is_missing(v):
            parts.append(f"{COLUMN_NAMES[k].lower()}={plain(v)}")
    if settings_cell(c.get("baseline.differs")):
        parts.append(settings_cell(c["baseline.differs"]))
    return f"{c['baseline.method']}" + (f" ({', '.join(parts)})" if parts else "")


def comparison_table(
    comparisons: pd.DataFrame, metric: str = "accuracy", scale: float = 100.0, digits: int = 1
) -> Table:
    keys = ["task", "method"]
    if comparisons["compression"].notna().any():
        keys.append("compression")
    keys += [k for k in OPTIONAL_COLUMNS if comparisons[k].dropna().map(plain).nunique() > 1]
    unit = " (pp)" if scale == 100 else ""
    sign = (comparisons["test"] == "sign").all()
    show_settings = comparisons["differs"].map(settings_cell).ne("").any()
    header = (
        [COLUMN_NAMES[k] for k in keys]
        + (["Settings"] if show_settings else [])
        + ["vs", f"Δ{unit} [95% CI]", "items", "p (sign test)" if sign else "p (paired perm.)", "p (Holm)"]
    )
    if sign:
        header.insert(-2, "wins / losses")
    base_keys = [
        k
        for k in ("compression", "num_latents", "layer", "model")
        if comparisons[f"baseline.{k}"].dropna().map(plain).nunique() > 1
    ]
    rows = []
    for c in comparisons.to_dict("records"):
        delta = (
            "—"
            if is_missing(c["delta"])
            else (
                f"{c['delta'] * scale:+.{digits}f} [{c['delta_ci_low'] * scale:+.{digits}f}, "
                f"{c['delta_ci_high'] * scale:+.{digits}f}]"
            )
        )
        row = (
            [plain(c[k]) for k in keys]
            + ([settings_cell(c["differs"])] if show_settings else [])
            + [_baseline_desc(c, base_keys), delta, str(int(c["n_items"]))]
        )
        if sign:
            row.append("—" if is_missing(c.get("b")) else f"{int(c['b'])} / {int(c['c'])}")
        row += [_pfmt(c["p"]), _pfmt(c["p_holm"])]
        rows.append(row)
    notes = [
        "Paired on the same test items (and seeds); Δ = method − baseline, 95% CI by a cluster "
        "bootstrap over items (one resample of items applied to every seed). "
        + (
            "Exact sign test on per-item accuracy averaged over seeds (McNemar with one seed); "
            if sign
            else "Paired permutation test on per-item values averaged over seeds; "
        )
        + f"Holm correction over all {len(comparisons)} comparisons of this table."
    ]
    if sign:
        notes.append("wins / losses = items where the method's seed-averaged accuracy is above / below the baseline's.")
    return header, rows, notes


def _pfmt(p: float) -> str:
    if is_missing(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def to_markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    """Pipe table (pandas' ``DataFrame.to_markdown``, tabulate) plus the notes in italics under it.
    Cells are the tables' own strings (``disable_numparse``: "4" is not re-formatted as a number)."""
    text = pd.DataFrame(rows, columns=header).to_markdown(index=False, disable_numparse=True) + "\n"
    return text + "".join(f"\n_{n}_\n" for n in notes)


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex(s: object) -> str:
    s = "".join(_TEX.get(ch, ch) for ch in str(s))
    return (
        s.replace("±", r"$\pm$")
        .replace("Δ", r"$\Delta$")
        .replace("×", r"$\times$")
        .replace("—", "--")
        .replace("−", "-")
        .replace("<0.001", "$<$0.001")
    )


def to_latex(header: list[str], rows: list[list[str]], notes: list[str], caption: str) -> str:
    """A booktabs table (pandas' ``Styler.to_latex``) with the notes in its caption; every cell and
    the caption go through ``_tex`` (LaTeX's special characters, and ±/Δ/×/—/− as math)."""
    table = pd.DataFrame(rows, columns=header).style.hide(axis="index").format(_tex).format_index(_tex, axis=1)
    return table.to_latex(
        column_format="l" * (len(header) - 1) + "r",
        hrules=True,
        position="t",
        position_float="centering",
        caption=_tex(" ".join([caption, *notes])),
    )


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [jsonable(x) for x in v]
    if is_missing(v):
        return None
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v
