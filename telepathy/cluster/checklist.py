"""The plan against what ran: per phase wall time, GPU utilisation, OOMs, GPU-hours planned and used
(every attempt; a run shared by phases counted once, in its first phase), predicted vs actual, success metrics.

    python -m telepathy status outputs/ --plan                 # the latest <outputs>/plans/*/plan.json
    python -m telepathy status outputs/ --plan path/plan.json --phase p1_seeds

Why: the plan's success metrics (every phase done in the window, >80% average GPU
utilisation, no out-of-memory failure, valid result.json for every run, 3 seeds with
confidence intervals) are facts about many runs together; this puts the planner's
``plan.json`` next to the runs' result.json (timing, telemetry, errors) and the scheduler's
view (``status.collect``). Their wording and thresholds are ``telepathy.analysis.report``'s
``SUCCESS_CHECKS`` (one list for this and ``python -m telepathy report``).
"""

from __future__ import annotations

from pathlib import Path

from telepathy.analysis.report import SEEDS_NEEDED, SUCCESS_CHECKS, UTIL_TARGET
from telepathy.cluster.plan import PLAN_FILE
from telepathy.results import load_result


def latest_plan(output_dir: Path) -> Path | None:
    found = sorted(Path(output_dir).glob(f"plans/*/{PLAN_FILE}"))
    return found[-1] if found else None


