"""Will the plan fit? Predict every job of one or more phases, schedule them on the cluster, say so.

    python -m telepathy plan +phase=all cluster.gpus=4 cluster.window_h=24 cluster.device=h100
    python -m telepathy plan +phase=p1_seeds,p5_xsum task=sst2 budget=tiny cluster.device=cpu

Nothing is submitted. For each phase (``conf/phase/*.yaml``; ``all`` = every one) the sweep is
expanded exactly as ``train.py -m`` would (the phase's ``hydra.sweeper.params``, command-line
values win), each job is composed and validated, resource-planned (``resources.plan``: 1 or
2 GPUs, estimated GB) and its duration predicted (``costs.predict``: per stage, calibrated
from finished runs where it can). Jobs already completed, and runs an earlier phase already plans (P3's bridge
runs are P1's), are left out.

Then ``schedule`` places the jobs on ``cluster.gpus`` GPUs of ``cluster.gpu_mem_gb``:
critical phases first (``cluster.phases.<name>.priority``, lower first), longest job first
within a priority, a phase's ``after`` phases finished before it starts (P4 times a trained
bridge), 2-GPU jobs on two free GPUs, and *packable* jobs (1 GPU, estimate at most
``gpu_mem_gb / cluster.pack_max``) sharing a GPU up to ``cluster.pack_max`` at a time. A
lower-priority job fills a GPU a higher one cannot use yet (greedy backfill).

A packable job also needs a GPU-busy fraction of at most ``cluster.pack_busy_max``, and a packed
job stretches by its neighbours' busy share (``packing_slowdown``). Every job is also predicted in a
``low`` and a ``high`` scenario, and both are scheduled.

Output: the jobs with their predicted durations, ranges and GPU-busy fractions and where each number
comes from (default or calibrated), the downloads (``telepathy.prepare``) as a line of their own, a
Gantt table and PNG (one lane per GPU; solid = GPU-busy share), the makespan and its range, per-GPU
occupancy (time held) and predicted GPU-busy share, per-phase busy fractions with the verdict for the
seed's "> 80 %" (``cluster.busy_target``), and a verdict: fits ``cluster.window_h`` or not, and if
not, which cuts would make it fit (fewer steps, fewer grid points of one phase, a phase after the
window). ``plan.json`` in the output folder holds it all; ``python -m telepathy status --plan``
compares it with what ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from telepathy.config import CONF_DIR, ConfigError, check_choice, check_range, group_options

PLAN_FILE = "plan.json"


# ------------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class Job:
    name: str
    phase: str
    duration_s: float
    gpus: int = 1
    mem_gb: float = 0.0
    priority: int = 0
    after: tuple = ()  # phases that must finish first
    packable: bool = False
    train_s: float = 0.0  # part of duration_s that scales with trainer.max_steps
    params: tuple = ()  # (key, value) sweep parameters: for "fewer grid points"
    run_dir: str = ""
    busy: float = 0.0  # predicted GPU-busy fraction of its duration (costs.Prediction.busy_fraction)
    range_s: tuple = ()  # (low, high) predicted durations (costs.SCENARIOS)


@dataclass
class Slot:
    job: Job
    gpus: tuple
    start: float
    end: float
    stretch: float = 1.0  # packing slowdown: its duration on a shared GPU / alone

    @property
    def busy_s(self) -> float:
        """GPU-busy seconds (the same work however long packing stretches it)."""
        return self.job.busy * self.job.duration_s


def schedule(jobs: list[Job], n_gpus: int, gpu_mem_gb: float, pack_max: int = 1) -> list[Slot]:
    """Priority list scheduling with dependencies, 1-/2-GPU jobs and memory-bounded packing."""
    too_big = [j.name for j in jobs if j.gpus > n_gpus]
    if too_big:
        raise ConfigError(
            f"cluster.gpus={n_gpus} is not allowed for this plan; allowed: at least "
            f"{max(j.gpus for j in jobs)} (jobs {too_big[:3]} need more GPUs)"
        )
    pending = sorted(jobs, key=lambda j: (j.priority, -j.duration_s, j.name))
    phase_left = {}
    for j in jobs:
        phase_left[j.phase] = phase_left.get(j.phase, 0) + 1
    phase_end: dict[str, float] = {}
    running: list[Slot] = []
    slots: list[Slot] = []
    t = 0.0
    while pending:
        for slot in [s for s in running if s.end <= t]:
            running.remove(slot)
            phase_left[slot.job.phase] -= 1
            if not phase_left[slot.job.phase]:
                phase_end[slot.job.phase] = slot.end
        on_gpu = {g: [s for s in running if g in s.gpus] for g in range(n_gpus)}
        for job in list(pending):
            if any(p in phase_left and p not in phase_end for p in job.after):
                continue
            gpus = _place(job, on_gpu, gpu_mem_gb, pack_max)
            if gpus is None:
                continue
            stretch = packing_slowdown(job, [x.job for g in gpus for x in on_gpu[g]])
            slot = Slot(job, gpus, t, t + job.duration_s * stretch, stretch)
            pending.remove(job)
            running.append(slot)
            slots.append(slot)
            for g in gpus:
                on_gpu[g].append(slot)
        if not pending:
            break
        later = [s.end for s in running if s.end > t]
        if not later:
            blocked = ", ".join(sorted({p for j in pending for p in j.after if p not in phase_left}))
            raise ConfigError(
                f"cluster.phases: jobs wait for phases that are not planned ({blocked}); "
                f"allowed: 'after' naming planned phases"
            )
        t = min(later)
    return slots


def _place(job: Job, on_gpu: dict, gpu_mem_gb: float, pack_max: int) -> tuple | None:
    empty = [g for g, s in on_gpu.items() if not s]
    if job.gpus > 1 or not job.packable or pack_max <= 1:
        return tuple(empty[: job.gpus]) if len(empty) >= job.gpus else None
    shared = [
        g
        for g, s in on_gpu.items()
        if s
        and all(x.job.packable for x in s)
        and len(s) < pack_max
        and sum(x.job.mem_gb for x in s) + job.mem_gb <= gpu_mem_gb
    ]
    # fill a GPU that already shares before opening an empty one (keeps whole GPUs for big jobs)
    shared.sort(key=lambda g: -sum(x.job.mem_gb for x in on_gpu[g]))
    choice = shared[:1] or empty[:1]
    return tuple(choice) if choice else None


def packing_slowdown(job: Job, sharing: list[Job]) -> float:
    """How much longer ``job`` takes beside the jobs already on its GPU: its kernels wait behind theirs
    for the share of the time they keep the GPU busy, so its GPU-bound part (``busy``) stretches by
    1 + their summed busy fractions; its dispatch-bound part runs on its own CPU cores and does not.
    An approximation made when the job is placed (the jobs already there are not re-timed)."""
    return 1.0 + job.busy * sum(x.busy for x in sharing)


def makespan(slots: list[Slot]) -> float:
    return max((s.end for s in slots), default=0.0)


def gpu_busy(slots: list[Slot], n_gpus: int) -> list[float]:
    """Per GPU: predicted GPU-busy seconds of its jobs / the makespan (a 2-GPU job counts half on each)."""
    span = makespan(slots) or 1.0
    return [sum(s.busy_s / len(s.gpus) for s in slots if g in s.gpus) / span for g in range(n_gpus)]


def phase_busy(slots: list[Slot]) -> dict[str, float]:
    """Per phase: its jobs' GPU-busy seconds / the GPU-seconds they hold (GPUs x duration)."""
    held: dict[str, list[float]] = {}
    for s in slots:
        busy, total = held.setdefault(s.job.phase, [0.0, 0.0])
        held[s.job.phase] = [busy + s.busy_s, total + len(s.gpus) * (s.end - s.start)]
    return {p: b / t if t else 0.0 for p, (b, t) in sorted(held.items())}


