"""The paper from one command: all six phases on the SLURM cluster of SLURM_CONF, chained by SLURM
dependencies, then one job that turns the stored records into the paper's tables and figures.

    export SLURM_CONF="$(bash scripts/slurm/up.sh)"
    make paper SCALE=demo                  # = python scripts/paper.py --scale demo
    python scripts/paper.py --scale demo [--outputs DIR] [--out DIR] [--slice] [--dry-run] [OVERRIDE ...]
    python scripts/paper.py tables --scale demo [--outputs DIR] [--out DIR]    # what the last job runs

What the launch does, in order (each step is a command a researcher could type):

1. predicts every job and each phase's wall time (``python -m telepathy plan`` with the scale's cluster
   config, calibrated from the records of the last published run, ``--calibrate-from``) into
   ``<outputs>/paper/plan/plan.json``; only the first launch into ``<outputs>`` does, so the prediction
   stays the one made before the run;
2. queues P1, P3, P5, P2 and P6 in that order, the planner's (``train.py -m +phase=<scale>/<phase>
   hydra/launcher=slurm cluster=<the scale's>``): P1 first, so the runs it shares with P3 and P6 (same
   config, same run dir) are its jobs, which the later launches find queued and leave alone;
3. queues P4 (``python -m benchmarks.latency -m +phase=<scale>/p4_latency ...``) with
   ``--dependency=afterok:<P1's bridge jobs of P4's task>``, so that ``bridge_checkpoint=auto`` finds
   their checkpoints, and ``--kill-on-invalid-dep=yes``: if one of them fails, P4's jobs end instead of
   waiting forever, and a relaunch queues them again;
4. queues the tables job (``scripts/paper.py tables``) with ``--dependency=afterany:<every job of
   <outputs> still queued or running>``: it copies each run's records (result.json, predictions.jsonl;
   no checkpoints, features or telemetry) into ``<out>/records`` and writes the tables and figures from
   them alone (``python -m telepathy paper``);
5. returns, with the job ids and the commands that follow them.

Relaunching the same command after a fault queues only what is missing: completed runs and latency cells
are skipped and runs still queued or running are left alone (the launcher's rules, docs/cluster.md §5);
a tables job still pending gets the new jobs added to its dependency instead of a second one, and none is
queued when ``<out>/records`` already holds every finished record. ``--dry-run`` plans and shows every
phase's jobs (``+dry_run=true``) and queues nothing. ``--slice`` narrows every phase to one slice (one
task and one seed, four latency cells: ``SLICE``) to check the chain in minutes; overrides after the
options (``budget=tiny``, ``trainer.max_steps=10``) go to every phase. At ``budget=tiny`` add
``sender.layer=1``: the demo phases read the sender at block 15 (SmolLM2) or 9 (Gemma), which a 2-layer
model does not have (``--slice budget=tiny sender.layer=1``: about 6 minutes here, tests/test_paper.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# scale -> its cluster config (conf/cluster/<name>.yaml) and what the latency phase asks for beside it
SCALES = {
    "demo": {
        "cluster": "paper_demo",
        # P4 times latencies: each cell gets the whole node (8 of its 8 CPUs) and both cores
        "latency": ["cluster.cpus_per_gpu=8", "cluster.env.OMP_NUM_THREADS=2"],
    },
}
# queued in the planner's order (cluster.phases priorities: SLURM starts jobs in the order they were queued), P1
# first: the runs it shares with P3 and P6 are its jobs
TRAIN_PHASES = ["p1_seeds", "p3_baselines", "p5_xsum", "p2_probes", "p6_ablations"]
LATENCY_PHASE = "p4_latency"
PHASES = ["p1_seeds", "p2_probes", "p3_baselines", "p4_latency", "p5_xsum", "p6_ablations"]
# --slice: one slice of every phase, to check the chain (the rehearsal's, with a 2 x 2 latency grid)
SLICE = {
    "p1_seeds": ["task=sst2", "seed=42"],
    "p2_probes": ["task=sst2"],
    "p3_baselines": ["task=sst2"],
    "p4_latency": ["compression=4,8", "eval.batch_size=1,4"],
    "p5_xsum": ["seed=42"],
    "p6_ablations": ["seed=42"],
}
TABLES_JOB = "paper-tables"
STATE = "paper"  # <outputs>/paper: the plan, the launches, the tables job's log


def fail(message: str, code: int = 2) -> SystemExit:
    print(f"paper: {message}", file=sys.stderr, flush=True)
    return SystemExit(code)


def phase_name(scale: str, phase: str) -> str:
    return f"{scale}/{phase}"


def env_for(outputs: Path) -> dict:
    """The environment of every launch, and (SLURM passes the submitting shell's on) of every job."""
    return {**os.environ, "TELEPATHY_OUTPUTS": str(outputs), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-4:]
    if tail:
        print("  " + "\n  ".join(tail), flush=True)
    if check and proc.returncode != 0:
        raise fail(f"`{' '.join(cmd[1:4])} ...` exited {proc.returncode}:\n{proc.stderr[-3000:]}", proc.returncode)
    return proc


def manifests_of(outputs: Path, phase: str, before: set[str]) -> list[dict]:
    """The manifests of ``phase`` written by the launch that just ran (not in ``before``)."""
    from telepathy.cluster.status import manifests

    return [m for m in manifests(outputs) if m.get("phase") == phase and m["path"] not in before]


def manifest_paths(outputs: Path) -> set[str]:
    from telepathy.cluster.status import manifests

    return {m["path"] for m in manifests(outputs)}


def queued_ids(found: list[dict]) -> list[str]:
    """SLURM job ids this launch queued (array tasks as ``<array>_<task>``), in order."""
    ids = [str(j["slurm_job_id"]) for m in found for j in m.get("jobs", []) if j.get("state") == "queued"]
    return list(dict.fromkeys(i for i in ids if i and i != "None"))


def bridge_jobs_for(outputs: Path, p1: str, tasks: set[str]) -> list[str]:
    """The SLURM jobs, still queued or running, of P1's bridge runs of ``tasks``: what P4 waits for."""
    from telepathy.cluster.status import alive_runs, manifests

    alive = alive_runs(outputs)
    wanted = set()
    for manifest in manifests(outputs):
        if manifest.get("phase") != p1:
            continue
        for job in manifest.get("jobs", []):
            given = dict(o.lstrip("+").split("=", 1) for o in job.get("overrides", []) if "=" in o)
            if given.get("method") == "bridge" and given.get("task") in tasks and job["run_dir"] in alive:
                wanted.add(alive[job["run_dir"]])
    return sorted(wanted)


def latency_tasks(scale: str, narrow: list[str], overrides: list[str]) -> set[str]:
    """The task(s) P4 times (its phase's, or a narrowed one), composed as benchmarks.latency would."""
    from hydra import compose, initialize_config_dir

    from telepathy.config import CONF_DIR, register_resolvers

    given = [o for o in [*overrides, *narrow] if o.split("=", 1)[0] == "task"]
    if given:
        return set(given[-1].split("=", 1)[1].split(","))
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("latency", [f"+phase={phase_name(scale, LATENCY_PHASE)}"])
    return {str(cfg.task.name)}


# ----------------------------------------------------------------------------------- the tables job
def tables_state(outputs: Path) -> dict:
    from telepathy.fsutil import read_json

    path = outputs / STATE / "launches.json"
    return read_json(path) if path.exists() else {"launches": []}


def squeue_state(job_id: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    state = out.stdout.strip().splitlines()
    return state[0] if out.returncode == 0 and state else None


def newest_record(outputs: Path) -> float:
    """mtime of the newest result.json of the plan (runs and latency cells): 0 when there is none."""
    from telepathy.results import RESULT_FILE

    found = [*outputs.glob(f"runs/*/{RESULT_FILE}"), *outputs.glob(f"benchmarks/latency/**/{RESULT_FILE}")]
    return max((p.stat().st_mtime for p in found), default=0.0)


def tables_up_to_date(outputs: Path, out: Path) -> bool:
    from telepathy.analysis.paper import INDEX

    index = out / "records" / INDEX
    return index.exists() and index.stat().st_mtime >= newest_record(outputs)


def queue_tables(scale: str, outputs: Path, out: Path, after: list[str], env: dict, previous: str | None) -> str:
    """The tables job: afterany on ``after``. A still-pending one (``previous``) gets the new dependency
    instead of a second job; one already running or gone is followed by a new one."""
    dependency = f"afterany:{':'.join(after)}" if after else ""
    if previous and squeue_state(previous) == "PENDING":
        if dependency:
            run(["scontrol", "update", f"JobId={previous}", f"Dependency={dependency}"], env)
        return previous
    log_dir = outputs / STATE
    log_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        shlex.quote(c)
        for c in [
            sys.executable,
            "scripts/paper.py",
            "tables",
            "--scale",
            scale,
            "--outputs",
            str(outputs),
            "--out",
            str(out),
        ]
    )
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={TABLES_JOB}-{scale}",
        f"--chdir={REPO}",
        f"--output={log_dir}/tables-%j.log",
        "--cpus-per-task=1",
        "--mem=4G",
        "--time=60",
        *([f"--dependency={dependency}"] if dependency else []),
        f"--wrap={command}",
    ]
    proc = run(cmd, env)
    return proc.stdout.strip().split(";")[0]


