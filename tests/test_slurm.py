"""Sweeps on a real SLURM cluster through ``python train.py -m ... hydra/launcher=slurm``.

Needs the one-node test cluster (``bash scripts/slurm/up.sh`` and ``export SLURM_CONF=...``);
CI brings it up. Every sweep of this module is launched once, up front, so that the
jobs run side by side; each test then waits for the runs it checks:

* a 3-job sweep lands in one array and completes (and ``python -m telepathy status`` says so);
* a phase with a 1-GPU and a 2-GPU job submits two arrays with the right GPU counts;
* a job signalled mid-training (SIGUSR2, as SLURM does before preemption/time limit)
  checkpoints, is requeued, resumes in the same run dir and ends with the same
  losses and metrics as an uninterrupted run of the same config;
* two small runs packed into one 1-GPU job both complete, each with its own result.json;
* relaunching the finished sweep queues zero jobs;
* a sweep with an invalid job queues nothing.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import TINY, needs_data, run_train
from telepathy.cluster import status


def _slurm_missing() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM client tools (sinfo) are not installed: run `bash scripts/slurm/up.sh`"
    if not os.environ.get("SLURM_CONF"):
        return 'SLURM_CONF is unset: run `export SLURM_CONF="$(bash scripts/slurm/up.sh)"`'
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"no SLURM controller answers for SLURM_CONF={os.environ['SLURM_CONF']}: {proc.stderr.strip()}"
    return None


SKIP_REASON = _slurm_missing()
pytestmark = [pytest.mark.slurm, needs_data, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

# small requests so that every job of the module fits the test node at once
SMALL = ["cluster=test_node", "cluster.pack_max=1"]  # one run per job here; packing: test_packing.py
SWEEP3 = ["-m", "hydra/launcher=slurm", *TINY, *SMALL, "task=sst2,agnews,trec", "trainer.max_steps=2"]
# tiny models are planned as built (resources.built_shape): on a 1.05 GB "GPU", compression 8 fits one
# (0.62 GB estimated) and compression 1 (M = 128 soft tokens: 1.16 GB; receiver side 0.98 GB) needs two
GPU_SPLIT = [
    "-m",
    "hydra/launcher=slurm",
    *TINY,
    *SMALL,
    "task=trec",
    "trainer.max_steps=2",
    "compression=8,1",
    "cluster.gpu_mem_gb=1.05",
]
# two tiny runs packed into one 1-GPU job (telepathy/cluster/packing.py)
PACK = ["-m", "hydra/launcher=slurm", *TINY, *SMALL, "cluster.pack_max=2", "task=sst2,trec", "trainer.max_steps=2"]
PREEMPT_STEPS = 30
PREEMPT = [
    *TINY,
    *SMALL,
    "task=sst2",
    f"trainer.max_steps={PREEMPT_STEPS}",
    "trainer.checkpoint_every=1000",
    "trainer.eval_every=0",
]


def _manifest(out: Path) -> dict:
    found = sorted(out.glob("sweeps/*/jobs.json"))
    assert found, f"no jobs.json under {out}/sweeps"
    return json.loads(found[-1].read_text())


def _result(run_dir) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _diagnostics(out: Path) -> str:
    queue = subprocess.run(["squeue", "-o", "%i %T %R"], capture_output=True, text=True).stdout
    logs = []
    for path in sorted(out.glob("sweeps/*/.submitit/*/*.out"))[-4:]:
        logs.append(f"--- {path}\n{path.read_text()[-2000:]}")
    return f"squeue:\n{queue}\n" + "\n".join(logs)


def _wait_finished(out: Path, run_dirs, timeout_s=240) -> list[dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        records = [_result(r) for r in run_dirs]
        if all(r and r.get("status") in ("completed", "failed") for r in records):
            return records
        time.sleep(1)
    pytest.fail(f"runs did not finish in {timeout_s}s: {run_dirs}\n{_diagnostics(out)}")


def _job_ids() -> set[str]:
    """Every job SLURM knows about: queued, running or in the accounting database."""
    ids = set((status.squeue_states() or {}).keys())
    acct = subprocess.run(
        ["sacct", "-a", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1hours"], capture_output=True, text=True
    ).stdout
    return ids | {line.strip() for line in acct.splitlines() if line.strip()}


def _log_rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Launch every sweep of the module; signal the preemption job mid-training."""
    base = tmp_path_factory.mktemp("slurm")
    out = {name: base / name for name in ("sweep3", "split", "preempt", "pack")}
    # the interrupted run and its uninterrupted twin: same config, different output roots
    interrupted, reference = out["preempt"] / "interrupted", out["preempt"] / "reference"
    t0 = time.time()
    run_train(
        "-m", "hydra/launcher=slurm", *PREEMPT, f"paths.output_dir={interrupted},{reference}", outputs=out["preempt"]
    )
    job = next(j for j in _manifest(out["preempt"])["jobs"] if j["run_dir"].startswith(str(interrupted)))
    deadline = time.time() + 180
    while len(_log_rows(job["run_dir"])) < 3:
        if time.time() > deadline:
            pytest.fail(f"training never reached step 3\n{_diagnostics(out['preempt'])}")
        time.sleep(0.2)
    signalled_at = len(_log_rows(job["run_dir"]))
    subprocess.run(["scancel", "--signal=USR2", job["slurm_job_id"]], check=True)

    launches = {"preempt": {"interrupted": job, "signalled_at": signalled_at}}
    for name, args in (("sweep3", SWEEP3), ("split", GPU_SPLIT), ("pack", PACK)):
        proc = run_train(*args, outputs=out[name])
        launches[name] = {"stdout": proc.stdout, "manifest": _manifest(out[name])}
    launches["launch_s"] = time.time() - t0
    return out, launches


