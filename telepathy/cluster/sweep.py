"""A sweep before and after submission: its planned jobs, their arrays, and the jobs.json manifest.

Shared by the Hydra launcher plugin (hydra_plugins/telepathy_launcher), which submits
the plan, and by ``python -m telepathy status``, which reads the manifest back.

* ``plan`` composes, validates and resource-plans every job of a sweep before anything
  is submitted: one bad job aborts the launch with every problem listed; a run whose
  result.json says ``completed`` is skipped (``+rerun=all`` forces it), and so is a run
  whose earlier SLURM job is still queued or running, or a second job with the same run dir;
* ``group`` puts the jobs to queue into one array per resource class;
* ``describe`` is the dry-run table (every job, its resources, GPU-hours);
* ``record_intent`` records an array in the manifest before its ``sbatch``, under a job name
  of its own, so that a launcher killed during that ``sbatch`` leaves the array findable
  (``status`` asks squeue/sacct for that name); ``write_manifest`` then records what was
  queued (run dirs, SLURM job ids, resources) and drops the intent;
* ``read_manifest`` is the one reader of ``jobs.json``: it is written twice (``jobs.json`` and
  the copy ``.jobs.json.bak``), so one damaged file (truncated, not UTF-8) is read from the
  other, and a manifest neither can give is one line naming the file and line, never skipped.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MANIFEST = "jobs.json"
MANIFEST_COPY = ".jobs.json.bak"  # the same manifest, written after it: what survives one damaged file
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A jobs.json (and its copy) that cannot be read; the message names the file and line."""


class LaunchError(ValueError):
    """The sweep cannot be launched; nothing was submitted."""


@dataclass
class PlannedJob:
    """One job of the sweep after composition, validation and resource planning."""

    idx: int
    overrides: list[str]
    run_dir: str
    # "queue" | "skipped" (completed) | "active" (its earlier SLURM job is still alive)
    # | "duplicate" (an earlier job of this sweep has the same run dir)
    state: str
    resources: Any = None  # telepathy.resources.Resources
    reason: str = ""
    slurm_job_id: str | None = None
    kind: str = "run"  # "run": a train.py run dir with result.json | "benchmark": another app's job dir
    # deterministic methods: the config hash without the seed (same key → same result); None otherwise
    share_key: str | None = None
    seed: int | None = None
    shares: str | None = None  # state "shared": the run dir of the job that computes this result
    reuse_seeds: list = field(default_factory=list)  # the job computing a shared result: the other seeds

    @property
    def job_overrides(self) -> list[str]:
        """The sweep overrides plus the resource plan, which result.json records."""
        r = self.resources
        extra = [
            f"++resources.gpus={r.gpus}",
            f"++resources.cpus={r.cpus}",
            f"++resources.mem_gb={r.mem_gb}",
            f"++resources.timeout_min={r.timeout_min}",
            f"++resources.estimate_gb={r.estimate_gb:.3f}",
            f"++resources.device_gb=[{','.join(f'{g:.3f}' for g in r.device_gb)}]",
        ]
        extra += [f"++resources.placement.{role}='{dev}'" for role, dev in r.placement.items()]
        if self.reuse_seeds:  # the run writes its record for these seeds too (telepathy/shared_runs.py)
            extra.append(f"++run.reuse_seeds=[{','.join(str(seed) for seed in self.reuse_seeds)}]")
        return list(self.overrides) + extra


def _filter(overrides: Sequence[str]) -> list[str]:
    """The overrides a user typed (Hydra's own ``hydra.*`` ones left out)."""
    return [o for o in overrides if not o.startswith("hydra.")]