def occupancy(slots: list[Slot], n_gpus: int) -> list[float]:
    """Per GPU: the fraction of the makespan with at least one job on it."""
    span = makespan(slots) or 1.0
    out = []
    for g in range(n_gpus):
        intervals = sorted((s.start, s.end) for s in slots if g in s.gpus)
        busy, cur_start, cur_end = 0.0, None, None
        for a, b in intervals:
            if cur_end is None or a > cur_end:
                busy += (cur_end - cur_start) if cur_end is not None else 0.0
                cur_start, cur_end = a, b
            else:
                cur_end = max(cur_end, b)
        busy += (cur_end - cur_start) if cur_end is not None else 0.0
        out.append(busy / span)
    return out


# ------------------------------------------------------------------------------------ verdict
def cuts(jobs: list[Job], window_s: float, n_gpus: int, gpu_mem_gb: float, pack_max: int) -> list[str]:
    """What would make an over-long plan fit: fewer steps, fewer grid points, a phase later."""

    def span(js):
        return makespan(schedule(js, n_gpus, gpu_mem_gb, pack_max)) if js else 0.0

    out = []
    lo, hi = 0.0, 1.0  # fraction of trainer.max_steps kept
    if span([_scale_train(j, 0.0) for j in jobs]) <= window_s:
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if span([_scale_train(j, mid) for j in jobs]) <= window_s else (lo, mid)
        out.append(
            f"fewer steps: trainer.max_steps x {lo:.2f} in every training phase fits "
            f"({span([_scale_train(j, lo) for j in jobs]) / 3600:.1f} h)"
        )
    best = None
    for phase in sorted({j.phase for j in jobs}):
        values: dict[str, list[str]] = {}
        for j in jobs:
            if j.phase == phase:
                for k, v in j.params:
                    values.setdefault(k, [])
                    if v not in values[k]:
                        values[k].append(v)
        for key, vals in values.items():
            if len(vals) < 2:
                continue
            kept = [j for j in jobs if not (j.phase == phase and (key, vals[-1]) in j.params)]
            s = span(kept)
            if s <= window_s and (best is None or s < best[0]):
                best = (s, f"fewer grid points: {phase} without {key}={vals[-1]} fits ({s / 3600:.1f} h)")
    if best:
        out.append(best[1])
    phases = sorted({j.phase: j.priority for j in jobs}.items(), key=lambda kv: (-kv[1], kv[0]))
    later: list[str] = []
    for phase, _ in phases[:-1]:
        later.append(phase)
        blocked = {p for p in later}
        kept = [j for j in jobs if j.phase not in blocked and not set(j.after) & blocked]
        s = span(kept)
        if s <= window_s:
            out.append(f"a phase later: run {', '.join(later)} after the window; the rest fits ({s / 3600:.1f} h)")
            break
    return out or ["no single cut found: more GPUs (cluster.gpus) or a longer window (cluster.window_h)"]