def _seconds(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()


def _cost(rec: dict | None, gpus) -> dict:
    """What a run cost over every attempt (``results.record_cost``: a resumed run paid for each;
    a reused one nothing) and when its first attempt started (the phase's wall time starts there)."""
    from telepathy.results import record_cost

    seconds, hours, attempts = record_cost(rec or {}, gpus)
    first = ((rec or {}).get("attempts") or [{}])[0].get("started_at")
    return {"actual_s": seconds, "gpu_hours": hours, "attempts": attempts, "first_started_at": first}


def compare(plan: dict, rows: list[dict], phase: str | None = None) -> dict:
    """Everything the report shows, as data (``render`` prints it).

    A run dir in two phases (P1's bridge is also P3's) is costed once, in the phase that plans
    it first (the planner's order; ``plan["shared"]`` lists it in the others): there it counts
    for GPU-hours planned and measured, in the others it shows as ``shared`` with 0.
    """
    owner: dict[str, str] = {}
    listed = []
    for j in [*plan["jobs"], *({**s, "shared": True} for s in plan.get("shared", []))]:
        if j["run_dir"] and j["run_dir"] in owner:
            j = {**j, "shared_with": owner[j["run_dir"]]}
        elif j["run_dir"] and not j.get("shared"):
            owner[j["run_dir"]] = j["phase"]
        listed.append(j)
    jobs = [j for j in listed if phase in (None, j["phase"])]
    oom_dirs = {r["run_dir"] for r in rows if r.get("oom")}
    per_job, phases = [], {}
    for j in jobs:
        read = load_result(j["run_dir"]) if j["run_dir"] else None
        rec = read.record if read else None
        status = read.status if read else "missing"  # "malformed": a result.json damaged on disk
        tel = (rec or {}).get("telemetry") or {}
        oom = bool(((rec or {}).get("error") or {}).get("oom")) or j["run_dir"] in oom_dirs
        shared_with = j.get("shared_with") or (owner.get(j["run_dir"]) if j.get("shared") else None)
        cost = _cost(rec, j.get("gpus"))
        if shared_with:  # costed in the phase that owns it
            cost.update(gpu_hours=0.0)
        # actual: the run's own clock over every attempt (after start-up), so against the prediction without start-up
        per_job.append(
            {
                "job": j["job"],
                "phase": j["phase"],
                "status": status,
                "shared_with": shared_with,
                "predicted_s": None if shared_with else j.get("run_s"),
                "planned_gpu_hours": 0.0 if shared_with else (j.get("gpus") or 0) * j.get("predicted_s", 0) / 3600,
                **cost,
                "gpu_util_pct": tel.get("gpu_util_mean_pct"),
                "oom": oom,
                "seed": ((rec or {}).get("seed")),
                "seedless_hash": (rec or {}).get("seedless_hash"),
                "host": ((rec or {}).get("env") or {}).get("hostname"),
                "gpus": tel.get("gpus") or [],
                "started_at": cost["first_started_at"] or (rec or {}).get("started_at"),
                "finished_at": (rec or {}).get("finished_at"),
            }
        )
        if shared_with:
            continue
        p = phases.setdefault(j["phase"], {"planned_start_s": j["start_s"], "planned_end_s": 0.0})
        p["planned_start_s"] = min(p["planned_start_s"], j["start_s"])
        p["planned_end_s"] = max(p["planned_end_s"], j["start_s"] + j["predicted_s"])
    for name, p in phases.items():
        members = [r for r in per_job if r["phase"] == name and not r["shared_with"]]
        starts = [_seconds(r["started_at"]) for r in members if r["started_at"]]
        ends = [_seconds(r["finished_at"]) for r in members if r["finished_at"]]
        p["planned_s"] = p["planned_end_s"] - p["planned_start_s"]
        p["wall_s"] = max(ends) - min(starts) if starts and ends else None
        utils = [r["gpu_util_pct"] for r in members if r["gpu_util_pct"] is not None]
        p["gpu_util_pct"] = sum(utils) / len(utils) if utils else None
        p["oom"] = sum(r["oom"] for r in members)
        p["done"] = sum(r["status"] == "completed" for r in members)
        p["jobs"] = len(members)
        p["shared"] = sum(1 for r in per_job if r["phase"] == name and r["shared_with"])
        p["planned_gpu_hours"] = sum(r["planned_gpu_hours"] for r in members)
        known = [r["gpu_hours"] for r in members if r["gpu_hours"] is not None]
        p["gpu_hours"] = sum(known) if known else None
    per_gpu: dict[str, list[float]] = {}
    for r in per_job:
        for g in r["gpus"] if not r["shared_with"] else []:
            per_gpu.setdefault(f"{r['host']}:gpu{g['gpu']}", []).append(g["util_mean_pct"])
    own = [r for r in per_job if not r["shared_with"]]
    return {
        "jobs": per_job,
        "phases": phases,
        "per_gpu": {k: sum(v) / len(v) for k, v in sorted(per_gpu.items())},
        "checklist": checklist(plan, own),
    }


def checklist(plan: dict, per_job: list[dict]) -> list[tuple[str, bool, str]]:
    """The plan's five success metrics (``SUCCESS_CHECKS`` less "all runs completed", which "every phase
    done in the window" includes): (name, passed, evidence)."""
    window_s = float(plan["cluster"]["window_h"]) * 3600
    done = [r for r in per_job if r["status"] == "completed"]
    starts = [_seconds(r["started_at"]) for r in per_job if r["started_at"]]
    ends = [_seconds(r["finished_at"]) for r in done if r["finished_at"]]
    span = max(ends) - min(starts) if starts and ends else None
    in_window = len(done) == len(per_job) and span is not None and span <= window_s
    utils = [r["gpu_util_pct"] for r in per_job if r["gpu_util_pct"] is not None]
    util = sum(utils) / len(utils) if utils else None
    ooms = sum(r["oom"] for r in per_job)
    valid = sum(r["status"] not in ("missing", "malformed") for r in per_job)
    seeds: dict[str, set] = {}
    for r in done:
        if r["seedless_hash"]:
            seeds.setdefault(r["seedless_hash"], set()).add(r["seed"])
    short = [k for k, v in seeds.items() if len(v) < SEEDS_NEEDED]
    return [
        (
            SUCCESS_CHECKS["window"],
            in_window,
            f"{len(done)}/{len(per_job)} completed in {span / 3600:.2f} h of {window_s / 3600:g} h"
            if span is not None
            else f"{len(done)}/{len(per_job)} completed",
        ),
        (
            SUCCESS_CHECKS["gpu_util"],
            util is not None and util > UTIL_TARGET,
            f"{util:.1f}% over {len(utils)} runs" if util is not None else "no GPU telemetry recorded",
        ),
        (SUCCESS_CHECKS["oom"], ooms == 0, f"{ooms} runs out of memory"),
        (SUCCESS_CHECKS["valid"], valid == len(per_job), f"{valid}/{len(per_job)} result.json readable"),
        (
            SUCCESS_CHECKS["seeds"],
            bool(seeds) and not short,
            f"{len(seeds) - len(short)}/{len(seeds)} configurations with >= {SEEDS_NEEDED} completed seeds",
        ),
    ]


def _h(seconds) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def render(report: dict) -> str:
    lines = ["phase           jobs  done  planned    wall       GPU util  OOM  GPU-h planned  GPU-h used"]
    for name, p in sorted(report["phases"].items()):
        util = "-"
        if p["gpu_util_pct"] is not None:
            util = f"{p['gpu_util_pct']:.0f}%{'' if p['gpu_util_pct'] > UTIL_TARGET else f' <{UTIL_TARGET:g}'}"
        used = "-" if p["gpu_hours"] is None else f"{p['gpu_hours']:.2f}"
        shared = f" (+{p['shared']} shared, costed in their first phase)" if p["shared"] else ""
        lines.append(
            f"{name:<15} {p['jobs']:<5} {p['done']:<5} {_h(p['planned_s']):<10} {_h(p['wall_s']):<10} "
            f"{util:<9} {p['oom']:<4} {p['planned_gpu_hours']:<14.2f} {used}{shared}"
        )
    if report["per_gpu"]:
        lines.append("per GPU: " + ", ".join(f"{k} {v:.0f}%" for k, v in report["per_gpu"].items()))
    lines += ["", "predicted vs actual per job:"]
    width = max([len(r["job"]) for r in report["jobs"]] + [3])
    for r in report["jobs"]:
        if r["shared_with"]:
            lines.append(f"  {r['job']:<{width}}  {r['status']:<10} shared: planned and costed in {r['shared_with']}")
            continue
        ratio = f"{r['actual_s'] / r['predicted_s']:.2f}x" if r["actual_s"] and r["predicted_s"] else "-"
        tries = f" ({r['attempts']} attempts)" if r["attempts"] > 1 else ""
        lines.append(
            f"  {r['job']:<{width}}  {r['status']:<10} predicted {_h(r['predicted_s']):<9} "
            f"actual {_h(r['actual_s']):<9} {ratio}{tries}"
        )
    lines += ["", "success metrics:"]
    lines += [f"  [{'PASS' if ok else 'FAIL'}] {name}: {evidence}" for name, ok, evidence in report["checklist"]]
    return "\n".join(lines)