def test_three_job_sweep_runs_as_one_array(launched):
    out, launches = launched
    manifest = launches["sweep3"]["manifest"]
    assert len(manifest["arrays"]) == 1 and manifest["arrays"][0]["n_jobs"] == 3
    jobs = manifest["jobs"]
    array_id = manifest["arrays"][0]["job_id"]
    assert sorted(j["slurm_job_id"] for j in jobs) == [f"{array_id}_{i}" for i in range(3)]
    records = _wait_finished(out["sweep3"], [j["run_dir"] for j in jobs])
    assert [r["status"] for r in records] == ["completed"] * 3, [r.get("error") for r in records]
    assert sorted(r["task"] for r in records) == ["agnews", "sst2", "trec"]
    assert all(r["env"]["slurm_job_id"] and r["resources"]["gpus"] == 1 for r in records)
    rows = status.collect(out["sweep3"])
    assert sorted((r["slurm_job_id"], r["state"]) for r in rows) == [(f"{array_id}_{i}", "completed") for i in range(3)]


def test_one_gpu_and_two_gpu_jobs_land_in_separate_arrays(launched):
    out, launches = launched
    manifest = launches["split"]["manifest"]
    arrays = {a["resources"]["gpus"]: a for a in manifest["arrays"]}
    assert sorted(arrays) == [1, 2] and arrays[1]["job_id"] != arrays[2]["job_id"]
    by_gpus = {j["resources"]["gpus"]: j for j in manifest["jobs"]}
    compression = {
        gpus: int(next(o.split("=", 1)[1] for o in job["overrides"] if o.startswith("compression=")))
        for gpus, job in by_gpus.items()
    }
    assert compression == {1: 8, 2: 1}
    for gpus, job in by_gpus.items():
        # submitit submits a one-task array as a plain job: "<id>" rather than "<id>_0"
        assert job["slurm_job_id"].split("_")[0] == arrays[gpus]["job_id"]
    records = _wait_finished(out["split"], [j["run_dir"] for j in by_gpus.values()])
    assert [r["status"] for r in records] == ["completed"] * 2, [r.get("error") for r in records]
    for gpus, record in zip(by_gpus, records):
        assert record["resources"]["gpus"] == gpus
    assert records[1]["resources"]["placement"] == {"sender": "cuda:0", "receiver": "cuda:1"}
    # what SLURM actually allocated
    for gpus, job in by_gpus.items():
        tres = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", job["slurm_job_id"], "-o", "AllocTRES"], capture_output=True, text=True
        ).stdout
        assert f"gres/gpu={gpus}" in tres, tres


