"""Close the planner's loop on a SLURM cluster: run rehearsal A, calibrate from it, predict rehearsal B, run B.

    export SLURM_CONF=...                      # the local test cluster: bash scripts/slurm/up.sh
    python -m benchmarks.plan_rehearsal --out /tmp/rehearsal --device cpu --gpus 8

Why: a cost model is only worth its calibration. This launches rehearsal A (``--a``, a tiny
phase slice) through ``train.py -m hydra/launcher=slurm``, waits for it, then asks
``python -m telepathy plan`` for the makespan of a *different* rehearsal B (``--b``: other
tasks, seeds and step counts) calibrated from A's result.json files only, launches B and
measures its makespan from SLURM's accounting (first job start to last job end, ``sacct``).
Prints and writes ``<out>/result.json``: predicted vs measured, and the error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from telepathy.cluster.sweep import MANIFEST, read_manifest
from telepathy.results import RESULT_FILE, read_result, write_json

REPO = Path(__file__).resolve().parent.parent

COMMON = ["+phase=p1_seeds", "budget=tiny"]
SMALL = ["cluster=test_node", "cluster.pack_max=1"]  # conf/cluster/test_node.yaml: one CPU per job
A = ["task=trec,sst2", "seed=42"]
B = ["task=agnews,trec", "seed=123", "trainer.max_steps=12"]


def _env(outputs: Path) -> dict:
    return {**os.environ, "TELEPATHY_OUTPUTS": str(outputs), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def launch(outputs: Path, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", *COMMON, *SMALL, *overrides]
    subprocess.run(cmd, cwd=REPO, env=_env(outputs), check=True, capture_output=True, text=True)
    manifest = sorted(outputs.glob(f"sweeps/*/{MANIFEST}"))[-1]
    return read_manifest(manifest)["jobs"]


def wait(jobs: list[dict], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = [(read_result(Path(j["run_dir"])) or {}).get("status") for j in jobs]
        if all(s in ("completed", "failed") for s in states):
            if states.count("failed"):
                raise SystemExit(f"{states.count('failed')} runs failed: {[j['run_dir'] for j in jobs]}")
            return
        time.sleep(2)
    raise SystemExit(f"runs did not finish in {timeout_s:.0f}s")


def sacct_makespan(jobs: list[dict]) -> float:
    """First start to last end of the jobs, from SLURM accounting (includes start-up, not queueing)."""
    ids = ",".join(sorted({str(j["slurm_job_id"]) for j in jobs}))
    for _ in range(30):  # the database may lag the end of the last job by a few seconds
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", ids, "-o", "Start,End"], capture_output=True, text=True, check=True
        ).stdout
        rows = [line.split("|") for line in out.splitlines() if "|" in line]
        if rows and all(r[1] not in ("Unknown", "") for r in rows):
            starts = [datetime.fromisoformat(r[0]).timestamp() for r in rows]
            ends = [datetime.fromisoformat(r[1]).timestamp() for r in rows]
            return max(ends) - min(starts)
        time.sleep(2)
    raise SystemExit(f"sacct has no end times for {ids}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="cluster.device the planner assumes")
    parser.add_argument(
        "--gpus", type=int, default=8, help="cluster.gpus the planner assumes (the local test node has 8 fake GPUs)"
    )
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--a", nargs="+", default=A, metavar="OVERRIDE", help=f"rehearsal A (default: {' '.join(A)})")
    parser.add_argument("--b", nargs="+", default=B, metavar="OVERRIDE", help=f"rehearsal B (default: {' '.join(B)})")
    args = parser.parse_args(argv)
    a_out, b_out = args.out / "a", args.out / "b"
    a_jobs = launch(a_out, args.a)
    wait(a_jobs, args.timeout)
    a_span = sacct_makespan(a_jobs)
    a_load = os.getloadavg()[1]  # 5-minute load average at the end: other work on the machine skews the ratios
    plan_cmd = [
        sys.executable,
        "-m",
        "telepathy",
        "plan",
        *COMMON,
        *args.b,
        *SMALL,
        f"cluster.device={args.device}",
        f"cluster.gpus={args.gpus}",
        "--calibrate-from",
        str(a_out / "runs"),
        "--out",
        str(args.out / "plan"),
        "--json",
    ]
    plan = json.loads(
        subprocess.run(plan_cmd, cwd=REPO, env=_env(b_out), check=True, capture_output=True, text=True).stdout
    )
    b_jobs = launch(b_out, args.b)
    wait(b_jobs, args.timeout)
    measured = sacct_makespan(b_jobs)
    b_load = os.getloadavg()[1]
    result = {
        "method": "plan_rehearsal",
        "a": {"overrides": COMMON + args.a, "jobs": len(a_jobs), "makespan_s": a_span, "load_avg_5min": a_load},
        "b": {
            "overrides": COMMON + args.b,
            "jobs": len(b_jobs),
            "predicted_makespan_s": plan["makespan_s"],
            "measured_makespan_s": round(measured, 1),
            "error": round(plan["makespan_s"] / measured - 1, 3),
            "load_avg_5min": b_load,
            "per_job": [{"job": j["job"], "predicted_s": j["predicted_s"]} for j in plan["jobs"]],
        },
        "calibration": plan["calibration"],
    }
    write_json(args.out / RESULT_FILE, result)
    print(
        f"rehearsal A: {len(a_jobs)} jobs in {a_span:.0f} s (calibrates; load average {a_load:.1f})\n"
        f"rehearsal B: {len(b_jobs)} jobs, predicted {plan['makespan_s']:.0f} s, measured {measured:.0f} s "
        f"({result['b']['error']:+.0%}; load average {b_load:.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
