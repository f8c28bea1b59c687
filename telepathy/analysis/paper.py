"""The paper's tables and figures, from a folder of stored records and nothing else.

    python -m telepathy paper docs/paper/records --out docs/paper [--n-boot 2000]
    python -m telepathy paper docs/paper/records --check docs/paper   # rebuild, compare; exit 1 on a difference

``scripts/paper.py`` (``make paper``) launches the six phases, and its last job copies each run's records
into ``<out>/records`` (the layout below) and calls ``build``. Everything the page shows is computed here
from those files: a change to the analysis code that changes a published number changes ``paper.json``
or ``README.md``, which ``tests/test_paper.py`` regenerates and compares on every ``make test``.

Records (``RECORDS``):

    records/index.json                      the launch: scale, command, times, machine, load; phase -> records
    records/plan.json                       the planner's prediction made before the run (python -m telepathy plan)
    records/runs/<run id>/result.json       one per run dir, as the run wrote it (+ predictions.jsonl)
    records/latency/<cell>/<path>/result.json   one per latency cell and path (bridge, text_relay, direct)

Written into ``--out``: ``README.md`` (the page: provenance, the hand-written summary kept between
``SUMMARY_START`` and ``SUMMARY_END``, one section per phase, the wall time against the prediction),
``paper.json`` (every number of every table and figure; no timestamps of its own, so a rebuild is
byte-identical) and the figures (``FIGURES``: PNG). Tables are ``telepathy.analysis``'s own (``aggregate.build``,
``tables.metric_table`` / ``comparison_table``); the statistics state their unit of resampling in their notes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import pandas as pd

from telepathy import analysis
from telepathy.analysis import aggregate, plots
from telepathy.analysis.runs import is_missing
from telepathy.analysis.tables import comparison_table, jsonable, metric_table, plain, to_markdown
from telepathy.results import PREDICTIONS_FILE, RESULT_FILE

INDEX = "index.json"
PLAN = "plan.json"
RUNS = "runs"
LATENCY = "latency"
RECORD_FILES = (RESULT_FILE, PREDICTIONS_FILE)  # what is copied of a run dir: what the tables read
LATENCY_PATHS = ("bridge", "text_relay", "direct")
SUMMARY_START = "<!-- summary: written by hand; `python -m telepathy paper` keeps it -->"
SUMMARY_END = "<!-- end of summary -->"
SUMMARY_TODO = "_To be written by whoever publishes the run: what these results show, and what they do not._"
FIGURES = {"probes": "p2_probes_by_layer.png", "latency": "p4_latency_heatmap.png"}
# the phases in the order of the page, and what each is (the paper's plan)
PHASES = {
    "p1_seeds": "P1 — accuracy over seeds",
    "p2_probes": "P2 — what the hidden states encode (linear probes)",
    "p3_baselines": "P3 — the bridge against every baseline",
    "p4_latency": "P4 — latency: compression × batch",
    "p5_xsum": "P5 — generation: XSum",
    "p6_ablations": "P6 — ablation: which pair of models",
}
# P6's reference pair: every other pair is compared with it (a column value of the metric table)
P6_REFERENCE = {"sender": "smollm2_135m", "receiver": "gemma3_270m"}
ROUGE = ("rouge1", "rouge2", "rougeL")


class RecordsError(ValueError):
    """A records folder that cannot give the page (missing index, a phase without records); one line."""


# ------------------------------------------------------------------------------------------- reading
def read_index(records: Path) -> dict:
    from telepathy.fsutil import read_json

    path = Path(records) / INDEX
    if not path.exists():
        raise RecordsError(f"{path} is missing; allowed: a records folder written by `scripts/paper.py tables`")
    return read_json(path)


def phase_key(name: str) -> str:
    """``demo/p1_seeds`` -> ``p1_seeds``: a phase at any scale is shown as its paper phase."""
    return name.rpartition("/")[2]


def phase_records(records: Path, index: dict, key: str) -> tuple[str | None, list[Path]]:
    """(the phase's name in the index, the record dirs of its runs or latency cells that are there)."""
    name = next((n for n in index.get("phases", {}) if phase_key(n) == key), None)
    listed = index["phases"].get(name, []) if name else []
    return name, [Path(records) / rel for rel in listed if (Path(records) / rel).is_dir()]


def load(records: Path, dirs: list[Path]) -> pd.DataFrame:
    """load_runs over the run dirs of one phase (latency cells: their per-path run dirs)."""
    return analysis.load_runs(dirs) if dirs else pd.DataFrame()


# ------------------------------------------------------------------------------------------- tables
def table_block(caption: str, table) -> dict:
    header, rows, notes = table
    return {"caption": caption, "header": header, "rows": rows, "notes": notes}


def metric_and_comparisons(
    runs: pd.DataFrame, metric: str, n_boot: int, reference: dict | None = None
) -> tuple[dict, list[dict]]:
    """(numbers, table blocks) of one phase's runs through ``aggregate.build``: the metric table (with the
    shuffled-sender control, flags, measured compression), the paired comparisons with the bridge and,
    with ``reference`` ({column: value}), every experiment against that one (``compare_to_reference``)."""
    result = aggregate.build(runs, metric, "bridge", n_boot=n_boot, seed=0)
    name = analysis_metric_name(metric)
    blocks = []
    if len(result["summary"]):
        blocks.append(table_block(f"{name} per task and method.", metric_table(result["summary"], metric)))
    if len(result["comparisons"]):
        blocks.append(
            table_block(f"{name}: paired comparison with the bridge.", comparison_table(result["comparisons"], metric))
        )
    numbers = {"groups": summary_numbers(result["summary"]), "comparisons": comparison_numbers(result["comparisons"])}
    if reference:
        predictions = analysis.load_predictions(runs[runs["status"] == "completed"])
        pairs = analysis.compare_to_reference(
            runs, predictions, result["summary"], metric, reference, n_boot=n_boot, seed=0
        )
        if len(pairs):
            ref = " → ".join(str(v) for v in reference.values())
            caption = f"{name}: each pair against the reference pair {ref}."
            blocks.append(table_block(caption, comparison_table(pairs, metric)))
            numbers["reference_comparisons"] = comparison_numbers(pairs)
    return numbers, blocks


def analysis_metric_name(metric: str) -> str:
    from telepathy.analysis.tables import METRIC_NAMES

    return METRIC_NAMES.get(metric, metric)


SUMMARY_COLUMNS = [
    "task",
    "method",
    "sender",
    "receiver",
    "compression",
    "num_latents",
    "layer",
    "model",
    "n_independent",
    "mean",
    "ci_low",
    "ci_high",
    "seeds",
    "values",
    "measured_compression",
    "control_delta",
    "control_ci_low",
    "control_ci_high",
    "flagged",
]
COMPARISON_COLUMNS = [
    "task",
    "method",
    "sender",
    "receiver",
    "model",
    "baseline.method",
    "baseline.sender",
    "baseline.receiver",
    "baseline.model",
    "n_items",
    "delta",
    "delta_ci_low",
    "delta_ci_high",
    "p",
    "p_holm",
]


def summary_numbers(summary: pd.DataFrame) -> list[dict]:
    cols = [c for c in SUMMARY_COLUMNS if c in summary]
    return jsonable(summary[cols].to_dict("records")) if len(summary) else []


def comparison_numbers(comparisons: pd.DataFrame) -> list[dict]:
    cols = [c for c in COMPARISON_COLUMNS if c in comparisons]
    return jsonable(comparisons[cols].to_dict("records")) if len(comparisons) else []


def probe_table(runs: pd.DataFrame) -> tuple[list[dict], tuple]:
    """Every probed layer of every completed linear-probe run: (points, (header, rows, notes)).
    The CI of a layer's accuracy is Wilson's 95% interval over its test items (the probe is
    deterministic: one run per model and task, no seeds to resample)."""
    from statsmodels.stats.proportion import proportion_confint

    done = runs[(runs["method"] == "linear_probe") & (runs["status"] == "completed")] if len(runs) else runs
    points = []
    for r in done.to_dict("records"):
        layers = json.loads(r["probe.layers"])
        n = int(r["metrics.n_test"])
        for layer in layers:
            acc = float(r[f"metrics.layer_{layer}_accuracy"])
            lo, hi = proportion_confint(round(acc * n), n, alpha=0.05, method="wilson")
            points.append(
                {
                    "task": r["task"],
                    "model": r["probe.model"],
                    "layer": int(layer),
                    "num_layers": int(r["probe.num_layers"]),
                    "depth": int(layer) / int(r["probe.num_layers"]),
                    "accuracy": acc,
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "n_test": n,
                    "majority": float(r["metrics.majority_accuracy"]),
                    "reported": int(layer) == int(r["metrics.reported_layer"]),
                }
            )
    points.sort(key=lambda p: (p["task"], p["model"], p["layer"]))
    header = ["Task", "Model", "Block (of)", "Relative depth", "Accuracy (%) [95% CI]", "Majority (%)"]
    rows = [
        [
            p["task"],
            p["model"],
            f"{p['layer']} ({p['num_layers']})" + (" *" if p["reported"] else ""),
            f"{100 * p['depth']:.0f}%",
            f"{100 * p['accuracy']:.1f} [{100 * p['ci_low']:.1f}, {100 * p['ci_high']:.1f}]",
            f"{100 * p['majority']:.1f}",
        ]
        for p in points
    ]
    notes = [
        "Logistic regression on the last prompt token's hidden state of one block (hidden_states index), trained "
        "on the training items, C chosen on a held-out fifth of them; accuracy on the test items. 95% CI: Wilson's "
        "interval over the test items (the probe is deterministic: one run per model and task).",
        "* = the layer the run reports (best held-out accuracy).",
    ]
    return points, (header, rows, notes)


def latency_cells(runs: pd.DataFrame) -> tuple[list[dict], tuple]:
    """One row per compression x batch cell: p50 per path, the relay/bridge and direct/bridge ratios."""
    done = runs[(runs["method"] == "latency") & (runs["status"] == "completed")] if len(runs) else runs
    cells: dict[tuple, dict] = {}
    for r in done.to_dict("records"):
        key = (float(r["compression"]), int(r["batch_size"]))
        cell = cells.setdefault(key, {"compression": key[0], "batch_size": key[1]})
        cell[f"{r['path']}_p50_ms"] = float(r["metrics.p50_ms"])
        cell[f"{r['path']}_p99_ms"] = float(r["metrics.p99_ms"])
        cell[f"{r['path']}_throughput_eps"] = float(r["metrics.throughput_eps"])
        if r["path"] == "bridge":
            cell["bridge_trained"] = bool(r["latency.bridge_trained"])
            cell["num_latents"] = int(r["latency.num_latents"])
            cell["iterations"] = int(r["latency.iterations"])
            cell["torch_threads"] = int(r["latency.torch_threads"])
    rows_out = []
    for key in sorted(cells):
        c = cells[key]
        if all(f"{p}_p50_ms" in c for p in LATENCY_PATHS):
            c["relay_over_bridge"] = c["text_relay_p50_ms"] / c["bridge_p50_ms"]
            c["direct_over_bridge"] = c["direct_p50_ms"] / c["bridge_p50_ms"]
            rows_out.append(c)
    header = [
        "Compression",
        "Batch",
        "M",
        "Bridge p50 (ms)",
        "Text relay p50 (ms)",
        "Direct p50 (ms)",
        "Relay / bridge",
        "Direct / bridge",
        "Bridge trained",
    ]
    rows = [
        [
            plain(c["compression"]),
            str(c["batch_size"]),
            str(c["num_latents"]),
            f"{c['bridge_p50_ms']:.0f}",
            f"{c['text_relay_p50_ms']:.0f}",
            f"{c['direct_p50_ms']:.0f}",
            f"{c['relay_over_bridge']:.1f}×",
            f"{c['direct_over_bridge']:.2f}×",
            "yes" if c["bridge_trained"] else "no (seeded init)",
        ]
        for c in rows_out
    ]
    iterations = sorted({c["iterations"] for c in rows_out})
    threads = sorted({c["torch_threads"] for c in rows_out})
    notes = [
        f"p50 = median wall time of one call (a batch: the sender, the bridge and the receiver's answer for the "
        f"bridge; the sender's 48-token message and the receiver's answer for the relay; the receiver reading the "
        f"text for direct) over {', '.join(map(str, iterations))} timed calls per path and cell after the warm-up; "
        f"{', '.join(map(str, threads))} CPU thread(s), one cell at a time. Ratios > 1: the bridge is faster.",
        "Bridge trained = the P1 bridge of this compression (its checkpoint); an untrained bridge of the same shape "
        "costs the same time.",
    ]
    return rows_out, (header, rows, notes)


def rouge_table(runs: pd.DataFrame, n_boot: int) -> tuple[dict, list[dict]]:
    """P5: ROUGE-1/2/L per method with CIs (over seeds where there are several, else over articles),
    the bridge's shuffled-sender control, and the paired comparisons with the bridge on ROUGE-L."""
    out: dict = {"groups": {}, "comparisons": []}
    rows = []
    for metric in ROUGE:
        summary = analysis.summarise(runs, metric)
        for g in summary.to_dict("records"):
            key = (g["method"], plain(g.get("model")), plain(g.get("sender")), plain(g.get("receiver")))
            entry = out["groups"].setdefault(
                " ".join(k for k in key if k), {"method": g["method"], "model": g.get("model"), "seeds": g["seeds"]}
            )
            if g["n_independent"] >= 2:
                lo, hi, unit = g["ci_low"], g["ci_high"], "seeds"
            else:
                done = runs[runs["run_dir"].isin(g["run_dirs"]) & (runs["status"] == "completed")]
                first = done.iloc[0] if len(done) else {}
                lo, hi, unit = first.get(f"metrics.{metric}_ci_low"), first.get(f"metrics.{metric}_ci_high"), "articles"
            entry[metric] = {"mean": g["mean"], "ci_low": lo, "ci_high": hi, "unit": unit, "n": g["n_independent"]}
    result = aggregate.build(runs, "rougeL", "bridge", n_boot=n_boot, seed=0)
    control = {r["method"]: r for r in result["summary"].to_dict("records") if not is_missing(r.get("control_delta"))}
    header = [
        "Method",
        "Model",
        "ROUGE-1 (%)",
        "ROUGE-2 (%)",
        "ROUGE-L (%)",
        "CI over",
        "n",
        "− shuffled sender, ROUGE-L (pp) [95% CI]",
    ]
    for _, e in sorted(out["groups"].items(), key=lambda kv: (kv[1]["method"] != "bridge", kv[0])):
        cells = []
        for metric in ROUGE:
            m = e.get(metric)
            cells.append("—" if not m else f"{100 * m['mean']:.1f} [{_pct(m['ci_low'])}, {_pct(m['ci_high'])}]")
        c = control.get(e["method"]) if e["method"] == "bridge" else None
        ctl = (
            f"{100 * c['control_delta']:+.1f} [{100 * c['control_ci_low']:+.1f}, {100 * c['control_ci_high']:+.1f}]"
            if c
            else ""
        )
        units = {e[m]["unit"] for m in ROUGE if e.get(m)}
        n = max((e[m]["n"] for m in ROUGE if e.get(m)), default=0)
        e["control"] = None if not c else {k: c[k] for k in ("control_delta", "control_ci_low", "control_ci_high")}
        rows.append([e["method"], plain(e.get("model")) or "", *cells, "/".join(sorted(units)), str(n), ctl])
    notes = [
        "ROUGE-1/2/L F1 with stemming (rouge-score), mean over the test articles; the generated summary's first line "
        "is scored. 95% CI: over seeds (Student t, n = seeds) for the bridge; over articles (percentile bootstrap, "
        "1000 resamples, recorded by the run) for the deterministic zero-shot rows, which have one run.",
        "− shuffled sender = the bridge's ROUGE-L minus the same bridge's with each article reading another article's "
        "sender states; its CI resamples articles (jointly) and seeds.",
    ]
    blocks = [table_block("ROUGE on XSum.", (header, rows, notes))]
    if len(result["comparisons"]):
        blocks.append(
            table_block(
                "ROUGE-L: paired comparison with the bridge.", comparison_table(result["comparisons"], "rougeL")
            )
        )
        out["comparisons"] = comparison_numbers(result["comparisons"])
    out["groups"] = jsonable(out["groups"])
    return out, blocks


def _pct(v) -> str:
    return "—" if is_missing(v) else f"{100 * float(v):.1f}"


# ------------------------------------------------------------------------------------------- timing
def _epoch(iso: str | None) -> float | None:
    try:
        return dt.datetime.fromisoformat(iso).timestamp() if iso else None
    except (TypeError, ValueError):
        return None


def record_span(result: dict) -> tuple[float, float] | None:
    """(start, end) of the process that computed a record: its first attempt's start (a resumed run's
    first) to its end; None for a reused record (a deterministic method's other seed: computed nothing)."""
    if result.get("reused_from"):
        return None
    attempts = result.get("attempts") or []
    start = (
        _epoch(attempts[0].get("started_at")) if attempts else _epoch((result.get("timing") or {}).get("started_at"))
    )
    end = _epoch(result.get("finished_at"))
    return (start, end) if start is not None and end is not None else None


def timing(records: Path, index: dict, plan: dict | None) -> tuple[dict, dict]:
    """Each phase's measured wall time (first start to last end of the runs it owns) against the plan's
    prediction for it; a run shared by phases is owned by the phase the plan costs it in (P1 for P1's bridges)."""
    from telepathy.fsutil import read_json

    owner: dict[str, str] = {}
    predicted: dict[str, dict] = {}
    for job in (plan or {}).get("jobs", []):
        rel = f"{RUNS}/{Path(job['run_dir']).name}" if job.get("run_dir") else None
        if rel:
            owner.setdefault(rel, job["phase"])
        p = predicted.setdefault(job["phase"], {"start": math.inf, "end": 0.0, "jobs": 0, "run_s": 0.0})
        p["start"], p["end"] = min(p["start"], job["start_s"]), max(p["end"], job["start_s"] + job["predicted_s"])
        p["jobs"] += 1
        p["run_s"] += job.get("run_s", 0.0)
    spans: dict[str, list] = {}
    for name, listed in index.get("phases", {}).items():
        for rel in listed:
            if owner.setdefault(rel, name) != name:
                continue
            paths = [records / rel / RESULT_FILE]
            if rel.startswith(f"{LATENCY}/"):
                paths = [records / rel / "bridge" / RESULT_FILE]  # one process timed all three paths
            for path in paths:
                if path.exists():
                    span = record_span(read_json(path))
                    if span:
                        spans.setdefault(name, []).append(span)
    every = [s for v in spans.values() for s in v]
    t0 = min((s[0] for s in every), default=None)
    rows, out = [], {"phases": {}}
    for name in index.get("phases", {}):
        meas, pred = spans.get(name, []), predicted.get(name)
        entry = {
            "jobs_measured": len(meas),
            "measured_start_s": None if not meas else min(s[0] for s in meas) - t0,
            "measured_end_s": None if not meas else max(s[1] for s in meas) - t0,
            "measured_busy_s": sum(s[1] - s[0] for s in meas),
            "jobs_predicted": pred["jobs"] if pred else 0,
            "predicted_start_s": pred["start"] if pred else None,
            "predicted_end_s": pred["end"] if pred else None,
            "predicted_run_s": pred["run_s"] if pred else None,
        }
        entry["measured_wall_s"] = None if not meas else entry["measured_end_s"] - entry["measured_start_s"]
        entry["predicted_wall_s"] = None if not pred else pred["end"] - pred["start"]
        out["phases"][name] = entry
        rows.append(
            [
                phase_key(name),
                f"{entry['jobs_measured']} / {entry['jobs_predicted']}",
                _span(entry["predicted_start_s"], entry["predicted_end_s"]),
                _span(entry["measured_start_s"], entry["measured_end_s"]),
                _ratio(entry["measured_wall_s"], entry["predicted_wall_s"]),
                f"{_min(entry['predicted_run_s'])} / {_min(entry['measured_busy_s'])}",
            ]
        )
    out["measured_makespan_s"] = None if not every else max(s[1] for s in every) - t0
    out["predicted_makespan_s"] = (plan or {}).get("makespan_s")
    out["predicted_range_s"] = (plan or {}).get("makespan_range_s")
    rows.append(
        [
            "all",
            f"{len(every)} / {sum(p['jobs'] for p in predicted.values())}",
            _span(0.0, out["predicted_makespan_s"]),
            _span(0.0 if every else None, out["measured_makespan_s"]),
            _ratio(out["measured_makespan_s"], out["predicted_makespan_s"]),
            f"{_min(sum(p['run_s'] for p in predicted.values()) if predicted else None)} / "
            f"{_min(sum(e['measured_busy_s'] for e in out['phases'].values()))}",
        ]
    )
    rng = out["predicted_range_s"] or {}
    cal = (plan or {}).get("calibration") or []
    notes = [
        "Minutes from the first job's start (the process's own clock: each run's first attempt, a latency cell's "
        "job), to each phase's first start and last end, against the plan's schedule of the same jobs "
        "(python -m telepathy plan, before the run; records/plan.json). Phases overlap: they share the job slots. "
        "jobs = measured / predicted (a run shared by phases counts in the phase that runs it: P1's bridges; "
        "reused zero-shot seeds computed nothing). Compute = the sum of the jobs' own seconds.",
        f"Predicted makespan range (low / high scenarios): {_min(rng.get('low'))} to {_min(rng.get('high'))} min; "
        f"{len(cal)} calibration entries (measured / default seconds per model and stage) from earlier records.",
    ]
    loads = [
        f"{launch.get('started_at', '?')}: {_load(launch.get('load_average'))}" for launch in index.get("launches", [])
    ]
    notes.append(
        "Load average (1, 5, 15 min) of the machine at each launch — "
        + "; ".join(loads)
        + f" — and when the records were collected: {_load(index.get('load_average_at_collect'))}. "
        "Other work on the same cores stretches every measured time."
    )
    header = [
        "Phase",
        "Jobs",
        "Predicted (min)",
        "Measured (min)",
        "Measured / predicted wall",
        "Compute (min): predicted / measured",
    ]
    return jsonable(out), table_block(
        "Wall time per phase: the planner's prediction against the run.", (header, rows, notes)
    )


def _min(seconds) -> str:
    return "—" if seconds is None or is_missing(seconds) else f"{seconds / 60:.1f}"


def _span(a, b) -> str:
    return "—" if a is None or b is None else f"{a / 60:.1f} → {b / 60:.1f}"


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}"


