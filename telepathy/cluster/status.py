"""Where every run of every launched phase stands.

    python -m telepathy status outputs/            # table per phase / sweep
    python -m telepathy status outputs/ --json     # one JSON object per run

Reads the ``jobs.json`` manifests the launcher writes into each sweep dir
(``<outputs>/sweeps/``, and ``<outputs>/benchmarks/`` for the latency phase), the
``result.json`` of each run dir, and (when the SLURM client tools are there)
``squeue`` for live jobs and ``sacct`` for jobs that ended without a result.
A run's state is one of

* ``completed``  result.json says so;
* ``skipped``    the launch found it completed and did not queue it;
* ``failed``     result.json says failed (error type shown), or its SLURM job
                 ended (cancelled, timed out, node failure, ...) without a result;
* ``running``    its SLURM job is running, or (outside SLURM) its process is alive:
                 result.json says running and its heartbeat is fresh;
* ``pending``    its SLURM job waits in the queue (or was requeued after preemption);
* ``interrupted`` it stopped before the end and relaunching resumes it from its last
                 checkpoint: preempted, its SLURM job ended (cancelled, time limit,
                 node failure) mid-run, or ``(stale)``: its process is gone or its
                 heartbeat (``<run dir>/heartbeat.json``, telepathy/runlock.py) is old;
* ``cancelled``  its SLURM job was cancelled before the run wrote anything (a pending array
                 task cancelled with its array, too); a relaunch queues it again;
* ``malformed``  its result.json is damaged on disk (the detail names the file and line);
                 a relaunch redoes it from its last checkpoint, keeping its attempts;
* ``unknown``    no result and no scheduler information.

Runs under ``<outputs>/runs`` that no manifest mentions (single local runs) are
listed at the end. A launch killed during an ``sbatch`` left that array as an intent in its
manifest (``sweep.record_intent``): its jobs are found in squeue/sacct by their job name.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from telepathy.cluster.sweep import (
    BENCHMARK_DONE,
    MANIFEST,
    MANIFEST_COPY,
    ManifestError,
    expand_tasks,
    intent_jobs,
    read_manifest,
)
from telepathy.fsutil import iter_jsonl, read_json
from telepathy.results import LOG_FILE, RESULT_FILE, load_result, read_result

log = logging.getLogger("telepathy")

LIVE = {
    "PENDING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",
    "STOPPED": "running",
    "RESIZING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
}
OOM_STATE = "OUT_OF_MEMORY"  # sacct: the job (or a step) was killed for exceeding its memory


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def squeue_states() -> dict[str, str] | None:
    """``{job_id: state}`` of every job SLURM still holds (array tasks as ``<array>_<task>``);
    None when squeue is not available."""
    out = _run(["squeue", "-h", "-r", "-o", "%i|%T"])
    if out is None:
        return None
    states = {}
    for line in out.splitlines():
        if "|" in line:
            job_id, state = line.strip().split("|", 1)
            states[job_id] = state
    return states


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Final SLURM state of finished jobs (the latest record of a requeued job). Array tasks that
    never started are listed by sacct together (``123_[0-2]``, or ``123`` just after a scancel),
    so each array is asked for by its own id too and those lines are spread over its tasks."""
    if not job_ids:
        return {}
    bases = {str(i).split("_")[0] for i in job_ids}
    out = _run(["sacct", "-n", "-P", "-o", "JobID,State", "-j", ",".join(sorted(set(map(str, job_ids)) | bases))])
    states: dict[str, str] = {}
    whole: dict[str, str] = {}  # array id -> state of a line that stands for all its unstarted tasks
    for line in (out or "").splitlines():
        if "|" in line:
            job_id, state = line.strip().split("|", 1)
            state = state.split()[0]  # "CANCELLED by 0" → CANCELLED
            if "." in job_id:  # a step (123.batch): only its out-of-memory kill matters (the job may say FAILED)
                base = job_id.split(".")[0]
                if state == OOM_STATE and base in states:
                    states[base] = OOM_STATE
                continue
            array, _, task = job_id.partition("_")
            if task.startswith("["):
                for k in expand_tasks(task, 1 << 20):
                    states.setdefault(f"{array}_{k}", state)
            elif not task:
                whole[array] = state
                states[job_id] = state
            else:
                states[job_id] = state
    for job_id in map(str, job_ids):
        base = job_id.split("_")[0]
        if job_id not in states and base in whole:
            states[job_id] = whole[base]
    return states


