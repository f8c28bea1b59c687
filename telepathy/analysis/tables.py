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
    rows = [f"{_row_name(g)}: {g['sender_truncated_items']:.3g} items" for g in cut.to_dict("records")]
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
    control = "control_delta" in summary and summary["control_delta"].notna().any()
    unit = " (pp)" if scale == 100 else ""
    header = (
        [COLUMN_NAMES[k] for k in keys]
        + (["Settings"] if show_settings else [])
        + [COLUMN_NAMES[k] for k in measured]
        + [f"{name}, mean ± 95% CI", "n seeds"]
        + ([f"− shuffled sender{unit} [95% CI]"] if control else [])
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
            + [metric_cell(g, scale, digits) + markers(g), n_cell(g)]
            + ([_delta_cell(g, "control_delta", "control_ci_low", "control_ci_high", scale, digits)] if control else [])
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
            "Compression = the factor: nominal (M = ceil(max input tokens / factor), compression_basis=cap) "
            "or measured on the training items (M = ceil(their mean text tokens / factor), "
            "compression_basis=measured); Measured × = text tokens actually read per receiver position on "
            "the test items (bridge: per soft token; LLMLingua: original / kept text tokens), mean."
        )
    if "positions" in measured:
        notes.append(
            "Receiver positions = what carries the input to the receiver: M soft tokens (bridge, "
            "prompt tuning), kept text tokens (LLMLingua) or message tokens (text relay), mean."
        )
    if control:
        notes.append(
            "− shuffled sender = the row's metric minus the same trained bridge's with each test item "
            "reading another item's sender states (a seeded derangement): what the result owes to the "
            "sender; its CI resamples test items and seeds. Near 0, the receiver answers from the shared "
            "soft prompt and its prior, not from the sender."
        )
    notes += marker_notes(summary)
    floor = majority_note(summary, scale, digits)
    if floor:
        notes.append(floor)
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


# markers on a row's metric cell: every table shows them, and a note says which runs and why
FLAGGED, NO_COMPRESSION, MIXED_REVISIONS = "†", "‡", "§"


def markers(g: dict) -> str:
    """The markers of one experiment: flagged runs (``bridge.flags``: counted in the mean, never
    silently), M at or above the text's length (no compression), several code revisions pooled."""
    out = ""
    if isinstance(g.get("flagged"), dict) and g["flagged"]:
        out += FLAGGED
    if not is_missing(g.get("measured_compression")) and g["measured_compression"] <= 1.0:
        out += NO_COMPRESSION
    if isinstance(g.get("revisions"), list) and len(g["revisions"]) > 1:
        out += MIXED_REVISIONS
    return f" {out}" if out else ""


def _row_name(g: dict, vary: tuple = ()) -> str:
    """A row as the notes name it: task, method, compression, the ``vary`` columns (those in which the
    table's rows differ: two pairs of models are two names) and the settings it differs in."""
    name = " ".join(plain(g[k]) for k in ("task", "method") if not is_missing(g.get(k)))
    name += f" c{plain(g['compression'])}" if not is_missing(g.get("compression")) else ""
    name += "".join(f" {k}={plain(g[k])}" for k in vary if not is_missing(g.get(k)))
    return name + (f" ({settings_cell(g['differs'])})" if settings_cell(g.get("differs")) else "")