# ----------------------------------------------------------------------------------- launch
def launch(args, overrides: list[str]) -> int:
    from telepathy.results import write_json

    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        raise fail('needs a SLURM cluster: export SLURM_CONF="$(bash scripts/slurm/up.sh)" (sbatch on PATH)')
    spec = SCALES[args.scale]
    outputs, out = Path(args.outputs).resolve(), Path(args.out).resolve()
    env = env_for(outputs)
    base = [f"cluster={spec['cluster']}", *overrides]
    narrow = {p: SLICE[p] if args.slice else [] for p in PHASES}
    t0 = time.time()

    plan_dir = outputs / STATE / "plan"
    if not (plan_dir / "plan.json").exists() and not args.dry_run:
        predict(args, base, narrow, plan_dir)

    launched: dict[str, list[str]] = {}
    dry = ["+dry_run=true"] if args.dry_run else []
    for phase in TRAIN_PHASES:
        name = phase_name(args.scale, phase)
        before = manifest_paths(outputs)
        run(
            [sys.executable, "train.py", "-m", f"+phase={name}", "hydra/launcher=slurm", *base, *narrow[phase], *dry],
            env,
        )
        launched[name] = [] if args.dry_run else queued_ids(manifests_of(outputs, name, before))

    p1, p4 = phase_name(args.scale, "p1_seeds"), phase_name(args.scale, LATENCY_PHASE)
    waits = bridge_jobs_for(outputs, p1, latency_tasks(args.scale, narrow[LATENCY_PHASE], overrides))
    dependency = (
        [
            f"++cluster.additional_parameters.dependency=afterok:{':'.join(waits)}",
            "++cluster.additional_parameters.kill-on-invalid-dep=yes",
        ]
        if waits
        else []
    )
    before = manifest_paths(outputs)
    run(
        [
            sys.executable,
            "-m",
            "benchmarks.latency",
            "-m",
            f"+phase={p4}",
            "hydra/launcher=slurm",
            *base,
            *spec["latency"],
            *narrow[LATENCY_PHASE],
            *dependency,
            *dry,
        ],
        env,
    )
    launched[p4] = [] if args.dry_run else queued_ids(manifests_of(outputs, p4, before))
    if args.dry_run:
        print(f"paper: dry run, nothing queued; P4 would wait for {waits or 'nothing (P1 bridges done)'}")
        return 0

    from telepathy.cluster.status import alive_runs

    alive = sorted(set(alive_runs(outputs).values()), key=_job_order)
    state = tables_state(outputs)
    previous = state["launches"][-1]["tables_job"] if state["launches"] else None
    new_jobs = sum(len(v) for v in launched.values())
    if not alive and not new_jobs and tables_up_to_date(outputs, out):
        tables = None
        print(f"paper: nothing to run; {out} already holds every finished record")
    else:
        tables = queue_tables(args.scale, outputs, out, alive, env, previous)
    state["launches"].append(
        {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
            "command": " ".join(shlex.quote(a) for a in ["python", "scripts/paper.py", *sys.argv[1:]]),
            "scale": args.scale,
            "slice": bool(args.slice),
            "overrides": overrides,
            "queued": launched,
            "p4_waits_for": waits,
            "tables_job": tables,
            "tables_after": alive,
            "load_average": list(os.getloadavg()),
        }
    )
    write_json(outputs / STATE / "launches.json", state)
    counts = ", ".join(f"{k.split('/')[-1]} {len(v)}" for k, v in launched.items())
    print(
        f"paper: queued {new_jobs} jobs ({counts}) in {time.time() - t0:.0f}s; "
        f"P4 waits for {len(waits)} P1 bridge jobs ({' '.join(waits) or 'none: they are done'}); "
        + (f"tables job {tables} after {len(alive)} jobs writes {out}" if tables else "no tables job")
        + f"\nfollow: python -m telepathy status {outputs}\n"
        f"        squeue   (tables log: {outputs / STATE}/tables-<job>.log)\n"
        f"relaunch after a fault: the same command (it queues only what is missing)",
        flush=True,
    )
    return 0