def _scale_train(job: Job, keep: float) -> Job:
    return replace(job, duration_s=job.duration_s - job.train_s * (1 - keep), train_s=job.train_s * keep)


# ------------------------------------------------------------------------------------ phases → jobs
def check(cfg) -> None:
    """The cluster keys the planner reads, validated before anything is composed."""
    from telepathy.cluster.costs import DEVICES

    check_range(cfg, "cluster.gpus", lo=1, integer=True)
    check_range(cfg, "cluster.gpu_mem_gb", lo=1)
    check_range(cfg, "cluster.window_h", lo=0.01)
    check_range(cfg, "cluster.pack_max", lo=1, integer=True)
    check_choice(cfg, "cluster.device", list(DEVICES))
    check_range(cfg, "cluster.dispatch_s", lo=0)
    check_range(cfg, "cluster.download_gb_s", lo=1e-6)
    check_range(cfg, "cluster.pack_busy_max", lo=0, hi=1)
    check_range(cfg, "cluster.busy_target", lo=0, hi=1)
    check_choice(cfg, "cluster.prepare_in_window", [True, False])
    for name, spec in (OmegaConf.select(cfg, "cluster.phases") or {}).items():
        check_range(cfg, f"cluster.phases.{name}.priority", integer=True)
        unknown = [p for p in (spec.get("after") or []) if p not in group_options("phase")]
        if unknown:
            raise ConfigError(
                f"cluster.phases.{name}.after={list(spec.after)} is not allowed; allowed: "
                f"phases of conf/phase ({', '.join(group_options('phase'))})"
            )