def _load(values) -> str:
    return "?" if not values else ", ".join(f"{v:.1f}" for v in values)


# ------------------------------------------------------------------------------------------- the page
def provenance(index: dict, records: Path) -> list[str]:
    launches = index.get("launches") or [{}]
    first = launches[0]
    machine = index.get("machine") or {}
    mem = machine.get("memory_gb")
    lines = [
        f"- **Command**: `{first.get('command', '?')}`"
        + (f" ({len(launches)} launches: the same command relaunched after a fault)" if len(launches) > 1 else ""),
        f"- **Scale**: `{index.get('scale')}`"
        + (" — **a slice** (`--slice`): one task and one seed per phase" if index.get("slice") else "")
        + (f"; overrides: `{' '.join(first.get('overrides') or [])}`" if first.get("overrides") else ""),
        f"- **Date**: launched {first.get('started_at', '?')}, records collected {index.get('collected_at', '?')}",
        f"- **Machine**: {machine.get('hostname', '?')}, {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
        + (f", {mem:.0f} GB RAM" if mem else "")
        + f"; SLURM: {index.get('cluster', '?')}",
        f"- **Code**: {', '.join(index.get('revisions') or ['?'])}",
    ]
    return lines


def build(records: str | Path, out: str | Path, n_boot: int = 2000) -> dict:
    """Write the page, paper.json and the figures into ``out`` from ``records`` alone; return paper.json."""
    import matplotlib

    matplotlib.use("Agg")
    from telepathy.fsutil import read_json

    records, out = Path(records), Path(out)
    index = read_index(records)
    plan = read_json(records / PLAN) if (records / PLAN).exists() else None
    out.mkdir(parents=True, exist_ok=True)
    numbers: dict = {"scale": index.get("scale"), "slice": bool(index.get("slice")), "n_boot": n_boot, "phases": {}}
    sections: list[str] = []
    for key, title in PHASES.items():
        name, dirs = phase_records(records, index, key)
        body, blocks, data = [], [], {}
        if key == "p4_latency":
            runs = load(records, [p for d in dirs for p in (d / path for path in LATENCY_PATHS) if p.is_dir()])
            cells, table = latency_cells(runs)
            data = {"cells": jsonable(cells)}
            if cells:
                save_png(plots.latency_heatmap(cells), out / FIGURES["latency"])
                body.append(f"![latency heat map]({FIGURES['latency']})")
                blocks.append(table_block("Latency per cell (CPU).", table))
        else:
            runs = load(records, dirs)
            if key == "p2_probes":
                points, table = probe_table(runs)
                data = {"points": jsonable(points)}
                if points:
                    save_png(plots.probes_by_layer(points), out / FIGURES["probes"])
                    body.append(f"![probe accuracy by layer]({FIGURES['probes']})")
                    blocks.append(table_block("Linear-probe accuracy by layer.", table))
            elif key == "p5_xsum":
                if len(runs):
                    data, blocks = rouge_table(runs, n_boot)
            elif len(runs):
                data, blocks = metric_and_comparisons(
                    runs, "accuracy", n_boot, P6_REFERENCE if key == "p6_ablations" else None
                )
        numbers["phases"][key] = {
            "name": name,
            "records": len(dirs),
            "listed": len(index["phases"].get(name, [])) if name else 0,
            **data,
        }
        missing = [rel for rel in index["phases"].get(name, []) if not (records / rel).is_dir()] if name else []
        sections.append(f"## {title}\n")
        if name is None:
            sections.append("_Not run._\n")
            continue
        sections.append(
            f"`+phase={name}`: {len(dirs)} records"
            + (f"; **{len(missing)} listed runs left no record**: {', '.join(missing)}" if missing else "")
            + "\n"
        )
        sections += [f"{b}\n" for b in body]
        sections += [f"### {b['caption']}\n\n{to_markdown(b['header'], b['rows'], b['notes'])}" for b in blocks]
        numbers["phases"][key]["tables"] = blocks
    wall, wall_block = timing(records, index, plan)
    numbers["wall_time"] = wall
    numbers["wall_time"]["table"] = wall_block
    page = render_page(index, records, out, sections, wall_block, wall)
    (out / "README.md").write_text(page)
    text = json.dumps(jsonable(numbers), indent=1, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"
    (out / "paper.json").write_text(text)
    return json.loads(text)


def save_png(fig, path: Path) -> None:
    """The page's figures are PNG only (``plots.save`` also writes a PDF, whose bytes carry a date)."""
    fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"Software": None})


