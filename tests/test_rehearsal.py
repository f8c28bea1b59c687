"""The rehearsal of the whole plan on the local SLURM cluster (``make rehearsal``): all six phases,
each narrowed to one task and one seed at budget=tiny, then one aggregate over every run.
The biggest single test of CI (a few minutes); it needs the one-node test cluster."""

import subprocess
import sys

import pytest
from test_slurm import SKIP_REASON

from helpers import REPO, needs_data, run_env

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    needs_data,
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
]


def test_rehearsal_runs_all_six_phases_and_aggregates_them(tmp_path):
    out = tmp_path / "outputs"
    proc = subprocess.run(
        [sys.executable, "scripts/rehearsal.py", "--out", str(out), "--timeout", "900"],
        cwd=REPO,
        env=run_env(out),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "phases p1_seeds, p2_probes, p3_baselines, p4_latency, p5_xsum, p6_ablations" in proc.stdout
    assert (out / "summary" / "summary.json").exists() and (out / "summary" / "summary.md").exists()