# every state sacct accounts: without --state, a window (-S/-E) leaves out jobs that never started
SACCT_STATES = "PD,R,RQ,RS,RV,S,CA,CD,DL,F,NF,OOM,PR,TO,BF"


def jobs_named(name: str, since: float | None) -> dict[str, str] | None:
    """``{job id: state}`` of the jobs SLURM knows under job name ``name`` (queued, running, or
    ended since ``since``); None when squeue is not available."""
    live = _run(["squeue", "-h", "-r", f"--name={name}", "-o", "%i|%T"])
    if live is None:
        return None
    found = dict(line.strip().split("|", 1) for line in live.splitlines() if "|" in line)
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((since or time.time()) - 3600))
    acct = _run(
        ["sacct", "-a", "-n", "-P", "-X", f"--name={name}", "-S", start, "-E", "now"]
        + [f"--state={SACCT_STATES}", "-o", "JobID,State"]
    )
    for line in (acct or "").splitlines():
        if "|" in line:
            job_id, state = line.strip().split("|", 1)
            found.setdefault(job_id, state.split()[0])
    return found


def _recovered(manifest: dict) -> list[dict]:
    """The jobs of arrays whose sbatch was under way when their launch stopped (``intents``), as
    SLURM knows them by job name; without squeue, each run once with state ``intent``."""
    jobs = []
    for intent in manifest.get("intents") or []:
        found = jobs_named(str(intent.get("name")), intent.get("created_at"))
        if found is None:
            why = "its sbatch was under way when the launch stopped; no squeue here to say whether it was queued"
            jobs += [{**e, "state": "intent", "reason": why} for task in intent.get("tasks") or [] for e in task]
        else:
            jobs += intent_jobs(intent, found)
    return jobs


def manifests(output_dir: Path) -> list[dict]:
    """Every launch manifest under ``<output_dir>/sweeps`` (and ``/benchmarks``), oldest first, with
    the jobs of any array its launch queued without recording (``_recovered``). A manifest that
    cannot be read (nor its copy) is kept, without jobs, with ``damaged``: the one line saying why."""
    found = []
    dirs = {
        path.parent
        for pattern in ("sweeps/**/", "benchmarks/**/")
        for name in (MANIFEST, MANIFEST_COPY)
        for path in Path(output_dir).glob(pattern + name)
    }
    for folder in sorted(dirs):
        path = folder / MANIFEST
        try:
            manifest = read_manifest(path)
        except ManifestError as err:
            log.warning("%s", err)
            manifest = {"jobs": [], "damaged": str(err), "sweep_dir": str(folder)}
        manifest["path"] = str(path)
        manifest["jobs"] = [*manifest.get("jobs", []), *_recovered(manifest)]
        found.append(manifest)
    return sorted(found, key=lambda m: (m.get("created_at", ""), m["path"]))


def alive_runs(output_dir: Path) -> dict[str, str]:
    """``{run_dir: slurm_job_id}`` of runs whose latest submitted job SLURM still holds."""
    live = squeue_states()
    if not live:
        return {}
    latest: dict[str, str] = {}
    for manifest in manifests(output_dir):
        for job in manifest.get("jobs", []):
            if job.get("slurm_job_id"):
                latest[job["run_dir"]] = str(job["slurm_job_id"])
    return {run_dir: job_id for run_dir, job_id in latest.items() if job_id in live}


