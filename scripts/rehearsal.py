"""Rehearse the whole plan on the local SLURM cluster: all six phases, each narrowed to a slice,
at ``budget=tiny`` (2-layer random models of the paper's families), then one aggregate.

    export SLURM_CONF="$(bash scripts/slurm/up.sh)"
    python scripts/rehearsal.py [--out DIR] [--timeout 900]      # or: make rehearsal

Every phase is launched with the commands a researcher types (``train.py -m +phase=pN
hydra/launcher=slurm``), narrowed from the command line to one task and one seed, plus
small per-job CPU requests so that the jobs share the one test node (host RAM needs no override:
each job asks for its estimate, a few GB for budget=tiny's 2-layer models). P1, P2, P3,
P5 and P6 are queued together; the latency phase (P4) goes last, so that its
``bridge_checkpoint=auto`` finds P1's trained bridge in the run store. Runs that two phases
share (P1's bridge is also P3's and P6's medium pair) are queued once. At the end
``python -m telepathy aggregate`` writes one summary.json / summary.md over every run.
Exit status 0 only if every run of every phase completed and the summary covers them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = ["budget=tiny", "hydra/launcher=slurm"]
# one CPU per job (conf/cluster/test_node.yaml), so that the rehearsal's jobs share the one test node at once
SMALL = ["cluster=test_node", "cluster.timeout_min=20"]
# phase → the slice it runs (command-line values narrow the phase's sweep)
TRAIN_PHASES = {
    "p1_seeds": ["task=sst2", "seed=42"],
    "p2_probes": ["task=sst2"],
    "p3_baselines": ["task=sst2"],
    "p5_xsum": ["seed=42", "task.max_target_tokens=8"],
    "p6_ablations": ["seed=42"],
}
LATENCY = ["compression=8", "eval.batch_size=4", "iterations=2", "warmup_batches=1"]
DONE = {"completed", "skipped", "failed", "unknown"}


def run(cmd: list[str], env: dict) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    print("  " + "\n  ".join(tail), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"rehearsal: `{' '.join(cmd)}` exited {proc.returncode}\n{proc.stderr[-3000:]}")


def wait(out: Path, timeout_s: float) -> list[dict]:
    """Poll ``python -m telepathy status`` until no run of any launched phase is queued or running."""
    from telepathy.cluster import status

    deadline = time.time() + timeout_s
    while True:
        rows = status.collect(out)
        busy = [r for r in rows if r["state"] not in DONE]
        if not busy:
            return rows
        if time.time() > deadline:
            raise SystemExit(
                f"rehearsal: {len(busy)} runs still queued/running after {timeout_s:.0f}s: {[r['run'] for r in busy]}"
            )
        time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="outputs folder (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for each wave of jobs")
    args = parser.parse_args(argv)
    if not os.environ.get("SLURM_CONF"):
        print('rehearsal: SLURM_CONF is unset: export SLURM_CONF="$(bash scripts/slurm/up.sh)"', file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="telepathy-rehearsal-")).resolve()
    env = {**os.environ, "TELEPATHY_OUTPUTS": str(out), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    for phase, narrow in TRAIN_PHASES.items():
        run([sys.executable, "train.py", "-m", f"+phase={phase}", *TINY, *SMALL, *narrow], env)
    wait(out, args.timeout)
    run([sys.executable, "-m", "benchmarks.latency", "-m", "+phase=p4_latency", *TINY, *SMALL, *LATENCY], env)
    rows = wait(out, args.timeout)
    bad = [
        f"{r['phase']}: {r['run']} {r['state']} {r['detail']}"
        for r in rows
        if r["state"] not in ("completed", "skipped")
    ]
    phases = sorted({r["phase"] for r in rows})
    summary = out / "summary"
    run(
        [
            sys.executable,
            "-m",
            "telepathy",
            "aggregate",
            str(out / "runs"),
            str(out / "benchmarks" / "latency"),
            "--out",
            str(summary),
            "--n-boot",
            "200",
        ],
        env,
    )
    print(
        f"rehearsal: {len(rows)} runs of phases {', '.join(phases)} in {time.time() - t0:.0f}s; summary in {summary}",
        flush=True,
    )
    bad += missing_from_summary(json.loads((summary / "summary.json").read_text()))
    if bad or len(phases) != 6:
        print("rehearsal FAILED:\n  " + "\n  ".join(bad or [f"phases launched: {phases}"]), file=sys.stderr)
        return 1
    return 0


# what the summary must hold: every method of the six phases, and both tasks' kinds (XSum, latency)
EXPECTED_METHODS = {
    "bridge",
    "zeroshot",
    "linear_probe",
    "text_relay",
    "llmlingua",
    "prompt_tuning",
    "lora",
    "fewshot",
    "latency",
}


def missing_from_summary(summary: dict) -> list[str]:
    """Problems with summary.json: incomplete runs, or a phase's methods/tasks absent from it."""
    rows = summary.get("groups", []) + summary.get("not_in_tables", [])
    methods, tasks = {r.get("method") for r in rows}, {r.get("task") for r in rows}
    problems = [f"summary: incomplete run {r}" for r in summary.get("incomplete", [])]
    problems += [f"summary: no {m} runs" for m in sorted(EXPECTED_METHODS - methods)]
    problems += [f"summary: no {t} runs" for t in ("sst2", "xsum") if t not in tasks]
    return problems


if __name__ == "__main__":
    sys.exit(main())
