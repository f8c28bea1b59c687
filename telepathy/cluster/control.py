"""Job control on a phase: cancel, hold or release a phase, or a slice of it, by name.

    python -m telepathy control hold    outputs/ --phase p6_ablations
    python -m telepathy control release outputs/ --phase p6_ablations --where receiver=mistral7b
    python -m telepathy control cancel  outputs/ --phase p1_seeds --where task=sst2 --dry-run

Why: the plan's monitoring by hand (squeue, scancel, scontrol hold/release) needs job ids;
the launch manifests (``jobs.json``) already map every run of a phase to its SLURM job id,
so a phase or a slice (``--where key=value``: runs whose overrides contain it; several
``--where`` must all match) is addressed by name. Only jobs SLURM still holds are touched.

Cancelled runs stay resumable: ``scancel`` sends SIGTERM first, on which the training loop
finishes its step, writes a checkpoint and records ``interrupted``; relaunching the phase
queues the run again and it resumes from that checkpoint (completed runs are skipped).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from telepathy.cluster.status import manifests, squeue_states

ACTIONS = {"cancel": ["scancel"], "hold": ["scontrol", "hold"], "release": ["scontrol", "release"]}


def select(output_dir: Path, phase: str | None, where: list[str], live: dict[str, str]) -> list[dict]:
    """The manifest entries of ``phase`` matching every ``where`` whose SLURM job is still held.

    A run launched twice counts once, with its latest job id."""
    latest: dict[str, dict] = {}
    for manifest in manifests(output_dir):
        if phase and manifest.get("phase") != phase:
            continue
        for job in manifest.get("jobs", []):
            if job.get("slurm_job_id") and all(w in job.get("overrides", []) for w in where):
                latest[job["run_dir"]] = {**job, "phase": manifest.get("phase")}
    return [j for j in latest.values() if str(j["slurm_job_id"]) in live]


def act(
    action: str,
    jobs: list[dict],
    run: Callable[[list[str]], subprocess.CompletedProcess] | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Run ``scancel`` / ``scontrol hold|release`` on the jobs' ids; return the commands."""
    if action not in ACTIONS:
        raise ValueError(f"action={action!r} is not allowed; allowed: {', '.join(ACTIONS)}")
    ids = sorted({str(j["slurm_job_id"]) for j in jobs})
    if not ids:
        return []
    cmd = [*ACTIONS[action], *ids] if action == "cancel" else [*ACTIONS[action], ",".join(ids)]
    if not dry_run:
        proc = (run or _run)(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return [" ".join(cmd)]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telepathy control", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=sorted(ACTIONS))
    parser.add_argument("output_dir", nargs="?", default="outputs", help="paths.output_dir (default: outputs)")
    parser.add_argument("--phase", help="the phase (e.g. p1_seeds); default: every launched sweep")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs launched with this override (repeat: all must match)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args = parser.parse_args(argv)
    live = squeue_states()
    if live is None:
        print("error: squeue is not available (no SLURM client tools or SLURM_CONF)", file=sys.stderr)
        return 2
    jobs = select(Path(args.output_dir), args.phase, args.where, live)
    if not jobs:
        print(f"no queued or running job matches phase={args.phase or 'any'} where={args.where or '-'}")
        return 0
    for cmd in act(args.action, jobs, dry_run=args.dry_run):
        print(("would run: " if args.dry_run else "ran: ") + cmd)
    for j in jobs:
        print(f"  {j['slurm_job_id']:<12} {Path(j['run_dir']).name}")
    return 0