def kept_summary(out: Path) -> str:
    """The hand-written summary of an earlier page in ``out`` (between the markers), or the placeholder."""
    page = Path(out) / "README.md"
    if page.exists():
        text = page.read_text()
        if SUMMARY_START in text and SUMMARY_END in text:
            return text.split(SUMMARY_START, 1)[1].split(SUMMARY_END, 1)[0].strip("\n")
    return SUMMARY_TODO


def render_page(
    index: dict, records: Path, out: Path, sections: list[str], wall_block: dict, wall_numbers: dict
) -> str:
    title = "The paper on the demo pair" if index.get("scale") == "demo" else f"The paper at scale {index.get('scale')}"
    wall = wall_numbers
    lines = [
        f"# {title}: SmolLM2-135M → Gemma-3-270M, all six phases on CPU\n"
        if index.get("scale") == "demo"
        else f"# {title}\n",
        *provenance(index, records),
        f"- **Wall time**: {_min(wall['measured_makespan_s'])} min from the first job's start to the last record "
        f"(predicted {_min(wall['predicted_makespan_s'])} min); per phase: "
        "[below](#wall-time-per-phase-the-planners-prediction-against-the-run)",
        "",
        SUMMARY_START,
        kept_summary(out),
        SUMMARY_END,
        "",
        "Every number and figure on this page is computed from the records in [records/](records/) alone "
        "(`python -m telepathy paper records --out .`; `tests/test_paper.py` regenerates it on every `make test` "
        "and fails on any difference). Percentages are ×100; CIs are 95 %; each table's notes say what is resampled.",
        "",
        *sections,
        "## Wall time per phase: the planner's prediction against the run\n",
        to_markdown(wall_block["header"], wall_block["rows"], wall_block["notes"]),
    ]
    return "\n".join(lines)