def plan_job(idx: int, overrides: list[str], cfg, rerun: bool, alive: dict[str, str]) -> PlannedJob:
    """One composed job: validated, resource-planned, and marked skipped/active when it need not run."""
    from telepathy import resources
    from telepathy.config import run_dir
    from telepathy.methods import validate
    from telepathy.results import read_result

    if OmegaConf.select(cfg, "method.name") is None:
        return plan_benchmark_job(idx, overrides, cfg, rerun, alive)
    validate(cfg)
    rdir = str(run_dir(cfg))
    job = PlannedJob(
        idx=idx,
        overrides=list(overrides),
        run_dir=rdir,
        state="queue",
        resources=resources.plan(cfg),
        share_key=share_key(cfg),
        seed=cfg.get("seed"),
    )
    if rerun:
        return job
    record = read_result(Path(rdir)) or {}
    if record.get("status") == "completed":
        job.state, job.reason = "skipped", "completed (+rerun=all to run it again)"
    elif rdir in alive:
        job.state, job.reason = "active", f"SLURM job {alive[rdir]} is still queued or running"
        job.slurm_job_id = alive[rdir]
    return job


# what a benchmark job (benchmarks/latency.py) writes last into its job dir, once every path's result.json is in
BENCHMARK_DONE = "summary.json"


def plan_benchmark_job(
    idx: int, overrides: list[str], cfg, rerun: bool = False, alive: dict[str, str] | None = None
) -> PlannedJob:
    """A job of another Hydra app on the same conf/ tree (benchmarks/latency.py): no method, so no run
    id; it gets one GPU, the per-GPU CPUs and its host-RAM estimate. Its job dir is its identity: by
    default a new one per launch (the sweep dir has the time in it); where the app fixes it
    (``hydra.sweep.subdir``, e.g. conf/phase/demo/p4_latency.yaml) a relaunch skips a job whose dir holds
    ``BENCHMARK_DONE`` and one whose earlier SLURM job is still queued or running, as for runs."""
    from telepathy.config import validate_latency
    from telepathy.resources import Resources, mem_request_gb

    if OmegaConf.select(cfg, "cluster") is None:
        raise LaunchError(
            "this app's config has no cluster group: add `+cluster=default` to the command "
            "(or `- cluster: default` to its defaults list)"
        )
    validate_latency(cfg)
    cluster = cfg.cluster
    plan = Resources(
        gpus=1,
        cpus=int(cluster.cpus_per_gpu),
        mem_gb=mem_request_gb(cfg, "cluster.mem_gb_per_gpu", 1),
        timeout_min=int(cluster.timeout_min),
        placement={"sender": "cuda:0", "receiver": "cuda:0"},
    )
    job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
    job = PlannedJob(
        idx=idx, overrides=list(overrides), run_dir=str(job_dir), state="queue", resources=plan, kind="benchmark"
    )
    if rerun:
        return job
    if (job_dir / BENCHMARK_DONE).exists():
        job.state, job.reason = "skipped", f"completed: {BENCHMARK_DONE} is there (+rerun=all to run it again)"
    elif str(job_dir) in (alive or {}):
        job.state, job.reason = "active", f"SLURM job {alive[str(job_dir)]} is still queued or running"
        job.slurm_job_id = alive[str(job_dir)]
    return job


def plan(
    compose: Callable[[list[str]], Any],
    config,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    alive: dict[str, str],
) -> list[PlannedJob]:
    """Compose (``compose(overrides) -> cfg``), validate and plan every job; raise LaunchError listing every bad one.

    ``alive`` maps run dirs to the SLURM job still queued or running for them (``status.alive_runs``).
    """
    rerun = str(OmegaConf.select(config, "rerun", default="")) == "all"
    alive = {} if rerun else alive
    planned, errors = [], []
    for offset, overrides in enumerate(job_overrides):
        idx = initial_job_idx + offset
        try:
            planned.append(plan_job(idx, list(overrides), compose(list(overrides)), rerun, alive))
        except Exception as err:  # noqa: BLE001 - every composition/validation error is reported together
            errors.append(f"  #{idx} [{' '.join(_filter(overrides))}]\n      {type(err).__name__}: {err}")
    first: dict[str, int] = {}
    for job in planned:  # e.g. a sweep over a key that run.id_exclude leaves out of the run id
        if job.run_dir in first:
            job.state, job.reason = "duplicate", f"same run dir as job #{first[job.run_dir]}"
        else:
            first[job.run_dir] = job.idx
    if errors:
        raise LaunchError(
            f"{len(errors)} of {len(job_overrides)} jobs are invalid; nothing was submitted:\n" + "\n".join(errors)
        )
    share_deterministic(planned)
    return planned