def _job_order(job_id: str) -> tuple:
    array, _, task = job_id.partition("_")
    return (int(array) if array.isdigit() else 0, int(task) if task.isdigit() else -1, job_id)


def predict(args, base: list[str], narrow: dict[str, list[str]], plan_dir: Path) -> None:
    """The planner's prediction of this run (every phase, scheduled on the scale's job slots)."""
    from telepathy.cluster import plan

    calibrate = [Path(p) for p in args.calibrate_from if Path(p).is_dir()]
    phases = ",".join(phase_name(args.scale, p) for p in PHASES)
    prediction = plan.run(
        [f"+phase={phases}", *base],
        plan_dir,
        calibrate or None,
        {phase_name(args.scale, p): v for p, v in narrow.items() if v},
    )
    ends = ", ".join(f"{p.split('/')[-1]} {v / 60:.0f} min" for p, v in prediction["phase_end_s"].items())
    print(
        f"paper: predicted {prediction['makespan_s'] / 60:.0f} min for {len(prediction['jobs'])} jobs "
        f"(phases end at: {ends}); calibrated from {', '.join(map(str, calibrate)) or 'defaults only'}; "
        f"{plan_dir / plan.PLAN_FILE}",
        flush=True,
    )


# ----------------------------------------------------------------------------------- the tables job
def machine() -> dict:
    import platform

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 1) if pages else None,
        "os": platform.platform(terse=True),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def collect(scale: str, outputs: Path, out: Path) -> Path:
    """Copy the records of every run and latency cell the scale's launches listed (their manifests) into
    ``<out>/records`` (replacing what was there), with ``index.json`` (phase -> records, the launches, the
    machine, the load) and the prediction ``plan.json``. Only what the tables read: result.json and
    predictions.jsonl; no checkpoints, features, logs or telemetry dumps."""
    from telepathy.analysis.paper import INDEX, LATENCY, LATENCY_PATHS, PLAN, RECORD_FILES, RUNS
    from telepathy.cluster.status import manifests
    from telepathy.fsutil import read_json
    from telepathy.results import RESULT_FILE, write_json

    final, tmp = out / "records", out / "records.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    phases: dict[str, list[str]] = {}
    revisions: set[str] = set()
    for manifest in manifests(outputs):  # oldest first: the phases in launch order
        name = manifest.get("phase") or ""
        if not name.startswith(f"{scale}/"):
            continue
        for job in manifest.get("jobs", []):
            src = Path(job["run_dir"])
            if job.get("kind") == "benchmark":
                rel = f"{LATENCY}/{src.name}"
                files = ["summary.json", *(f"{path}/{RESULT_FILE}" for path in LATENCY_PATHS)]
            else:
                rel = f"{RUNS}/{src.name}"
                files = list(RECORD_FILES)
            listed = phases.setdefault(name, [])
            if rel in listed:
                continue
            listed.append(rel)
            for f in files:
                if (src / f).exists():
                    (tmp / rel / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / f, tmp / rel / f)
                    if f.endswith(RESULT_FILE):
                        env = read_json(src / f).get("env") or {}
                        if env.get("git_rev"):
                            revisions.add(str(env["git_rev"])[:10] + ("+dirty" if env.get("git_dirty") else ""))
    if not phases:
        raise fail(f"no launch of scale {scale} under {outputs} (no sweeps/*/jobs.json of phase {scale}/...)")
    tmp.mkdir(parents=True, exist_ok=True)
    plan_file = outputs / STATE / "plan" / PLAN
    if plan_file.exists():
        shutil.copyfile(plan_file, tmp / PLAN)
    launches = tables_state(outputs)["launches"]
    write_json(
        tmp / INDEX,
        {
            "scale": scale,
            "slice": any(launch.get("slice") for launch in launches),
            "cluster": SCALES[scale]["cluster"],
            "launches": [
                {k: launch.get(k) for k in ("started_at", "command", "overrides", "load_average", "tables_job")}
                for launch in launches
            ],
            "phases": phases,
            "revisions": sorted(revisions),
            "machine": machine(),
            "collected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average_at_collect": list(os.getloadavg()),
        },
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def tables(args) -> int:
    """The last job: collect the records, then build the page from them alone."""
    from telepathy.analysis import paper

    outputs, out = Path(args.outputs).resolve(), Path(args.out).resolve()
    records = collect(args.scale, outputs, out)
    built = paper.build(records, out, args.n_boot)
    counts = ", ".join(f"{k} {v['records']}" for k, v in built["phases"].items())
    size = sum(p.stat().st_size for p in records.rglob("*") if p.is_file()) / 2**20
    print(f"paper: {out / 'README.md'} from {records} ({counts} records, {size:.1f} MB)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    sub = argv[:1] == ["tables"]
    parser = argparse.ArgumentParser(
        prog="python scripts/paper.py" + (" tables" if sub else ""),
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default="demo", help="which scale of the phases (conf/phase/<scale>/)"
    )
    parser.add_argument("--outputs", help="the run store of this plan (default: outputs/paper-<scale>)")
    parser.add_argument("--out", help="where the page, its figures and records/ go (default: docs/paper)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the paired comparisons")
    if not sub:
        parser.add_argument(
            "--slice", action="store_true", help="one slice of every phase (SLICE): checks the chain in minutes"
        )
        parser.add_argument("--dry-run", action="store_true", help="plan and show every phase's jobs; queue nothing")
        parser.add_argument(
            "--calibrate-from",
            action="append",
            default=None,
            metavar="RUNS_DIR",
            help="records that calibrate the prediction (default: docs/paper/records/runs, the last published run)",
        )
        parser.add_argument(
            "overrides", nargs="*", help="config overrides for every phase (budget=tiny, trainer.max_steps=10, ...)"
        )
    args = parser.parse_args(argv[1:] if sub else argv)
    args.outputs = args.outputs or str(REPO / "outputs" / f"paper-{args.scale}")
    args.out = args.out or str(REPO / "docs" / "paper")
    if sub:
        return tables(args)
    args.calibrate_from = args.calibrate_from or [str(REPO / "docs" / "paper" / "records" / "runs")]
    return launch(args, args.overrides)


if __name__ == "__main__":
    raise SystemExit(main())