def check(records: Path, published: Path, n_boot: int) -> list[str]:
    """Rebuild ``published`` from ``records`` into a temporary folder; the files that differ (README.md,
    paper.json) or are missing (figures), as one line each."""
    import tempfile

    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        if (published / "README.md").exists():
            (fresh / "README.md").write_text((published / "README.md").read_text())  # its hand-written summary
        build(records, fresh, n_boot)
        for name in ("README.md", "paper.json"):
            old = (published / name).read_text() if (published / name).exists() else None
            new = (fresh / name).read_text()
            if old != new:
                problems.append(f"{published / name} differs from what {records} gives: {_first_diff(old, new)}")
        for png in sorted(p.name for p in fresh.glob("*.png")):
            if not (published / png).exists():
                problems.append(f"{published / png} is missing ({records} gives it)")
        for png in sorted(p.name for p in published.glob("*.png")):
            if not (fresh / png).exists():
                problems.append(f"{published / png} is not a figure {records} gives")
    return problems


def _first_diff(old: str | None, new: str) -> str:
    if old is None:
        return "it is missing"
    for i, (a, b) in enumerate(zip(old.splitlines(), new.splitlines()), 1):
        if a != b:
            return f"line {i}: published {a[:120]!r}, rebuilt {b[:120]!r}"
    return f"published has {len(old.splitlines())} lines, rebuilt {len(new.splitlines())}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m telepathy paper", description=__doc__.split("\n\n")[0])
    ap.add_argument("records", help="a records folder (index.json, runs/, latency/, plan.json)")
    ap.add_argument("--out", help="where the page, paper.json and the figures go (required without --check)")
    ap.add_argument(
        "--n-boot", type=int, default=2000, help="bootstrap resamples of the paired comparisons (default 2000)"
    )
    ap.add_argument(
        "--check",
        metavar="PUBLISHED",
        help="rebuild into a temporary folder and compare with PUBLISHED; exit 1 on a difference",
    )
    args = ap.parse_args(argv)
    try:
        if args.check:
            problems = check(Path(args.records), Path(args.check), args.n_boot)
            for p in problems:
                print(p, file=sys.stderr)
            print(f"{args.check}: {'differs' if problems else 'matches'} its records", file=sys.stderr)
            return 1 if problems else 0
        if not args.out:
            ap.error("--out is required (or --check PUBLISHED)")
        built = build(args.records, args.out, args.n_boot)
    except RecordsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v['records']}" for k, v in built["phases"].items())
    print(f"wrote {Path(args.out) / 'README.md'}, paper.json and figures from {args.records} ({counts} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