def share_key(cfg) -> str | None:
    """The seedless config hash of a run whose method gives the same result for every seed."""
    from telepathy import methods
    from telepathy.config import config_hash

    if not getattr(methods.get(cfg.method.name), "DETERMINISTIC", False):
        return None
    return config_hash(cfg, exclude=("seed",))


def share_deterministic(planned: list[PlannedJob]) -> None:
    """One job per deterministic result: the other seeds' jobs become ``shared`` and point to it.

    Queued in one array, the seeds of a zero-shot run would all start at once, so none
    could reuse another's result; the job that runs gets ``run.reuse_seeds`` and writes
    the same record into the other seeds' run dirs when it completes.
    """
    first: dict[str, PlannedJob] = {}
    for job in planned:
        if job.state != "queue" or job.share_key is None:
            continue
        primary = first.setdefault(job.share_key, job)
        if primary is not job:
            job.state, job.shares = "shared", primary.run_dir
            job.reason = f"same result as job #{primary.idx} (deterministic method: the seed does not change it)"
            primary.reuse_seeds.append(job.seed)


def sharers(planned: list[PlannedJob], jobs: list[PlannedJob]) -> list[PlannedJob]:
    """The ``shared`` jobs whose result one of ``jobs`` computes, given that job's SLURM id
    (so status and relaunches follow the job that writes their record)."""
    ids = {j.run_dir: j.slurm_job_id for j in jobs}
    out = [j for j in planned if j.state == "shared" and j.shares in ids]
    for job in out:
        job.slurm_job_id = ids[job.shares]
    return out


def group(jobs: Iterable[PlannedJob]) -> OrderedDict[str, list[PlannedJob]]:
    """One array per resource class, in a stable order."""
    classes: OrderedDict[str, list[PlannedJob]] = OrderedDict()
    for job in sorted(jobs, key=lambda j: (j.resources.resource_class, j.idx)):
        classes.setdefault(job.resources.class_name, []).append(job)
    return classes


def phase(config) -> str | None:
    """The ``+phase=`` option the sweep was composed with."""
    return OmegaConf.select(config, "hydra.runtime.choices.phase", default=None)