def run_state(job: dict, live: dict[str, str] | None, finished: dict[str, str]) -> tuple[str, str]:
    """(state, detail) of one manifest entry."""
    if job.get("state") == "duplicate":
        return "skipped", job.get("reason", "duplicate of another job of the sweep")
    if job.get("state") == "intent":
        return "unknown", job.get("reason", "")
    if job.get("kind") == "benchmark" and (Path(job["run_dir"]) / BENCHMARK_DONE).exists():
        if job.get("state") == "skipped":
            return "skipped", "already completed at launch"
        return "completed", "benchmark job finished"
    read = load_result(job["run_dir"])
    record = read.record or {}
    status = record.get("status")
    job_id = job.get("slurm_job_id")
    if status == "completed":
        metrics = record.get("metrics") or {}
        shown = {k: v for k, v in metrics.items() if k in ("accuracy", "macro_f1", "rouge1", "rougeL")}
        detail = " ".join(f"{k}={v:.4f}" for k, v in shown.items() if isinstance(v, (int, float)))
        if job.get("state") == "skipped":
            return "skipped", "already completed at launch"
        return "completed", detail
    if status == "failed":
        error = record.get("error") or {}
        oom = " (out of memory)" if error.get("oom") else ""
        return "failed", f"{error.get('type', '?')}: {str(error.get('message', ''))[:80]}{oom}"
    if job_id and live is not None and job_id in live:
        earlier = " (queued by an earlier launch)" if job.get("state") == "active" else ""
        return LIVE.get(live[job_id], "running"), live[job_id].lower() + _progress(job["run_dir"]) + earlier
    if read.problem is not None:
        return "malformed", f"{read.problem}; a relaunch redoes it from its last checkpoint, keeping its attempts"
    if job.get("kind") == "benchmark" and finished.get(job_id) == "COMPLETED":
        return "completed", "benchmark job finished"
    if job_id and finished.get(job_id) == OOM_STATE:
        record_oom(job["run_dir"], record, job_id)
        return "failed", f"SLURM killed job {job_id} for memory ({OOM_STATE}) (out of memory)"
    if status in ("running", "interrupted"):
        return _started_state(
            job["run_dir"], status, finished.get(job_id) if job_id else None, gone=bool(job_id) and live is not None
        )
    if job_id and finished.get(job_id) == "CANCELLED":
        return (
            "cancelled",
            f"SLURM job {job_id} was cancelled before the run wrote anything; a relaunch queues it again",
        )
    if job_id and job_id in finished and finished[job_id] not in LIVE:
        return "failed", f"SLURM job ended {finished[job_id]} without a result"
    if job_id and finished.get(job_id) in LIVE:
        return LIVE[finished[job_id]], finished[job_id].lower()
    return "unknown", "no result.json and no scheduler record"


def _started_state(run_dir: str, status: str, ended: str | None, gone: bool) -> tuple[str, str]:
    """A run whose result.json says running/interrupted: still running, or interrupted and resumable.

    ``ended`` is the final SLURM state of its job (if it ended), ``gone`` says its job is
    in neither squeue nor sacct; without either, the heartbeat decides.
    """
    from telepathy import runlock

    steps = sorted(Path(run_dir).glob("checkpoints/step_*"))
    resume = (
        f"relaunch resumes from step {int(steps[-1].name.split('_')[1])}"
        if steps
        else "relaunch starts it again (no checkpoint yet)"
    )
    beat = runlock.read_heartbeat(Path(run_dir))
    stale = runlock.staleness(beat)
    if stale:
        return "interrupted", f"(stale) {stale}; {resume}"
    if ended and ended not in LIVE:
        return "interrupted", f"SLURM job ended {ended} mid-run; {resume}"
    if status == "interrupted":
        return "interrupted", f"preempted; {resume}"
    if gone:
        return "interrupted", f"its SLURM job is gone; {resume}"
    # a local run (no SLURM job): its step and ETA from log.jsonl, as for a SLURM job that squeue lists
    if beat:
        age = time.time() - float(beat.get("time", 0))
        return "running", f"heartbeat {age:.0f}s ago on {beat.get('host')}{_progress(run_dir)}"
    return "running", "result.json says running" + _progress(run_dir)


def progress(run_dir: Path) -> dict | None:
    """``{"step", "max_steps", "eta_s"}`` of a training run from its log.jsonl (None before the first step)."""
    path = Path(run_dir) / LOG_FILE
    try:
        rows = [row for _, row, why in iter_jsonl(path) if why is None and isinstance(row, dict)][-200:]
    except OSError:
        return None
    rows = [row for row in rows if "examples_per_s" in row and "step" in row]
    if not rows:
        return None
    step = int(rows[-1]["step"])
    recent = rows[-20:]
    # seconds per step from the logged throughput; batch size cancels if it is constant
    per_step = [1.0 / r["examples_per_s"] for r in recent if r.get("examples_per_s")]
    try:
        trainer = (read_result(Path(run_dir)) or {})["config"]["trainer"]
        max_steps, batch = int(trainer["max_steps"]), int(trainer["batch_size"]) * int(trainer.get("grad_accum", 1))
    except (OSError, KeyError, ValueError, TypeError):
        return {"step": step, "max_steps": None, "eta_s": None}
    eta = max(0, max_steps - step) * batch * sum(per_step) / len(per_step) if per_step else None
    return {"step": step, "max_steps": max_steps, "eta_s": eta}