def phase_spec(cfg, name: str) -> dict:
    """A phase's plan entry (``priority``, ``after``, ``app``): ``cluster.phases.<name>``. A paper phase at
    another scale (``conf/phase/<scale>/<phase>.yaml``, e.g. ``demo/p4_latency``) takes its paper phase's
    entry, its ``after`` naming the phases of the same scale (``demo/p1_seeds``); a phase the list does not
    name gets the defaults ({}: priority 99, no ``after``, the train app)."""
    node = OmegaConf.select(cfg, "cluster.phases")
    phases = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    if name in phases:
        return dict(phases[name] or {})
    scale, _, base = name.rpartition("/")
    if not scale or base not in phases:
        return {}
    spec = dict(phases[base] or {})
    spec["after"] = [f"{scale}/{p}" for p in spec.get("after") or []]
    return spec


def _compose(config_name: str, overrides: list[str], hydra_cfg: bool = False):
    from hydra import compose

    return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_cfg)


def expand(phase: str, config_name: str, overrides: list[str]) -> tuple[list[list[str]], set[str]]:
    """The job override lists of ``train.py -m +phase=<phase> <overrides>`` (command line wins),
    and the keys the sweep varies (the phase's parameters and any comma list of the command line).

    In the order Hydra's basic sweeper gives a launched job: the phase's parameters first, then the
    command line (``+phase=...`` among it), so a job composes here as it will run. The order matters
    where both add config: a swept ``+pair=...`` is merged before the phase, whose own values win."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    base = _compose(config_name, [f"+phase={phase}"], hydra_cfg=True)
    params = {str(k): str(v) for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()}
    user = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    sweep = [f"{k}={v}" for k, v in params.items()] + [f"+phase={phase}", *overrides]
    parsed = OverridesParser.create().parse_overrides(sweep)
    keys = {k.lstrip("+~") for k in params} | {k for k, o in user.items() if "," in o}
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch], keys


def phase_jobs(
    phase: str,
    overrides: list[str],
    device: str,
    cal,
    gpu_mem_gb: float,
    pack_max: int,
    spec: dict,
    seen: dict,
    shared: list | None = None,
) -> tuple[list[Job], list[dict], int]:
    """(jobs to schedule, their descriptions, number already completed or planned by an earlier phase)
    of one phase; ``seen`` maps the run dirs planned so far to their phase (P1's bridge runs are
    also P3's): such a run is planned, and costs, once, in the phase that plans it first; this
    phase lists it in ``shared`` (``shared_with`` that phase)."""
    from telepathy import resources
    from telepathy.cluster import costs, sweep
    from telepathy.config import run_dir
    from telepathy.methods import validate
    from telepathy.results import read_result

    app = str(spec.get("app", "train"))
    jobs, rows, done = [], [], 0
    job_list, keys = expand(phase, app, overrides)
    for job_overrides in job_list:
        cfg = _compose(app, job_overrides)
        params = tuple(
            (k.lstrip("+~"), v)
            for k, v in (o.split("=", 1) for o in job_overrides if "=" in o)
            if k.lstrip("+~") in keys
        )
        name = " ".join(f"{k}={v}" for k, v in params)
        if OmegaConf.select(cfg, "method.name") is None:  # benchmark app: both models on 1 GPU
            validate_gb = sum(resources._weights_gb(cfg[r]) for r in ("sender", "receiver"))
            gpus, mem_gb, rdir = 1, validate_gb * float(OmegaConf.select(cfg, "resources.margin", default=1.25)), ""
        else:
            validate(cfg)
            res = resources.plan(cfg)
            gpus, mem_gb, rdir = res.gpus, res.estimate_gb, str(run_dir(cfg))
            if rdir in seen and shared is not None:
                shared.append({"job": f"{phase}: {name}", "phase": phase, "run_dir": rdir, "shared_with": seen[rdir]})
            if rdir in seen or (read_result(Path(rdir)) or {}).get("status") == "completed":
                done += 1
                continue
            seen[rdir] = phase
            # a deterministic method's other seeds: the launcher queues one job and copies its record
            # (cluster.sweep.share_deterministic), so the plan costs it once too
            key = sweep.share_key(cfg)
            if key is not None and f"deterministic:{key}" in seen:
                if shared is not None:
                    shared.append(
                        {
                            "job": f"{phase}: {name}",
                            "phase": phase,
                            "run_dir": rdir,
                            "shared_with": seen[f"deterministic:{key}"],
                        }
                    )
                continue
            if key is not None:
                seen[f"deterministic:{key}"] = phase
        stats = costs.token_stats(cfg)
        pred = costs.predict(cfg, device, cal, stats)
        low, high = (costs.predict(cfg, device, cal, stats, scenario=x).total_s for x in ("low", "high"))
        mem_ratio = cal.ratio((costs.model_key(cfg.receiver), device, "memory"))
        estimate_gb = mem_gb
        if mem_ratio:  # measured peaks of this model on this device / their estimates, with the margin kept
            mem_gb = mem_gb * mem_ratio
        # only jobs that leave the GPU mostly idle share it: GPU-bound ones would slow each other down
        busy_max = float(OmegaConf.select(cfg, "cluster.pack_busy_max", default=1.0))
        packable = gpus == 1 and mem_gb <= gpu_mem_gb / pack_max and pred.busy_fraction <= busy_max
        batch = resources.batch_plan(cfg) if "train" in pred.seconds else None
        job = Job(
            name=f"{phase}: {name}",
            phase=phase,
            duration_s=pred.total_s,
            gpus=gpus,
            mem_gb=mem_gb,
            priority=int(spec.get("priority", 99)),
            after=tuple(spec.get("after") or ()),
            packable=packable,
            train_s=pred.seconds.get("train", 0.0),
            params=params,
            run_dir=rdir,
            busy=pred.busy_fraction,
            range_s=(low, high),
        )
        jobs.append(job)
        rows.append(
            {
                "job": job.name,
                "phase": phase,
                "run_dir": rdir,
                "gpus": gpus,
                "mem_gb": round(mem_gb, 2),
                "estimate_gb": round(estimate_gb, 2),
                "mem_calibrated": bool(mem_ratio),
                "packable": packable,
                "predicted_s": round(pred.total_s, 1),
                "run_s": round(sum(pred.seconds.values()), 1),
                "stages_s": {k: round(v, 1) for k, v in pred.seconds.items()},
                "sources": pred.sources,
                "range_s": [round(low, 1), round(high, 1)],
                "busy": round(pred.busy_fraction, 3),
                "busy_s": {k: round(v, 1) for k, v in pred.busy.items()},
                "lower_bound_s": {k: round(v, 2) for k, v in costs.lower_bound(cfg, device, stats).items()},
                "dispatch_s": round(pred.dispatch_s, 1),
                "startup_s": round(pred.startup_s, 1),
                "batch": batch and {k: batch[k] for k in ("per_device", "grad_accum", "rule")},
                "weights": _weights(cfg),
            }
        )
    return jobs, rows, done


def _weights(cfg) -> dict:
    """{model: weight bytes} of the hub models the job loads (what ``telepathy.prepare`` downloads)."""
    from telepathy.cluster import costs
    from telepathy.config import model_config, models_used

    roles = models_used(cfg) if OmegaConf.select(cfg, "method.name") else ["sender", "receiver"]
    out = {}
    for entry in dict.fromkeys(roles):
        model = model_config(cfg, entry)
        if model.get("hub_id") and not model.get("random_init") and not model.get("path"):
            out[str(model.name)] = costs._weight_bytes(model)
    return out


def prepare_line(rows: list[dict], cl) -> tuple[float, str]:
    """Seconds to download every hub model the plan loads (``python -m telepathy.prepare``), and the line
    that says so; inside the window when ``cluster.prepare_in_window`` (the jobs then start after it)."""
    models: dict[str, float] = {}
    for r in rows:
        models.update(r.get("weights") or {})
    rate = float(cl.get("download_gb_s") or 0.2) * 1e9
    seconds = sum(models.values()) / rate
    where = "inside the window: every job starts after it" if cl.get("prepare_in_window") else "before the window"
    text = (
        f"prepare (python -m telepathy.prepare): {len(models)} models, {sum(models.values()) / 1e9:.1f} GB at "
        f"{rate / 1e9:g} GB/s (cluster.download_gb_s) = {_hms(seconds)}, {where} (cluster.prepare_in_window)"
    )
    return (seconds if cl.get("prepare_in_window") else 0.0), text


# ------------------------------------------------------------------------------------ output
def gantt_table(slots: list[Slot], n_gpus: int) -> str:
    lines = ["| GPU | start (h) | end (h) | job |", "|---|---|---|---|"]
    for g in range(n_gpus):
        for s in sorted((s for s in slots if g in s.gpus), key=lambda s: s.start):
            lines.append(f"| {g} | {s.start / 3600:.2f} | {s.end / 3600:.2f} | {s.job.name} |")
    return "\n".join(lines)


def gantt_png(slots: list[Slot], n_gpus: int, window_s: float, path: Path, prepare_s: float = 0.0) -> Path:
    """One lane per GPU; jobs sharing a GPU are drawn as thinner bars stacked in its lane. Each bar's
    solid part is its predicted GPU-busy share, the pale rest the time the GPU waits (start-up,
    loading, dispatch). The axis spans the schedule (minutes below 2 h), not a window it does not reach:
    a 25-minute plan on a 24-hour axis is a blank picture; the window is drawn when it is in view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = max(makespan(slots), 1.0)
    unit, scale = ("minutes", 60.0) if span < 2 * 3600 else ("hours", 3600.0)
    phases = sorted({s.job.phase for s in slots})
    colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(phases)}
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.8 * n_gpus))
    for g in range(n_gpus):
        lane = sorted((s for s in slots if g in s.gpus), key=lambda s: s.start)
        tracks: list[float] = []  # end time of each sub-track
        placed = []
        for s in lane:
            k = next((i for i, end in enumerate(tracks) if end <= s.start + 1e-9), len(tracks))
            if k == len(tracks):
                tracks.append(s.end)
            tracks[k] = s.end
            placed.append((s, k))
        height = 0.8 / max(1, len(tracks))
        for s, k in placed:
            y, width = g - 0.4 + (k + 0.5) * height, (s.end - s.start) / scale
            colour = colours[s.job.phase]
            ax.barh(y, width, left=s.start / scale, height=height, color=colour, alpha=0.3, edgecolor="black", lw=0.3)
            ax.barh(y, width * min(1.0, s.job.busy), left=s.start / scale, height=height * 0.6, color=colour)
    if prepare_s:
        ax.axvspan(0, prepare_s / scale, color="grey", alpha=0.25, label="prepare (downloads)")
    in_view = window_s <= 1.3 * span
    if in_view:
        ax.axvline(window_s / scale, color="red", linestyle="--")
    ax.set_xlim(0, (max(window_s, span) if in_view else span) * 1.03 / scale)
    ax.set_yticks(range(n_gpus), [f"GPU {g}" for g in range(n_gpus)])
    ax.set_xlabel(unit)
    window = f"window {window_s / 3600:g} h" + (
        "" if in_view else f" (off the axis: the plan uses {span / window_s:.0%})"
    )
    ax.set_title(f"makespan {_hms(span)}; {window}; solid = predicted GPU-busy share", fontsize=9)
    ax.invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[p]) for p in phases]
    labels = list(phases)
    if in_view:
        handles.append(plt.Line2D([0], [0], color="red", linestyle="--"))
        labels.append("window")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _shift(slots: list[Slot], offset: float) -> list[Slot]:
    """The schedule ``offset`` seconds later (everything waits for the downloads inside the window)."""
    return [replace(s, start=s.start + offset, end=s.end + offset) for s in slots]


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run(
    overrides: list[str],
    out_dir: Path | None = None,
    calibrate_from: list[Path] | None = None,
    narrow: dict[str, list[str]] | None = None,
) -> dict:
    """Plan the phases named by ``+phase=`` in ``overrides``; write plan.json + Gantt; return the plan.
    ``narrow``: {phase: overrides} applied to that phase only, after ``overrides`` (one slice of each
    phase, as scripts/paper.py launches them)."""
    from hydra import initialize_config_dir

    from telepathy.cluster import costs
    from telepathy.config import register_resolvers
    from telepathy.results import write_json, write_text

    phases_arg = [o for o in overrides if o.lstrip("+").startswith("phase=")]
    rest = [o for o in overrides if o not in phases_arg]
    names = phases_arg[-1].split("=", 1)[1].split(",") if phases_arg else ["all"]
    unknown = [n for n in names if n not in ["all", *group_options("phase")]]
    if unknown:
        raise ConfigError(
            f"phase={','.join(unknown)} is not allowed; allowed: all, {', '.join(group_options('phase'))}"
        )
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        top = _compose("train", [o for o in rest if "," not in o])
        check(top)
        cl = top.cluster
        if names == ["all"]:  # the plan's phases (cluster.phases); extensions such as p6_grid only by name
            names = [str(n) for n in cl.phases]
        n_gpus, gpu_mem, pack_max, device = int(cl.gpus), float(cl.gpu_mem_gb), int(cl.pack_max), str(cl.device)
        window_s = float(cl.window_h) * 3600
        sources = calibrate_from or [Path(str(top.paths.output_dir)) / "runs"]
        cal = costs.load_calibration(sources[0])
        for extra in sources[1:]:
            cal.merge(costs.load_calibration(extra, table=None))
        jobs, rows, done, seen, shared = [], [], 0, {}, []
        for name in sorted(names, key=lambda n: (int(phase_spec(top, n).get("priority", 99)), n)):
            spec = phase_spec(top, name)
            own = [*rest, *(narrow or {}).get(name, [])]
            j, r, d = phase_jobs(name, own, device, cal, gpu_mem, pack_max, spec, seen, shared)
            jobs, rows, done = jobs + j, rows + r, done + d
    offset, prepare = prepare_line(rows, cl)
    slots = _shift(schedule(jobs, n_gpus, gpu_mem, pack_max), offset)
    span = makespan(slots)
    occ = occupancy(slots, n_gpus)
    spans = {"expected": span}
    for i, scenario in enumerate(("low", "high")):
        varied = [replace(j, duration_s=j.range_s[i], train_s=j.train_s * j.range_s[i] / j.duration_s) for j in jobs]
        spans[scenario] = offset + makespan(schedule(varied, n_gpus, gpu_mem, pack_max))
    target = float(cl.get("busy_target") or 0.8)
    by_name = {s.job.name: s for s in slots}
    for row in rows:
        slot = by_name[row["job"]]
        row.update(start_s=round(slot.start, 1), gpu=list(slot.gpus), packing_slowdown=round(slot.stretch, 3))
    phase_span = {p: max(s.end for s in slots if s.job.phase == p) for p in {s.job.phase for s in slots}}
    result = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "phases": names,
        "overrides": rest,
        "narrow": narrow or {},
        "cluster": {
            "gpus": n_gpus,
            "gpu_mem_gb": gpu_mem,
            "window_h": window_s / 3600,
            "device": device,
            "pack_max": pack_max,
        },
        "makespan_s": round(span, 1),
        "makespan_range_s": {k: round(v, 1) for k, v in spans.items()},
        "fits": span <= window_s,
        "fits_high": spans["high"] <= window_s,
        "prepare": prepare,
        "occupancy": [round(o, 3) for o in occ],
        "gpu_busy": [round(b, 3) for b in gpu_busy(slots, n_gpus)],
        "phase_busy": {k: round(v, 3) for k, v in phase_busy(slots).items()},
        "busy_target": target,
        "phase_end_s": {p: round(v, 1) for p, v in sorted(phase_span.items())},
        "completed_skipped": done,
        "calibration": cal.to_table(),
        "jobs": rows,
        "shared": shared,  # runs of a phase planned (and costed) in an earlier one: 0 here
        "cuts": [] if span <= window_s else cuts(jobs, window_s, n_gpus, gpu_mem, pack_max),
    }
    out_dir = Path(out_dir or Path(str(top.paths.output_dir)) / "plans" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    write_json(out_dir / PLAN_FILE, result)
    write_text(out_dir / "gantt.md", gantt_table(slots, n_gpus) + "\n")
    if slots:
        gantt_png(slots, n_gpus, window_s, out_dir / "gantt.png", offset)
    result["out_dir"] = str(out_dir)
    return result


def render(plan: dict) -> str:
    c = plan["cluster"]
    lines = [
        f"plan for {', '.join(plan['phases'])} on {c['gpus']} x {c['device']} ({c['gpu_mem_gb']:g} GB, "
        f"up to {c['pack_max']} small runs per GPU), window {c['window_h']:g} h; nothing submitted",
        "",
    ]
    width = max([len(r["job"]) for r in plan["jobs"]] + [3])
    lines.append(
        f"{'job':<{width}}  gpus  est GB  pack  predicted (low-high)          busy  start     "
        "stages (s; * = calibrated)"
    )
    for r in plan["jobs"]:
        stages = " ".join(f"{k}={v:g}{'*' if r['sources'][k] != 'default' else ''}" for k, v in r["stages_s"].items())
        pack = "yes" if r["packable"] else "no"
        low, high = r.get("range_s") or (r["predicted_s"], r["predicted_s"])
        batch = f" batch {r['batch']['per_device']}x{r['batch']['grad_accum']}" if r.get("batch") else ""
        lines.append(
            f"{r['job']:<{width}}  {r['gpus']:<4}  {r['mem_gb']:<6.1f}  {pack:<4}  "
            f"{_hms(r['predicted_s']):>8} ({_hms(low)}-{_hms(high)})  {r.get('busy', 0):>4.0%}  "
            f"{_hms(r['start_s']):>8}  {stages}{batch}"
        )
    n_cal = sum(1 for r in plan["jobs"] if any(v != "default" for v in r["sources"].values()))
    lines += [
        "",
        f"{len(plan['jobs'])} jobs ({plan['completed_skipped']} left out: completed, or the same run "
        "in an earlier phase); "
        f"{n_cal} with calibrated numbers, {len(plan['jobs']) - n_cal} on defaults only",
    ]
    lines += [
        f"  shared: {r['job']} is planned and costed in {r['shared_with']} (0 GPU-h here)"
        for r in plan.get("shared", [])
    ]
    if plan.get("prepare"):
        lines.append(f"  {plan['prepare']}")
    target = plan.get("busy_target", 0.8)
    for p, end in plan["phase_end_s"].items():
        busy = plan.get("phase_busy", {}).get(p)
        tail = f"; GPU busy {busy:.0%} of its GPU time" if busy is not None else ""
        lines.append(f"  {p:<14} done at {_hms(end)}{tail}")
    occ = ", ".join(f"GPU{g} {o:.0%}" for g, o in enumerate(plan["occupancy"]))
    rng = plan.get("makespan_range_s") or {}
    span_text = f"makespan {_hms(plan['makespan_s'])} ({plan['makespan_s'] / 3600:.1f} h)"
    if rng:
        span_text += f", range {_hms(rng['low'])} to {_hms(rng['high'])} (low / high scenarios)"
    lines.append(f"{span_text}; GPUs held: {occ}")
    if plan.get("gpu_busy"):
        busy = ", ".join(f"GPU{g} {b:.0%}" for g, b in enumerate(plan["gpu_busy"]))
        phases = plan.get("phase_busy", {})
        below = [p for p, b in phases.items() if b <= target]
        meets = "no" if below else "yes"
        lines.append(f"predicted GPU busy (of the makespan): {busy}")
        lines.append(
            f"seed's > {target:.0%} GPU utilisation: {meets}"
            + (f" (below it: {', '.join(f'{p} {phases[p]:.0%}' for p in below)})" if below else "")
        )
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    high = "" if plan.get("fits_high", plan["fits"]) else " (the high scenario does not)"
    lines.append(f"verdict: {verdict} the {c['window_h']:g} h window{high}")
    lines += [f"  cut: {cut}" for cut in plan["cuts"]]
    lines.append(f"plan.json, gantt.md, gantt.png in {plan['out_dir']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telepathy plan", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overrides",
        nargs="*",
        help="+phase=all|p1_seeds,... and any config override "
        "(cluster.gpus=4 cluster.window_h=24 cluster.device=h100 task=sst2 ...)",
    )
    parser.add_argument("--out", type=Path, help="folder for plan.json / gantt.png (default <outputs>/plans/<time>)")
    parser.add_argument("--json", action="store_true", help="print plan.json instead of the table")
    parser.add_argument(
        "--calibrate-from",
        type=Path,
        action="append",
        metavar="RUNS_DIR",
        help="folders of run dirs whose result.json calibrate the prediction (repeatable; default <outputs>/runs)",
    )
    args = parser.parse_args(argv)
    try:
        plan = run(args.overrides, args.out, args.calibrate_from)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0