def describe(planned: list[PlannedJob], header: str) -> str:
    """The dry-run table: every job with its state and resources, then one line per array and the totals
    (secret values of overrides redacted: the table goes to the console and the launch log)."""
    from telepathy.results import redact

    rows = [("#", "state", "gpus", "cpus", "mem", "time", "est GB", "GPU-h", "run", "overrides")]
    for j in planned:
        r = j.resources
        state = {"queue": "queue", "skipped": "skip", "active": "active", "duplicate": "dup", "shared": "share"}[
            j.state
        ]
        rows.append(
            (
                str(j.idx),
                state,
                str(r.gpus),
                str(r.cpus),
                f"{r.mem_gb}G",
                f"{r.timeout_min}m",
                "/".join(f"{g:.1f}" for g in r.device_gb),
                f"{r.gpu_hours:.1f}",
                Path(j.run_dir).name,
                " ".join(redact(_filter(j.overrides))),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    lines = [header]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    classes = group(j for j in planned if j.state == "queue")
    for name, jobs in classes.items():
        r = jobs[0].resources
        lines.append(
            f"array {name}: {len(jobs)} jobs, --gpus-per-node={r.gpus} --cpus-per-task={r.cpus} "
            f"--mem={r.mem_gb}G --time={r.timeout_min}, up to "
            f"{sum(j.resources.gpu_hours for j in jobs):.1f} GPU-hours"
        )
    n_queue = sum(j.state == "queue" for j in planned)
    total = sum(j.resources.gpu_hours for j in planned if j.state == "queue")
    lines.append(
        f"total: {n_queue} to run in {len(classes)} arrays, "
        f"{sum(j.state == 'skipped' for j in planned)} skipped (completed), "
        f"{sum(j.state == 'active' for j in planned)} still queued/running, "
        f"{sum(j.state == 'duplicate' for j in planned)} duplicates, "
        f"{sum(j.state == 'shared' for j in planned)} shared (deterministic, computed once); "
        f"up to {total:.1f} GPU-hours (GPUs x time limit)"
    )
    return "\n".join(lines)


def read_manifest(path: Path) -> dict:
    """The manifest at ``path`` (a sweep's ``jobs.json``); when it is damaged, its copy
    ``.jobs.json.bak`` with a warning naming the damaged file. ManifestError (one line: file,
    line, why) when neither can be read."""
    import logging

    from telepathy.fsutil import read_json

    path = Path(path)
    problems = []
    for candidate in (path, path.with_name(MANIFEST_COPY)):
        try:
            manifest = read_json(candidate, error=ManifestError)
        except FileNotFoundError:
            continue
        except (OSError, ManifestError) as err:
            problems.append(str(err) if isinstance(err, ManifestError) else f"{candidate}: {err}")
            continue
        if not isinstance(manifest, dict) or not isinstance(manifest.get("jobs", []), list):
            problems.append(f"{candidate}: not a launch manifest (no list of jobs)")
            continue
        if problems:
            logging.getLogger("telepathy").warning("%s; read its copy %s", problems[0], candidate.name)
        return manifest
    if not problems:
        raise FileNotFoundError(str(path))
    raise ManifestError(f"{'; '.join(problems)} (no readable copy)")


def _write(sweep_dir: Path, manifest: dict) -> Path:
    """Write the manifest and then its copy, each atomically (secrets redacted by the writer)."""
    from telepathy.results import write_json

    path = sweep_dir / MANIFEST
    write_json(path, manifest)
    write_json(sweep_dir / MANIFEST_COPY, manifest)
    return path


def _manifest(sweep_dir: Path, phase_name: str | None, launcher: str) -> dict:
    """This sweep's manifest so far (a sweeper that launches in batches has one for the whole sweep)."""
    path = sweep_dir / MANIFEST
    if path.exists() or (sweep_dir / MANIFEST_COPY).exists():
        return read_manifest(path)
    return {
        "schema_version": MANIFEST_VERSION,
        "phase": phase_name,
        "launcher": launcher,
        "sweep_dir": str(sweep_dir),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arrays": [],
        "jobs": [],
    }


def record_intent(
    sweep_dir: Path, name: str, label: str, tasks: list[list[PlannedJob]], phase_name: str | None, launcher: str
) -> None:
    """Record, before its ``sbatch``, an array about to be submitted as job name ``name``: task k
    runs ``tasks[k]`` (one run, or a pack of several). ``write_manifest`` drops it once the array
    is recorded; if the launcher dies first, ``status`` finds the array by its name."""
    manifest = _manifest(sweep_dir, phase_name, launcher)
    manifest.setdefault("intents", []).append(
        {
            "name": name,
            "class": label,
            "created_at": time.time(),
            "tasks": [[_entry(j) for j in members] for members in tasks],
        }
    )
    _write(sweep_dir, manifest)


def _entry(j: PlannedJob) -> dict:
    return {
        "idx": j.idx,
        "state": "queued" if j.state == "queue" else j.state,
        "reason": j.reason,
        "kind": j.kind,
        "run_dir": j.run_dir,
        "overrides": j.overrides,
        "shares": j.shares,
        "slurm_job_id": j.slurm_job_id,
        "resources": {**j.resources.to_dict(), "class": j.resources.class_name},
    }


def write_manifest(
    sweep_dir: Path,
    planned: list[PlannedJob],
    arrays: list[dict],
    phase_name: str | None,
    launcher: str,
    done_intent: str | None = None,
) -> Path:
    """Add this launch's arrays and jobs to ``<sweep_dir>/jobs.json`` (atomic write, then its copy);
    ``done_intent``: the job name of the array now recorded, whose intent is dropped."""
    manifest = _manifest(sweep_dir, phase_name, launcher)
    manifest["arrays"] += arrays
    manifest["jobs"] += [_entry(j) for j in planned]
    if done_intent is not None:
        manifest["intents"] = [i for i in manifest.get("intents", []) if i.get("name") != done_intent]
    return _write(sweep_dir, manifest)


def intent_jobs(intent: dict, found: dict[str, str]) -> list[dict]:
    """The manifest entries of an intent's array, given ``found`` = {job id: state} of the jobs
    SLURM knows under the intent's name (``<array>_<task>``, ``<array>_[0-3,5]`` for pending
    tasks sacct lists together, or a plain id: an array of one task is one job): every run of
    every task found, with its job id."""
    tasks = intent.get("tasks") or []
    out = []
    for job_id, state in found.items():
        array, _, task = job_id.partition("_")
        for k in expand_tasks(task, len(tasks)):
            for entry in tasks[k]:
                out.append(
                    {
                        **entry,
                        "slurm_job_id": f"{array}_{k}" if task else job_id,  # one task: submitit's plain job
                        "reason": f"queued by a launch that stopped during its sbatch ({intent.get('name')}, {state})",
                    }
                )
    return sorted(out, key=lambda e: (e["slurm_job_id"], e.get("idx", 0)))


def expand_tasks(task: str, n_tasks: int) -> list[int]:
    """Array task indices of a job id's task part: ``3`` → [3], ``[0-2,5]`` → [0, 1, 2, 5],
    empty (the whole array) → every task; only those below ``n_tasks``."""
    if not task:
        return list(range(n_tasks))
    out = []
    for part in task.strip("[]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += range(int(lo), int(hi or lo) + 1)
    return [k for k in out if k < n_tasks]


# --- launching safely: one launch per output root, one sweep dir per launch ---------------

LAUNCH_LOCK = ".launch.lock"


def launch_lock(output_dir: Path):
    """Plan-then-submit under an exclusive lock on ``<output_dir>/.launch.lock``.

    Two launches of the same sweep at once would both plan before either submits and
    queue every job twice. Under the lock the second one plans after the first has
    submitted and recorded its jobs, so it finds them queued (``active``) and skips them.
    """
    from telepathy.fsutil import file_lock

    return file_lock(
        Path(output_dir) / LAUNCH_LOCK,
        waiting_message=f"another launch into {output_dir} is submitting; waiting for it to finish",
    )


def check_sweep_dir(sweep_dir: Path, written_by_this_launch: bool) -> None:
    """Refuse a sweep dir another launch already wrote a manifest into (two launches in the same instant)."""
    if (Path(sweep_dir) / MANIFEST).exists() and not written_by_this_launch:
        raise LaunchError(
            f"sweep dir {sweep_dir} already holds another launch's {MANIFEST}; "
            f"nothing was submitted: launch again (the new launch gets a new dir)"
        )


def partial_launch_error(
    err: BaseException, failed: str, n_failed: int, arrays: list[dict], manifest: Path, output_dir
) -> LaunchError:
    """One line for an ``sbatch`` that failed after earlier arrays of the launch were queued."""
    first = next(
        (line.strip() for line in str(err).splitlines() if "error" in line.lower()),
        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
    )
    queued = sum(a["n_jobs"] for a in arrays)
    ids = " ".join(str(a["job_id"]) for a in arrays)
    done = (
        (
            f"{queued} jobs in {len(arrays)} arrays ({ids}) were queued before it and are recorded in {manifest} "
            f"(`python -m telepathy status {output_dir}` shows them, a relaunch leaves them alone; "
            f"`scancel {ids}` cancels them)"
        )
        if arrays
        else "nothing was queued"
    )
    return LaunchError(f"sbatch failed for array {failed} ({n_failed} jobs): {first}; {done}")
