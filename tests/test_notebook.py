"""notebooks/results.ipynb runs top to bottom (nbclient) on a sweep's results, so it never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis_fixtures import table_rows, write_sweep
from helpers import TINY, needs_data, run_train
from telepathy.analysis import aggregate, report

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "results.ipynb"


def execute(results, monkeypatch):
    """Run the notebook with TELEPATHY_RESULTS=results; return (markdown outputs, png count)."""
    monkeypatch.setenv("TELEPATHY_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, with the cell and traceback, if any cell fails
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    pngs = sum("image/png" in o.get("data", {}) for o in outputs)
    return markdown, pngs


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebook_on_synthetic_sweep(tmp_path, monkeypatch):
    runs = write_sweep(tmp_path / "runs")
    markdown, pngs = execute(runs, monkeypatch)
    table = table_rows(markdown[0])
    assert ["sst2", "bridge", "4", "2.5×", "8", "75.8 ± 3.6", "3", "1 failed"] in table
    assert ["sst2", "receiver_only", "", "", "", "50.0", "1 (det.)", ""] in table
    assert "p (Holm)" in markdown[1]
    assert pngs == 2
    # the same numbers as summary.md (before: 2000 bootstrap resamples in the notebook, 10 000 in aggregate)
    summary_md, _, _ = aggregate.write_outputs(aggregate.build(runs), tmp_path / "summary", [runs])
    assert markdown[0] in summary_md and markdown[1] in summary_md


@pytest.mark.slow
@needs_data
def test_notebook_and_report_on_a_real_tiny_sweep(tmp_path, monkeypatch):
    """A real 3-seed sweep through train.py (random 2-layer models), then the notebook and the phase report."""
    outputs = tmp_path / "outputs"
    run_train("-m", *TINY, "seed=0,1,2", outputs=outputs)
    runs_dir = outputs / "runs"
    records = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*/result.json"))]
    assert len(records) == 3 and all(r["status"] == "completed" for r in records)
    accs = [r["metrics"]["accuracy"] for r in records]
    c = records[0]["config"]["compression"]

    markdown, pngs = execute(runs_dir, monkeypatch)
    header, *rows = table_rows(markdown[0])
    row = dict(zip(header, next(row for row in rows if row[:3] == ["sst2", "bridge", str(c)])))
    accuracy = next(h for h in header if h.startswith("Accuracy (%), mean"))
    assert row[accuracy].startswith(f"{100 * sum(accs) / 3:.1f} ± ") and row["n seeds"] == "3"
    assert pngs == 2

    md, rec = report.build_report(outputs)
    assert all(check["passed"] for check in rec["checks"]), rec["checks"]
    assert rec["runs_by_status"] == {"completed": 3}


@pytest.mark.slow
def test_documented_notebook_command_writes_an_html_report(tmp_path):
    """docs/results.md's headless command (nbconvert, installed by `make setup`), exactly as documented."""
    runs = write_sweep(tmp_path / "runs")
    env = {**os.environ, "TELEPATHY_RESULTS": str(runs), "MPLBACKEND": "Agg"}
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "nbconvert",
        "--to",
        "html",
        "--execute",
        "notebooks/results.ipynb",
        "--output-dir",
        str(tmp_path / "summary"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (tmp_path / "summary" / "results.html").read_text()
    assert "75.8 ± 3.6" in html and "data:image/png;base64" in html
