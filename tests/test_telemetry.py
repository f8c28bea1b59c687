"""Telemetry with an injected NVML reader, SLURM OOM recorded, progress/ETA in status, job control.

A real run's host-only telemetry record (no GPU here) is checked in test_train_app.py.
"""

import json
import subprocess
import time

import pytest

from telepathy import telemetry
from telepathy.cluster import control, status


class FakeNvml:
    """Two GPUs whose utilisation and memory rise with each sample."""

    def __init__(self):
        self.n = 0

    def sample(self):
        self.n += 1
        return [
            {"gpu": g, "util_pct": 50.0 + 10 * g + self.n, "mem_mb": 1000.0 * (g + 1) + self.n, "mem_total_mb": 81920.0}
            for g in range(2)
        ]


def test_sampler_with_an_injected_nvml_reader_writes_samples_and_a_summary(tmp_path):
    reader = FakeNvml()
    sampler = telemetry.Sampler(tmp_path, interval_s=0.05, gpu_reader=reader).start()
    time.sleep(0.3)
    summary = sampler.stop()
    assert sampler.stop() is summary  # idempotent: every exit path may call it
    lines = [json.loads(x) for x in (tmp_path / telemetry.TELEMETRY_FILE).read_text().splitlines()]
    assert len(lines) == summary["n_samples"] == reader.n >= 3
    assert summary["gpu_available"] is True
    g0, g1 = summary["gpus"]
    n = reader.n
    assert g0["util_peak_pct"] == 50 + n and g1["util_peak_pct"] == 60 + n
    assert g0["util_mean_pct"] == pytest.approx(50 + (n + 1) / 2)
    assert g1["mem_peak_mb"] == 2000 + n and g1["mem_total_mb"] == 81920
    assert summary["gpu_util_mean_pct"] == pytest.approx((g0["util_mean_pct"] + g1["util_mean_pct"]) / 2)
    assert summary["host"]["rss_peak_mb"] > 10


def test_a_failing_reader_degrades_to_host_figures(tmp_path):
    class Broken:
        def sample(self):
            raise RuntimeError("GPU fell off the bus")

    summary = telemetry.Sampler(tmp_path, 10, gpu_reader=Broken()).stop()
    assert summary["gpu_available"] is False and "fell off the bus" in summary["gpu_unavailable"]
    assert summary["host"]["rss_mean_mb"] > 0


def test_progress_and_eta_from_the_training_log(tmp_path):
    (tmp_path / "result.json").write_text(
        json.dumps({"status": "running", "config": {"trainer": {"max_steps": 100, "batch_size": 8, "grad_accum": 1}}})
    )
    (tmp_path / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "examples_per_s": 4.0}) + "\n" for s in range(1, 41))
    )
    p = status.progress(tmp_path)
    assert p["step"] == 40 and p["max_steps"] == 100
    assert p["eta_s"] == pytest.approx(60 * 8 / 4.0)  # 60 steps left x 2 s per step


def _fake_slurm(monkeypatch, squeue: str, sacct: str):
    def run(cmd):
        return {"squeue": squeue, "sacct": sacct}.get(cmd[0])

    monkeypatch.setattr(status, "_run", run)


def _manifest(tmp_path, jobs, phase="p1_seeds"):
    sweep = tmp_path / "sweeps" / "s1"
    sweep.mkdir(parents=True)
    (sweep / "jobs.json").write_text(
        json.dumps({"phase": phase, "sweep_dir": str(sweep), "created_at": "1", "jobs": jobs})
    )


def test_sacct_out_of_memory_is_recorded_as_oom(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"status": "running", "run_id": "r1"}))
    _manifest(tmp_path, [{"run_dir": str(run_dir), "slurm_job_id": "77_0", "overrides": ["task=sst2"]}])
    # the allocation says FAILED; its batch step was killed for memory
    _fake_slurm(monkeypatch, squeue="", sacct="77_0|FAILED\n77_0.batch|OUT_OF_MEMORY\n77_0.extern|COMPLETED\n")
    (row,) = status.collect(tmp_path)
    assert row["state"] == "failed" and row["oom"] is True
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "failed" and record["error"]["oom"] is True  # recorded in result.json
    (again,) = status.collect(tmp_path)  # and read back from there next time
    assert again["oom"] is True and "out of memory" in again["detail"]


def test_status_shows_step_and_eta_of_a_running_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "r1"
    test_progress_and_eta_from_the_training_log(run_dir.mkdir(parents=True) or run_dir)
    _manifest(tmp_path, [{"run_dir": str(run_dir), "slurm_job_id": "5_1"}])
    _fake_slurm(monkeypatch, squeue="5_1|RUNNING\n", sacct="")
    (row,) = status.collect(tmp_path)
    assert row["state"] == "running" and "step 40/100, ETA 0:02:00" in row["detail"]


def test_control_holds_a_slice_of_a_phase_by_its_manifest_job_ids(tmp_path):
    _manifest(
        tmp_path,
        [
            {"run_dir": "/r/a", "slurm_job_id": "9_0", "overrides": ["task=sst2", "seed=42"]},
            {"run_dir": "/r/b", "slurm_job_id": "9_1", "overrides": ["task=sst2", "seed=123"]},
            {"run_dir": "/r/c", "slurm_job_id": "9_2", "overrides": ["task=trec", "seed=42"]},
            {"run_dir": "/r/d", "slurm_job_id": "9_3", "overrides": ["task=sst2", "seed=456"]},
        ],
    )
    live = {"9_0": "PENDING", "9_1": "RUNNING", "9_2": "PENDING"}  # 9_3 already finished
    jobs = control.select(tmp_path, "p1_seeds", ["task=sst2"], live)
    assert sorted(j["slurm_job_id"] for j in jobs) == ["9_0", "9_1"]
    assert control.select(tmp_path, "p2_probes", [], live) == []
    calls = []
    done = control.act("hold", jobs, run=lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert calls == [["scontrol", "hold", "9_0,9_1"]] and done == ["scontrol hold 9_0,9_1"]
    control.act("cancel", jobs, run=lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert calls[-1] == ["scancel", "9_0", "9_1"]
    with pytest.raises(RuntimeError, match="scontrol release 9_0,9_1 failed: no such job"):
        control.act("release", jobs, run=lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "no such job"))


def test_bad_telemetry_and_packing_values_are_rejected_before_anything_runs():
    from helpers import compose
    from telepathy.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"cluster.telemetry_interval_s=-1 is not allowed; allowed: a number in \[0"):
        validate(compose("cluster.telemetry_interval_s=-1"))
    with pytest.raises(ConfigError, match=r"cluster.pack_max=0 is not allowed; allowed: an integer in \[1"):
        validate(compose("cluster.pack_max=0"))