def _progress(run_dir: str) -> str:
    """`` step 120/2000, ETA 0:35:10`` of a training run from its log.jsonl ('' before the first step)."""
    p = progress(Path(run_dir))
    if not p:
        return ""
    eta = (
        f", ETA {int(p['eta_s']) // 3600}:{int(p['eta_s']) % 3600 // 60:02d}:{int(p['eta_s']) % 60:02d}"
        if p["eta_s"] is not None
        else ""
    )
    return f" step {p['step']}/{p['max_steps'] or '?'}{eta}"


def record_oom(run_dir: str, record: dict, job_id: str) -> None:
    """A run SLURM killed for memory never wrote its own failure: record it as failed, out of memory."""
    from telepathy.results import now, write_json

    if not record or record.get("status") not in ("running", "interrupted"):
        return
    write_json(
        Path(run_dir) / RESULT_FILE,
        {
            **record,
            "status": "failed",
            "finished_at": now(),
            "error": {"type": "SlurmOutOfMemory", "message": f"SLURM job {job_id} ended {OOM_STATE}", "oom": True},
        },
    )


def collect(output_dir: Path) -> list[dict]:
    """One row per run per launch: phase, sweep, run, state, detail, SLURM job id, resources."""
    output_dir = Path(output_dir)
    found = manifests(output_dir)
    live = squeue_states()
    ids = [str(j["slurm_job_id"]) for m in found for j in m.get("jobs", []) if j.get("slurm_job_id")]
    finished = sacct_states([i for i in ids if live is None or i not in live]) if ids else {}
    rows, seen = [], set()
    for manifest in found:
        if manifest.get("damaged"):  # its jobs are not known: one row says which manifest and why
            rows.append(
                {
                    "phase": "-",
                    "sweep": manifest.get("sweep_dir"),
                    "launcher": None,
                    "run": MANIFEST,
                    "run_dir": manifest.get("sweep_dir"),
                    "state": "unknown",
                    "detail": f"{manifest['damaged']}; its jobs are not known (squeue lists queued ones)",
                    "slurm_job_id": None,
                    "resources": None,
                }
            )
        for job in manifest.get("jobs", []):
            state, detail = run_state(job, live, finished)
            seen.add(job["run_dir"])
            rows.append(
                {
                    "phase": manifest.get("phase") or "-",
                    "sweep": manifest.get("sweep_dir"),
                    "launcher": manifest.get("launcher"),
                    "run": Path(job["run_dir"]).name,
                    "run_dir": job["run_dir"],
                    "state": state,
                    "detail": detail,
                    "oom": "(out of memory)" in detail,
                    "slurm_job_id": job.get("slurm_job_id"),
                    "resources": job.get("resources"),
                }
            )
    for run_dir in sorted((output_dir / "runs").glob("*")):
        if str(run_dir.resolve()) in seen or not run_dir.is_dir():
            continue
        state, detail = run_state({"run_dir": str(run_dir.resolve())}, None, {})
        rows.append(
            {
                "phase": "-",
                "sweep": None,
                "launcher": None,
                "run": run_dir.name,
                "run_dir": str(run_dir.resolve()),
                "state": state,
                "detail": detail,
                "slurm_job_id": None,
                "resources": None,
            }
        )
    return rows