def test_preempted_job_resumes_and_matches_an_uninterrupted_run(launched):
    out, launches = launched
    job = launches["preempt"]["interrupted"]
    signalled_at = launches["preempt"]["signalled_at"]
    assert 3 <= signalled_at < PREEMPT_STEPS, "signal must arrive mid-training"
    manifest = _manifest(out["preempt"])
    twin = next(j for j in manifest["jobs"] if j["run_dir"] != job["run_dir"])
    assert Path(twin["run_dir"]).name == Path(job["run_dir"]).name  # same config → same run id
    resumed, uninterrupted = _wait_finished(out["preempt"], [job["run_dir"], twin["run_dir"]], timeout_s=300)
    assert resumed["status"] == "completed", resumed.get("error")
    assert uninterrupted["status"] == "completed", uninterrupted.get("error")
    assert resumed["training"]["resumed_from"] is not None and resumed["training"]["resumed_from"] >= signalled_at
    assert uninterrupted["training"]["resumed_from"] is None
    assert resumed["env"]["slurm_restart_count"] not in (None, "0")  # same SLURM job, requeued
    steps = [r for r in _log_rows(job["run_dir"]) if "loss" in r]
    ref_steps = [r for r in _log_rows(twin["run_dir"]) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, PREEMPT_STEPS + 1))
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref_steps]
    assert resumed["metrics"] == uninterrupted["metrics"]


def test_relaunching_a_finished_sweep_queues_nothing(launched):
    out, launches = launched
    first = launches["sweep3"]["manifest"]
    _wait_finished(out["sweep3"], [j["run_dir"] for j in first["jobs"]])
    before = _job_ids()
    proc = run_train(*SWEEP3, outputs=out["sweep3"])
    assert "queued 0 jobs in 0 arrays, skipped 3" in proc.stdout
    manifest = _manifest(out["sweep3"])
    assert manifest["sweep_dir"] != first["sweep_dir"]
    assert [j["state"] for j in manifest["jobs"]] == ["skipped"] * 3
    assert manifest["arrays"] == []
    assert not _job_ids() - before  # nothing new queued (older jobs may leave sacct's one-hour window)


def test_bad_config_queues_nothing(launched, tmp_path):
    before = _job_ids()
    proc = run_train(
        "-m", "hydra/launcher=slurm", *TINY, *SMALL, "task=sst2", "sender.layer=1,99", outputs=tmp_path, check=False
    )
    assert proc.returncode != 0
    assert "1 of 2 jobs are invalid; nothing was submitted" in proc.stderr
    assert "sender.layer=99 is out of range" in proc.stderr
    assert not list(tmp_path.glob("sweeps/*/jobs.json"))
    assert not _job_ids() - before  # nothing new queued (older jobs may leave sacct's one-hour window)


def test_two_small_runs_packed_on_one_gpu_both_complete(launched):
    out, launches = launched
    manifest = launches["pack"]["manifest"]
    (array,) = manifest["arrays"]
    assert array["class"].startswith("pack-") and array["packs"] == 1 and array["n_jobs"] == 2
    assert array["resources"]["gpus"] == 1
    ids = {j["slurm_job_id"] for j in manifest["jobs"]}
    assert len(ids) == 1  # one SLURM job, one GPU, two runs
    records = _wait_finished(out["pack"], [j["run_dir"] for j in manifest["jobs"]], timeout_s=300)
    assert [r["status"] for r in records] == ["completed"] * 2, [r.get("error") for r in records]
    assert {r["env"]["slurm_job_id"] for r in records} == {ids.pop().split("_")[0]}
    assert sorted(r["task"] for r in records) == ["sst2", "trec"]
