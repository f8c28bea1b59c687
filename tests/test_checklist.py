"""python -m telepathy status --plan: the plan against what ran, and the five success metrics."""

import json

from telepathy.cluster import checklist, status


def _run(
    root,
    name,
    seed,
    util,
    total_s,
    status_="completed",
    oom=False,
    start="2026-01-01T00:00:00+00:00",
    end="2026-01-01T01:00:00+00:00",
):
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    record = {
        "status": status_,
        "seed": seed,
        "seedless_hash": name.rsplit("-", 1)[0],
        "started_at": start,
        "finished_at": end,
        "timing": {"total_s": total_s},
        "env": {"hostname": "n1"},
        "telemetry": {"gpu_util_mean_pct": util, "gpus": [{"gpu": 0, "util_mean_pct": util}]},
    }
    if oom:
        record["error"] = {"type": "OutOfMemoryError", "oom": True}
    (run_dir / "result.json").write_text(json.dumps(record))
    return str(run_dir)


def _plan(tmp_path, jobs, window_h=24):
    plan = {
        "cluster": {"window_h": window_h},
        "jobs": [
            {
                "job": f"p1: seed={i}",
                "phase": "p1_seeds",
                "run_dir": d,
                "start_s": 0.0,
                "predicted_s": 3630.0,
                "run_s": 3600.0,
            }
            for i, d in enumerate(jobs)
        ],
    }
    path = tmp_path / "plans" / "t" / "plan.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(plan))
    return path


def test_checklist_passes_when_the_plan_ran_as_planned(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(status, "_run", lambda cmd: None)  # no SLURM tools: results only
    dirs = [_run(tmp_path, f"bridge-s{s}", s, 90.0, 3600.0) for s in (42, 123, 456)]
    _plan(tmp_path, dirs)
    assert status.main([str(tmp_path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.count("[PASS]") == 5, out
    assert "p1_seeds        3     3     1.01 h     1.00 h     90%" in out  # planned includes 30 s start-up
    assert "n1:gpu0 90%" in out and "1.00x" in out


def test_checklist_fails_on_oom_low_utilisation_missing_seeds_and_a_lost_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(status, "_run", lambda cmd: None)
    dirs = [
        _run(tmp_path, "bridge-s42", 42, 50.0, 3600.0),
        _run(tmp_path, "bridge-s123", 123, 50.0, 600.0, status_="failed", oom=True),
        str(tmp_path / "runs" / "never-written"),
    ]
    _plan(tmp_path, dirs)
    assert status.main([str(tmp_path), "--plan"]) == 0
    lines = {
        line.split("] ", 1)[1].split(":")[0]: line
        for line in capsys.readouterr().out.splitlines()
        if line.strip().startswith("[")
    }
    assert all(line.strip().startswith("[FAIL]") for line in lines.values()), lines
    assert "1 runs out of memory" in lines["no out-of-memory failure"]  # report.SUCCESS_CHECKS' wording
    assert "2/3 result.json readable" in lines["valid result.json for every run"]
    assert "50.0% over 2 runs" in lines[">80% average GPU utilisation"]


def test_gpu_hours_sum_every_attempt_and_a_run_shared_between_phases_counts_once(tmp_path, capsys, monkeypatch):
    """P1's bridge (preempted after 1 h, resumed for 0.5 h on 2 GPUs) is also P3's and P6's run: its
    3 GPU-hours count in P1 only; P3 (the planner's ``shared``) and P6 (the same run dir listed
    again, as in a hand-merged plan) show it as shared with 0, and the actual time is 1.5 h, not 0.5 h."""
    monkeypatch.setattr(status, "_run", lambda cmd: None)
    bridge = _run(tmp_path, "bridge-s42", 42, 90.0, 1800.0)
    record = json.loads((tmp_path / "runs" / "bridge-s42" / "result.json").read_text())
    record["attempts"] = [
        {"status": "interrupted", "started_at": "2026-01-01T00:00:00+00:00", "seconds": 3600.0, "gpus": 2},
        {"status": "completed", "started_at": "2026-01-01T02:00:00+00:00", "seconds": 1800.0, "gpus": 2},
    ]
    (tmp_path / "runs" / "bridge-s42" / "result.json").write_text(json.dumps(record))
    zeroshot = _run(tmp_path, "zeroshot-s42", 42, 90.0, 600.0)
    job = {"start_s": 0.0, "predicted_s": 3630.0, "run_s": 3600.0, "gpus": 2}
    plan = {
        "cluster": {"window_h": 24},
        "jobs": [
            {**job, "job": "p1_seeds: seed=42", "phase": "p1_seeds", "run_dir": bridge},
            {**job, "job": "p3_baselines: method=zeroshot", "phase": "p3_baselines", "run_dir": zeroshot, "gpus": 1},
            {**job, "job": "p6_ablations: receiver=medium", "phase": "p6_ablations", "run_dir": bridge},
        ],
        "shared": [
            {
                "job": "p3_baselines: method=bridge",
                "phase": "p3_baselines",
                "run_dir": bridge,
                "shared_with": "p1_seeds",
            }
        ],
    }
    report = checklist.compare(plan, [])
    phases = report["phases"]
    assert phases["p1_seeds"]["gpu_hours"] == 3.0 and phases["p1_seeds"]["planned_gpu_hours"] == 3630 * 2 / 3600
    assert phases["p3_baselines"]["gpu_hours"] == 600.0 / 3600 and phases["p3_baselines"]["shared"] == 1
    assert "p6_ablations" not in phases  # its one run is P1's
    assert sum(p["gpu_hours"] for p in phases.values()) == 3.0 + 600.0 / 3600
    by_job = {r["job"]: r for r in report["jobs"]}
    assert by_job["p1_seeds: seed=42"]["actual_s"] == 5400.0 and by_job["p1_seeds: seed=42"]["attempts"] == 2
    assert by_job["p1_seeds: seed=42"]["started_at"] == "2026-01-01T00:00:00+00:00"  # the first attempt
    for name in ("p3_baselines: method=bridge", "p6_ablations: receiver=medium"):
        assert by_job[name]["shared_with"] == "p1_seeds" and by_job[name]["gpu_hours"] == 0.0
    text = checklist.render(report)
    assert "p3_baselines: method=bridge" in text and "shared: planned and costed in p1_seeds" in text
    assert "1.50 h    " in text and "(2 attempts)" in text
