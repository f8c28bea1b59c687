"""telepathy.status --plan: the plan against what ran, and the five success metrics."""

import json

from telepathy.cluster import status


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
    assert "1 runs out of memory" in lines["no OOM"]
    assert "2/3 result.json readable" in lines["valid JSON from every experiment"]
    assert "50.0% over 2 runs" in lines[">80% average GPU utilisation"]