def render(rows: list[dict]) -> str:
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["phase"], row["sweep"]), []).append(row)
    for (phase, sweep), members in groups.items():
        counts: dict[str, int] = {}
        for row in members:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        title = f"phase {phase} — sweep {sweep}" if sweep else "runs launched without a sweep manifest"
        lines.append(f"{title}  ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
        width = max(len(r["run"]) for r in members)
        for row in members:
            gpus = f"{row['resources']['gpus']}gpu" if row.get("resources") else ""
            lines.append(
                f"  {row['state']:<9} {str(row['slurm_job_id'] or '-'):<12} {gpus:<5} "
                f"{row['run']:<{width}}  {row['detail']}"
            )
        lines.append("")
    return "\n".join(lines) if lines else "no runs found"


# --- a multirun ends with one table of its jobs -------------------------------------------------


class MultirunSummary(Callback):
    """``hydra.callbacks.multirun_summary``: after ``-m``, one table (state and headline metrics per run).

    Hydra's own launcher and the default one (conf/hydra/launcher/default.yaml) run the jobs in
    this process, so ``on_job_end`` sees every run dir and every job that failed; the telepathy
    launchers (local/SLURM through submitit) list theirs in the sweep's ``jobs.json``. The rows
    and the table are ``python -m telepathy status``'s. A failed job is a row (state ``failed``,
    its error); when a job run by this sweep failed, the sweep exits 1 after the table.
    """

    def __init__(self):
        self.run_dirs: list[str] = []
        self.errors: dict[str, str] = {}  # run dir -> the error of a job that failed in this process

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        run_dir = str(config.hydra.runtime.output_dir)
        self.run_dirs.append(run_dir)
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value
            self.errors[run_dir] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    def on_multirun_end(self, config, **kwargs) -> None:
        from telepathy.cluster.sweep import phase

        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = [{"run_dir": d} for d in self.run_dirs]
        manifest = sweep_dir / MANIFEST
        launcher = None
        if not jobs and manifest.exists():
            try:
                written = read_manifest(manifest)
            except ManifestError as err:  # the summary is a courtesy: say why there is none
                log.warning("no multirun summary: %s", err)
                written = {}
            jobs, launcher = written.get("jobs", []), written.get("launcher")
        # jobs queued on SLURM (the launcher returns once they are queued): ask squeue where they stand
        live = squeue_states() if any(job.get("slurm_job_id") for job in jobs) else None
        rows = []
        for job in jobs:
            state, detail = run_state(job, live, {})
            if job["run_dir"] in self.errors and state != "failed":  # it failed before its record said so
                state, detail = "failed", self.errors[job["run_dir"]][:120]
            rows.append(
                {
                    "phase": phase(config) or "-",
                    "sweep": str(sweep_dir),
                    "run": Path(job["run_dir"]).name,
                    "run_dir": job["run_dir"],
                    "state": state,
                    "detail": detail,
                    "slurm_job_id": job.get("slurm_job_id"),
                    "resources": job.get("resources"),
                }
            )
        if rows:
            log.info("multirun summary (%d jobs):\n%s", len(rows), render(rows).rstrip())
        # jobs this sweep ran and waited for (in this process, or hydra/launcher=local): a failure is the exit status
        ran_here = bool(self.run_dirs) or launcher == "local"
        failed = [r for r in rows if r["state"] == "failed" and (r["run_dir"] in self.errors or launcher == "local")]
        if ran_here and failed:
            log.error(
                "%d of %d jobs failed (rows above; each run's result.json has the traceback)", len(failed), len(rows)
            )
            raise SystemExit(1)


def _plan_report(output_dir: Path, plan_arg: str, rows: list[dict], phase: str | None, as_json: bool) -> int:
    from telepathy.cluster import checklist

    path = checklist.latest_plan(output_dir) if plan_arg == "latest" else Path(plan_arg)
    if path is None or not path.exists():
        print(
            f"error: --plan={plan_arg} is not allowed; allowed: a plan.json (python -m telepathy plan writes "
            f"<outputs>/plans/<time>/plan.json)",
            file=sys.stderr,
        )
        return 2
    try:
        plan = read_json(path)
    except ValueError as err:  # not UTF-8 / not JSON: the file and line, in one line
        print(
            f"error: --plan={plan_arg}: {err}; allowed: a plan.json written by python -m telepathy plan",
            file=sys.stderr,
        )
        return 2
    report = checklist.compare(plan, rows, phase)
    print(json.dumps(report, default=str) if as_json else f"plan {path}\n" + checklist.render(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telepathy status", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", default="outputs", help="paths.output_dir (default: outputs)")
    parser.add_argument("--phase", help="only this phase (e.g. p1_seeds)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument(
        "--plan",
        nargs="?",
        const="latest",
        metavar="PLAN_JSON",
        help="compare with a plan (python -m telepathy plan; default: the latest under "
        "<outputs>/plans): wall time and GPU utilisation per phase, OOMs, predicted vs "
        "actual, success metrics",
    )
    args = parser.parse_args(argv)
    rows = collect(Path(args.output_dir))
    if args.plan:
        return _plan_report(Path(args.output_dir), args.plan, rows, args.phase, args.json)
    if args.phase:
        rows = [r for r in rows if r["phase"] == args.phase]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
