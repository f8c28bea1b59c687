"""benchmarks/gpu_calibrate.py on the CPU (--smoke): every path runs, the one-pass scorer agrees with the
per-label one, and its table is one the planner reads."""

import json
import sys

import pytest

from helpers import REPO, run_env
from telepathy.cluster import costs


@pytest.mark.slow  # builds four 2-layer models and runs every path in subprocesses: ~2 min on the shared machine
def test_smoke_run_measures_every_path_and_writes_a_table_the_planner_reads(tmp_path):
    import subprocess

    out = tmp_path / "cal.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_calibrate", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["skipped"] and not result["errors"] and result["host"]["cpu"]
    assert {(e["model"], e["stage"]) for e in result["entries"]} >= {
        ("llama31_8b[smoke]", "features"),
        ("llama31_8b[smoke]", "decode"),
        ("mistral7b[smoke]", "eval"),
        ("mistral7b[smoke]", "train"),
        ("qwen25_15b[smoke]", "train"),
        ("qwen25_15b[smoke]", "decode"),
    }
    assert all(e["device"] == "cpu" and e["ratio"] > 0 for e in result["entries"])
    assert result["reference"] and all("per-label" in r["what"] for r in result["reference"])  # timed, not calibrated
    assert all(c["max_abs_score_diff"] < 1e-4 and c["same_argmax"] for c in result["checks"])
    assert result["llmlingua"][0]["per_item_s"] > 0 and result["dispatch"][0]["op_s"] > 0
    assert len(result["packed"][0]["3_processes_batches_per_s"]) == 3
    cal = costs.load_calibration(None, out)
    train = sorted(e["ratio"] for e in result["entries"] if (e["model"], e["stage"]) == ("mistral7b[smoke]", "train"))
    assert cal.ratio(("mistral7b[smoke]", "cpu", "train")) == train[len(train) // 2]