def marker_notes(summary: pd.DataFrame) -> list[str]:
    """One note per marker used in the table, naming the rows (and runs) it marks."""
    from telepathy.results import FLAGS

    groups = summary.to_dict("records")
    vary = tuple(k for k in ("sender", "receiver") if k in summary and summary[k].dropna().map(plain).nunique() > 1)
    notes = []
    flagged = [g for g in groups if FLAGGED in markers(g)]
    if flagged:
        named = sorted({f for g in flagged for fl in g["flagged"].values() for f in fl})
        runs = "; ".join(
            f"{_row_name(g, vary)}: " + ", ".join(f"seed {s} {'+'.join(fl)}" for s, fl in sorted(g["flagged"].items()))
            for g in flagged
        )
        meaning = "; ".join(f"{f} = {FLAGS.get(f, f)}" for f in named)
        notes.append(f"{FLAGGED} flagged runs, counted in the mean: {runs}. ({meaning}.)")
    if any(NO_COMPRESSION in markers(g) for g in groups):
        rows = "; ".join(_row_name(g, vary) for g in groups if NO_COMPRESSION in markers(g))
        notes.append(f"{NO_COMPRESSION} M at or above the text's length (measured × ≤ 1: no compression): {rows}.")
    if any(MIXED_REVISIONS in markers(g) for g in groups):
        mixed = [g for g in groups if MIXED_REVISIONS in markers(g)]
        rows = "; ".join(f"{_row_name(g, vary)} ({', '.join(g['revisions'])})" for g in mixed)
        notes.append(f"{MIXED_REVISIONS} runs of several code revisions pooled: {rows}.")
    return notes


def majority_note(summary: pd.DataFrame, scale: float = 100.0, digits: int = 1) -> str:
    """The floor every classifier must clear: each task's test-split majority rate."""
    if "majority_floor" not in summary or not summary["majority_floor"].notna().any():
        return ""
    floors = summary.dropna(subset=["majority_floor"]).groupby("task")["majority_floor"].first()
    return (
        "Majority class (the test split's majority rate, the floor): "
        + "; ".join(f"{task} {_fmt(v, scale, digits)}" for task, v in floors.items())
        + "."
    )


def _delta_cell(c: dict, delta: str, lo: str, hi: str, scale: float, digits: int) -> str:
    if is_missing(c.get(delta)):
        return ""
    return f"{c[delta] * scale:+.{digits}f} [{c[lo] * scale:+.{digits}f}, {c[hi] * scale:+.{digits}f}]"


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
    tests = sorted(set(comparisons["test"].dropna()) - {""})
    binary = comparisons["b"].notna().any() if "b" in comparisons else False
    show_settings = comparisons["differs"].map(settings_cell).ne("").any()
    header = (
        [COLUMN_NAMES[k] for k in keys]
        + (["Settings"] if show_settings else [])
        + ["vs", f"Δ{unit} [95% CI]", "items", "seeds"]
        + (["wins / losses"] if binary else [])
        + (["test"] if len(tests) > 1 else [])
        + ["p", "p (Holm)"]
    )
    base_keys = [
        k
        for k in ("sender", "receiver", "compression", "num_latents", "layer", "model")
        if comparisons[f"baseline.{k}"].dropna().map(plain).nunique() > 1
    ]
    rows = []
    for c in comparisons.to_dict("records"):
        delta = _delta_cell(c, "delta", "delta_ci_low", "delta_ci_high", scale, digits) or "—"
        row = (
            [plain(c[k]) for k in keys]
            + ([settings_cell(c["differs"])] if show_settings else [])
            + [_baseline_desc(c, base_keys), delta, str(int(c["n_items"])), f"{c['n_seeds']} vs {c['baseline_seeds']}"]
        )
        if binary:
            row.append("—" if is_missing(c.get("b")) else f"{int(c['b'])} / {int(c['c'])}")
        if len(tests) > 1:
            row.append(c["test"])
        row += [_pfmt(c["p"]), _pfmt(c["p_holm"])]
        rows.append(row)
    described = {
        "mcnemar": "McNemar's exact test where each side has one seed",
        "permutation": "a paired permutation test (sign flips) of the mean of the per-item differences of "
        "seed means, which tests the Δ printed",
    }
    notes = [
        "Paired on the same test items; Δ = method − baseline, each side's mean over its own seeds "
        "(a deterministic side is its one run); the 95% CI resamples items (one draw for every seed of "
        "both sides: an item is hard or easy in all of them) and, independently, each side's seeds (what "
        "new seeds would change; with 3 seeds still a third too little). p: "
        + "; ".join(described[t] for t in tests if t in described)
        + f". Holm correction over all {len(comparisons)} comparisons of this table. p tests Δ = 0 on these "
        "items for these seeds; the CI also resamples the seeds, so it can span 0 where p is small: a difference "
        "of these seeds that new seeds may not keep."
    ]
    if binary:
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
