"""benchmarks/gpu_calibrate.py on the CPU (--smoke): its table is one the planner reads."""

import json
import sys

import pytest

from helpers import REPO, run_env
from telepathy.cluster import costs


@pytest.mark.slow  # builds 2-layer transformers models in a subprocess: ~1 min on the shared machine
def test_smoke_run_writes_a_calibration_table_the_planner_reads(tmp_path):
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_calibrate",
            "--smoke",
            "--models",
            "llama32_1b",
            "--repeat",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "calibration.json").read_text())
    assert {e["stage"] for e in table["entries"]} == {"eval", "features", "train", "decode"}
    assert all(e["device"] == "cpu" and e["ratio"] > 0 and e["model"] == "llama32_1b[smoke]" for e in table["entries"])
    cal = costs.load_calibration(None, tmp_path / "calibration.json")
    assert cal.ratio(("llama32_1b[smoke]", "cpu", "train")) == next(
        e["ratio"] for e in table["entries"] if e["stage"] == "train"
    )
