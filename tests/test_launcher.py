"""The Telepathy launcher without a cluster: dry runs, resource classes, skipping, validation,
the local launcher, and the status command's reading of manifests and result files."""

import json
import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import TINY, compose, needs_data, run_train
from telepathy.cluster import status
from telepathy.cluster.sweep import PlannedJob, group
from telepathy.config import run_dir
from telepathy.resources import Resources

SLURM_DRY = ["-m", "hydra/launcher=slurm", "+dry_run=true"]


def _run_dirs(outputs: Path, *overrides: str) -> Path:
    return run_dir(compose(*overrides, f"paths.output_dir={outputs}"))


def _fake_result(outputs: Path, status_: str, *overrides: str, **extra) -> Path:
    rdir = _run_dirs(outputs, *overrides)
    rdir.mkdir(parents=True)
    (rdir / "result.json").write_text(json.dumps({"status": status_, **extra}))
    return rdir


def _table(stdout: str) -> dict[str, str]:
    """run name -> state column of a dry-run table."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) > 8 and cells[0].isdigit():
            rows[cells[8]] = cells[1]
    return rows


def test_dry_run_prints_every_job_with_resources_and_submits_nothing(outputs):
    proc = run_train(*SLURM_DRY, "+phase=p6_grid", "task=sst2", "cluster.gpu_mem_gb=36", outputs=outputs)
    out = proc.stdout
    assert "DRY RUN (nothing submitted): 9 jobs of phase p6_grid via slurm" in out
    table = _table(out)
    assert len(table) == 9 and set(table.values()) == {"queue"}
    # the 8B sender with the 7B receiver (2 per device: batch_by_size) is the one pair that needs two 36 GB GPUs
    two_gpu = [line for line in out.splitlines() if "llama31_8b_mistral7b" in line]
    assert two_gpu and two_gpu[0].split()[2] == "2"
    # host RAM is each job's own estimate (cluster.mem_gb_per_gpu: null), so jobs group into one
    # array per (GPUs, CPUs, RAM, time) request: 8 one-GPU jobs in several arrays, the 2-GPU job alone
    arrays = dict(re.findall(r"^array (\S+): (\d+) jobs", out, flags=re.M))
    assert sum(int(n) for name, n in arrays.items() if name.startswith("1gpu-8cpu-")) == 8, arrays
    assert [name for name in arrays if name.startswith("2gpu-")] == ["2gpu-16cpu-39gb-240min"], arrays
    assert "up to 40.0 GPU-hours" in out  # 8 x 1 GPU x 4 h + 1 x 2 GPUs x 4 h
    assert not list(outputs.glob("sweeps/*/jobs.json"))
    assert not list(outputs.glob("sweeps/*/.submitit"))
    assert not (outputs / "runs").exists()


def test_completed_runs_are_skipped_unless_rerun_all(outputs):
    done = _fake_result(outputs, "completed", "task=trec", "seed=1")
    _fake_result(outputs, "failed", "task=trec", "seed=2")
    proc = run_train(*SLURM_DRY, "task=trec", "seed=1,2,3", outputs=outputs)
    table = _table(proc.stdout)
    assert table.pop(done.name) == "skip"
    assert list(table.values()) == ["queue", "queue"]  # failed and missing runs run again
    assert "2 to run in 1 arrays, 1 skipped (completed)" in proc.stdout

    forced = run_train(*SLURM_DRY, "task=trec", "seed=1,2,3", "+rerun=all", outputs=outputs)
    assert set(_table(forced.stdout).values()) == {"queue"}


def test_invalid_jobs_abort_the_whole_launch_with_every_problem(outputs):
    proc = run_train(
        "-m",
        "hydra/launcher=slurm",
        "task=sst2",
        "sender.layer=1,99",
        "cluster.gpu_mem_gb=80,0.001",
        "bridge.placement=primer_soft_prompt,middle",
        outputs=outputs,
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "7 of 8 jobs are invalid; nothing was submitted" in err
    assert "sender.layer=99 is out of range" in err
    assert "bridge.placement='middle' is not allowed" in err  # the method's own checks run too
    assert "does not fit one 0.001 GB GPU (cluster.gpu_mem_gb)" in err
    assert not list(outputs.glob("sweeps/*/jobs.json"))
    assert not list(outputs.glob("sweeps/*/.submitit"))


def test_unknown_option_aborts_before_launch(outputs):
    proc = run_train("-m", "hydra/launcher=slurm", "task=sst2,nope", outputs=outputs, check=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr
    assert not list(outputs.glob("sweeps/*/jobs.json"))


@needs_data
def test_local_launcher_runs_the_sweep_then_skips_it(outputs):
    args = ["-m", "hydra/launcher=local", *TINY, "task=sst2", "trainer.max_steps=2"]
    run_train(*args, outputs=outputs)
    record = json.loads(next((outputs / "runs").glob("*/result.json")).read_text())
    assert record["status"] == "completed"
    assert record["resources"]["gpus"] == 1
    assert record["resources"]["placement"] == {"sender": "cuda:0", "receiver": "cuda:0"}
    manifest = json.loads(next(outputs.glob("sweeps/*/jobs.json")).read_text())
    assert manifest["launcher"] == "local"
    assert [j["state"] for j in manifest["jobs"]] == ["queued"]

    again = run_train(*args, outputs=outputs)
    assert "queued 0 jobs in 0 arrays, skipped 1" in again.stdout
    rows = status.collect(outputs)
    assert [r["state"] for r in rows] == ["completed", "skipped"]


def _job(idx, gpus, run):
    res = Resources(
        gpus=gpus,
        cpus=8 * gpus,
        mem_gb=64 * gpus,
        timeout_min=240,
        placement={"sender": "cuda:0", "receiver": f"cuda:{gpus - 1}"},
        estimate_gb=1.5,
        device_gb=(1.0,) * gpus,
    )
    return PlannedJob(idx=idx, overrides=[f"task={run}"], run_dir=f"/o/runs/{run}", state="queue", resources=res)


def test_jobs_are_grouped_into_one_array_per_resource_class():
    jobs = [_job(0, 2, "a"), _job(1, 1, "b"), _job(2, 2, "c"), _job(3, 1, "d")]
    classes = group(jobs)
    assert list(classes) == ["1gpu-8cpu-64gb-240min", "2gpu-16cpu-128gb-240min"]
    assert [j.idx for j in classes["1gpu-8cpu-64gb-240min"]] == [1, 3]
    assert [j.idx for j in classes["2gpu-16cpu-128gb-240min"]] == [0, 2]


def test_resource_plan_reaches_the_job_as_parseable_overrides():
    overrides = _job(0, 2, "a").job_overrides
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed["resources.gpus"] == 2
    assert parsed["resources.placement.receiver"] == "cuda:1"
    assert parsed["resources.device_gb"] == [1.0, 1.0]
    assert parsed["task"] == "a"


def test_status_reads_manifests_results_and_the_queue(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    runs = {name: out / "runs" / name for name in ["done", "oom", "pending", "live", "gone", "old"]}
    for path in runs.values():
        path.mkdir(parents=True)
    (runs["done"] / "result.json").write_text(json.dumps({"status": "completed", "metrics": {"accuracy": 0.9}}))
    (runs["oom"] / "result.json").write_text(
        json.dumps(
            {"status": "failed", "error": {"type": "OutOfMemoryError", "message": "CUDA out of memory", "oom": True}}
        )
    )
    (runs["live"] / "result.json").write_text(json.dumps({"status": "running"}))
    (runs["gone"] / "result.json").write_text(json.dumps({"status": "interrupted"}))
    (runs["old"] / "result.json").write_text(json.dumps({"status": "completed", "metrics": {}}))
    sweep = out / "sweeps" / "s1"
    sweep.mkdir(parents=True)
    jobs = [
        {"run_dir": str(runs["done"]), "state": "queued", "slurm_job_id": "7_0"},
        {"run_dir": str(runs["oom"]), "state": "queued", "slurm_job_id": "7_1"},
        {"run_dir": str(runs["pending"]), "state": "queued", "slurm_job_id": "7_2"},
        {"run_dir": str(runs["live"]), "state": "queued", "slurm_job_id": "8_0"},
        {"run_dir": str(runs["gone"]), "state": "queued", "slurm_job_id": "8_1"},
        {"run_dir": str(runs["old"]), "state": "skipped", "slurm_job_id": None},
    ]
    (sweep / "jobs.json").write_text(
        json.dumps({"phase": "p1_seeds", "sweep_dir": str(sweep), "jobs": jobs, "created_at": "2026-01-01T00:00:00"})
    )
    monkeypatch.setattr(status, "squeue_states", lambda: {"7_2": "PENDING", "8_0": "RUNNING"})
    monkeypatch.setattr(status, "sacct_states", lambda ids: {"8_1": "CANCELLED"})
    rows = {r["run"]: r for r in status.collect(out)}
    assert {k: r["state"] for k, r in rows.items()} == {
        "done": "completed",
        "oom": "failed",
        "pending": "pending",
        "live": "running",
        "gone": "interrupted",
        "old": "skipped",
    }
    assert "out of memory" in rows["oom"]["detail"]
    assert "CANCELLED" in rows["gone"]["detail"]
    assert rows["pending"]["slurm_job_id"] == "7_2"
    assert all(r["phase"] == "p1_seeds" for r in rows.values())
    assert status.alive_runs(out) == {str(runs["pending"]): "7_2", str(runs["live"]): "8_0"}
    text = status.render(list(rows.values()))
    assert "phase p1_seeds" in text and "7_2" in text


def test_a_failed_job_comes_back_as_a_value_so_the_sweep_goes_on():
    """Hydra's sweeper re-raises a failed job's error when its batch is back (the end-of-sweep table
    was lost with it); the launchers hand a failed job back with its error as its value."""
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.telepathy_launcher.launcher import FailedJob, kept

    error = ValueError("boom")
    failed = JobReturn(overrides=["seed=1"], status=JobStatus.FAILED, _return_value=error)
    back = kept(failed)
    assert isinstance(back, FailedJob) and back.status == JobStatus.FAILED and back.overrides == ["seed=1"]
    assert back.return_value is error  # JobReturn.return_value raises it
    done = JobReturn(status=JobStatus.COMPLETED, _return_value={"accuracy": 1.0})
    assert kept(done) is done


def test_status_shows_step_and_eta_of_a_local_run(tmp_path):
    """Before: a running local run (no SLURM job) showed its heartbeat only, no step or ETA."""
    import os
    import socket
    import time

    run_dir = tmp_path / "out" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    trainer = {"max_steps": 10, "batch_size": 4, "grad_accum": 1}
    (run_dir / "result.json").write_text(json.dumps({"status": "running", "config": {"trainer": trainer}}))
    beat = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "interval_s": 30}
    (run_dir / "heartbeat.json").write_text(json.dumps(beat))
    rows = [{"step": s, "loss": 1.0, "examples_per_s": 4.0} for s in (1, 2, 3)]  # 1 s per step of 4 examples
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = status.collect(tmp_path / "out")
    assert row["state"] == "running" and row["detail"].endswith("step 3/10, ETA 0:00:07"), row
