"""The paper from stored records (``python -m telepathy paper``, telepathy/analysis/paper.py) and from one
command (``make paper``, scripts/paper.py).

* unit tests of the page on synthetic records (tests/paper_fixtures.py): every table and figure is written,
  a rebuild is byte-identical, and a record edit changes the output;
* the regeneration check: every published folder (``PUBLISHED``: the slice run committed as a fixture, and
  docs/paper once a demo-scale run is published there) is rebuilt from its own records and must match,
  byte for byte (README.md, paper.json) and figure for figure;
* the integration test (``slurm``, ``slow``): ``scripts/paper.py --slice`` at budget=tiny on the local SLURM
  cluster, with its dependencies (P4 afterok on P1's bridge, the tables job afterany on every job) and a
  relaunch that queues nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paper_fixtures import N_ITEMS, P1_BRIDGE, write_records
from test_slurm import SKIP_REASON

from helpers import REPO, needs_data, run_env
from telepathy.analysis import paper

# the slice run of scripts/paper.py (budget=tiny: 2-layer random models, numbers that mean nothing), committed
# so that the regeneration check has real records of every phase before a demo-scale run is published
FIXTURE = REPO / "tests" / "fixtures" / "paper_slice"
DOCS = REPO / "docs" / "paper"
PUBLISHED = [FIXTURE, *([DOCS] if (DOCS / "records" / paper.INDEX).exists() else [])]


def n_boot_of(published: Path) -> int:
    return json.loads((published / "paper.json").read_text())["n_boot"]


@pytest.fixture
def records(tmp_path) -> Path:
    return write_records(tmp_path / "records")


def group(numbers: dict, phase: str, **match) -> dict:
    rows = [g for g in numbers["phases"][phase]["groups"] if all(g.get(k) == v for k, v in match.items())]
    assert len(rows) == 1, rows
    return rows[0]


# ------------------------------------------------------------------------------------------- the page
def test_build_writes_every_table_and_figure(records, tmp_path):
    out = tmp_path / "out"
    numbers = paper.build(records, out, n_boot=200)

    page = (out / "README.md").read_text()
    for title in paper.PHASES.values():
        assert f"## {title}" in page
    assert "_Not run._" not in page and "left no record" not in page
    for name in paper.FIGURES.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in page
    assert json.loads((out / "paper.json").read_text()) == numbers
    assert {k: v["records"] for k, v in numbers["phases"].items()} == {
        "p1_seeds": 4,
        "p2_probes": 2,
        "p3_baselines": 4,
        "p4_latency": 4,
        "p5_xsum": 3,
        "p6_ablations": 5,
    }

    # P1: the bridge's mean over its 3 seeds with a seed CI, the shuffled-sender control, the paired test
    bridge = group(numbers, "p1_seeds", method="bridge")
    assert bridge["n_independent"] == 3 and bridge["mean"] == pytest.approx(0.75)
    assert bridge["ci_low"] < 0.75 < bridge["ci_high"]
    assert bridge["control_delta"] == pytest.approx(0.25)
    (relay,) = numbers["phases"]["p1_seeds"]["comparisons"]
    assert relay["method"] == "text_relay" and relay["delta"] == pytest.approx(0.60 - 0.75)
    assert "| sst2   | bridge     | 4             | 2.5×         | 8                    | 75.0 ± 12.4" in page
    # P2: every probed layer of both models, at its relative depth
    points = {(p["model"], p["layer"]): p for p in numbers["phases"]["p2_probes"]["points"]}
    assert points[("gemma3_270m", 17)]["accuracy"] == 0.9 and points[("gemma3_270m", 17)]["reported"]
    assert points[("smollm2_135m", 15)]["depth"] == 0.5
    # P3: LLMLingua against the bridge
    (lingua,) = numbers["phases"]["p3_baselines"]["comparisons"]
    assert lingua["method"] == "llmlingua" and lingua["delta"] == pytest.approx(0.55 - 0.75)
    # P4: the grid, the relay/bridge ratio, which cells timed the trained bridge
    cells = {(c["compression"], c["batch_size"]): c for c in numbers["phases"]["p4_latency"]["cells"]}
    assert set(cells) == {(4.0, 1), (4.0, 4), (8.0, 1), (8.0, 4)}
    assert cells[(8.0, 4)]["relay_over_bridge"] == 10.0 and cells[(4.0, 1)]["relay_over_bridge"] == 3.0
    assert [c["bridge_trained"] for k, c in sorted(cells.items())] == [False, False, True, True]
    # P5: ROUGE with a CI over seeds for the bridge, over articles for the one zero-shot run
    xsum = {g["method"]: g for g in numbers["phases"]["p5_xsum"]["groups"].values()}
    assert xsum["bridge"]["rougeL"]["mean"] == pytest.approx(0.22) and xsum["bridge"]["rougeL"]["unit"] == "seeds"
    assert xsum["zeroshot"]["rougeL"] == {
        "mean": 0.1,
        "ci_low": pytest.approx(0.08),
        "ci_high": pytest.approx(0.12),
        "unit": "articles",
        "n": 1,
    }
    assert xsum["bridge"]["control"]["control_delta"] == pytest.approx(0.11)  # 0.22 - half of it, shuffled
    # P6: the reverse pair against the reference pair, paired on the items
    (pair,) = numbers["phases"]["p6_ablations"]["reference_comparisons"]
    assert (pair["sender"], pair["receiver"]) == ("gemma3_270m", "smollm2_135m")
    assert (pair["baseline.sender"], pair["baseline.receiver"]) == ("smollm2_135m", "gemma3_270m")
    assert pair["delta"] == pytest.approx(0.60 - 0.75)
    # the wall time: the first job's start to the last record, against the plan
    assert numbers["wall_time"]["measured_makespan_s"] == 14 * 60
    assert numbers["wall_time"]["predicted_makespan_s"] == 1200.0
    assert numbers["wall_time"]["phases"]["demo/p1_seeds"]["jobs_predicted"] == len(P1_BRIDGE)


def test_rebuild_is_byte_identical_and_keeps_the_written_summary(records, tmp_path):
    out = tmp_path / "out"
    paper.build(records, out, n_boot=200)
    first = {name: (out / name).read_bytes() for name in ("README.md", "paper.json")}
    assert paper.SUMMARY_TODO in first["README.md"].decode()
    summary = "The bridge beats the relay on these 40 items; nothing here is a claim."
    (out / "README.md").write_text(first["README.md"].decode().replace(paper.SUMMARY_TODO, summary))

    paper.build(records, out, n_boot=200)
    again = (out / "README.md").read_text()
    assert summary in again and paper.SUMMARY_TODO not in again
    assert again == first["README.md"].decode().replace(paper.SUMMARY_TODO, summary)
    assert (out / "paper.json").read_bytes() == first["paper.json"]
    assert paper.check(records, out, n_boot=200) == []


def edit_p1_bridge(records: Path, seed: int = 1, right: int = 20) -> None:
    """A record edited after publication: one P1 bridge seed's accuracy and items."""
    run = records / "runs" / f"sst2-bridge-ref-s{seed}"
    rec = json.loads((run / "result.json").read_text())
    rec["metrics"]["accuracy"] = right / N_ITEMS
    (run / "result.json").write_text(json.dumps(rec, indent=1))
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["correct"] = i < right
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_record_edit_changes_the_tables_and_the_check_sees_it(records, tmp_path):
    out = tmp_path / "out"
    before = paper.build(records, out, n_boot=200)
    edit_p1_bridge(records)

    problems = paper.check(records, out, n_boot=200)
    assert any(p.startswith(f"{out / 'README.md'} differs") for p in problems), problems
    assert any(p.startswith(f"{out / 'paper.json'} differs") for p in problems), problems
    after = paper.build(records, tmp_path / "rebuilt", n_boot=200)
    old, new = group(before, "p1_seeds", method="bridge"), group(after, "p1_seeds", method="bridge")
    assert old["mean"] == pytest.approx(0.75) and new["mean"] == pytest.approx((20 + 28 + 32) / 3 / N_ITEMS)


def test_a_missing_figure_or_an_extra_one_is_a_difference(records, tmp_path):
    out = tmp_path / "out"
    paper.build(records, out, n_boot=200)
    (out / paper.FIGURES["probes"]).unlink()
    (out / "stale.png").write_bytes(b"\x89PNG")
    problems = paper.check(records, out, n_boot=200)
    assert problems == [
        f"{out / paper.FIGURES['probes']} is missing ({records} gives it)",
        f"{out / 'stale.png'} is not a figure {records} gives",
    ]


def test_cli_builds_checks_and_exits_1_on_a_difference(records, tmp_path, capsys):
    out = tmp_path / "out"
    assert paper.main([str(records), "--out", str(out), "--n-boot", "200"]) == 0
    assert paper.main([str(records), "--check", str(out), "--n-boot", "200"]) == 0
    assert "matches its records" in capsys.readouterr().err
    edit_p1_bridge(records)
    assert paper.main([str(records), "--check", str(out), "--n-boot", "200"]) == 1
    assert "differs" in capsys.readouterr().err
    assert paper.main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "index.json is missing" in capsys.readouterr().err


def test_a_phase_without_records_says_so(records, tmp_path):
    index = json.loads((records / paper.INDEX).read_text())
    del index["phases"]["demo/p5_xsum"]
    index["phases"]["demo/p2_probes"].append("runs/never-ran")
    (records / paper.INDEX).write_text(json.dumps(index))
    numbers = paper.build(records, tmp_path / "out", n_boot=200)
    page = (tmp_path / "out" / "README.md").read_text()
    assert page.split("## P5 — generation: XSum\n", 1)[1].lstrip().startswith("_Not run._")
    assert "**1 listed runs left no record**: runs/never-ran" in page
    assert numbers["phases"]["p2_probes"]["listed"] == 3 and numbers["phases"]["p2_probes"]["records"] == 2


# ------------------------------------------------------------------------------------------- the regeneration check
@pytest.mark.parametrize("published", PUBLISHED, ids=[str(p.relative_to(REPO)) for p in PUBLISHED])
def test_published_tables_are_what_their_records_give(published):
    """CI's check: a change to the analysis code that changes a published number fails here. To accept
    the change, rebuild: ``python -m telepathy paper <folder>/records --out <folder>``."""
    assert (published / "records" / paper.INDEX).exists()
    problems = paper.check(published / "records", published, n_boot_of(published))
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("published", PUBLISHED, ids=[str(p.relative_to(REPO)) for p in PUBLISHED])
def test_a_published_folder_has_every_phase_and_no_heavy_files(published):
    index = json.loads((published / "records" / paper.INDEX).read_text())
    assert sorted(paper.phase_key(n) for n in index["phases"]) == sorted(paper.PHASES)
    names = {p.name for p in (published / "records").rglob("*") if p.is_file()}
    assert names <= {paper.INDEX, paper.PLAN, "summary.json", *paper.RECORD_FILES}, names  # no checkpoints
    limit = 1_000_000 if published == FIXTURE else 6_000_000  # the demo run: 63 runs' records, 4.5 MB
    assert sum(p.stat().st_size for p in published.rglob("*") if p.is_file()) < limit


@pytest.mark.parametrize("source", PUBLISHED, ids=[str(p.relative_to(REPO)) for p in PUBLISHED])
def test_the_regeneration_check_fails_when_a_published_record_is_edited(source, tmp_path):
    published = tmp_path / "published"
    shutil.copytree(source, published)
    assert paper.check(published / "records", published, n_boot_of(published)) == []
    run = next((published / "records" / "runs").glob("sst2-bridge-smollm2_135m_gemma3_270m-*"))
    rec = json.loads((run / "result.json").read_text())
    rec["metrics"]["accuracy"] += 0.0625  # one more of 16 items right (the fixture), 12.5 of 200 (docs/paper)
    (run / "result.json").write_text(json.dumps(rec, indent=1))
    problems = paper.check(published / "records", published, n_boot_of(published))
    assert [p.split(" differs", 1)[0] for p in problems] == [
        str(published / "README.md"),
        str(published / "paper.json"),
    ], problems


def test_a_demo_phase_waits_for_its_paper_phases_dependencies():
    """P4 at any scale waits for P1 of the same scale (cluster.phases), as the planner schedules it."""
    from omegaconf import OmegaConf

    from telepathy.cluster.plan import phase_spec

    cfg = OmegaConf.create(
        {"cluster": {"phases": {"p1_seeds": {"priority": 1}, "p4_latency": {"priority": 6, "after": ["p1_seeds"]}}}}
    )
    assert phase_spec(cfg, "demo/p4_latency") == {"priority": 6, "after": ["demo/p1_seeds"]}
    assert phase_spec(cfg, "p4_latency") == {"priority": 6, "after": ["p1_seeds"]}
    assert phase_spec(cfg, "demo/p9_unknown") == {}


# ------------------------------------------------------------------------------------------- one command, on SLURM
SLICE_ARGS = ["--scale", "demo", "--slice", "budget=tiny", "sender.layer=1"]


def scontrol(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[0]
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


def dependencies(field: str) -> set[tuple[str, str]]:
    """scontrol's ``afterany:48_0(unfulfilled),afterok:49(unfulfilled)`` as {(kind, job id)}; ``(null)``: none."""
    if field == "(null)":
        return set()
    return {(kind, job.split("(")[0]) for kind, job in (d.split(":", 1) for d in field.split(","))}


def repo_jobs() -> set[str]:
    """The ids of the jobs queued or running from this checkout (their work dir), array tasks as ``<id>_<task>``."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %Z"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.split()[1:] == [str(REPO)]}


def launch(tmp_path: Path) -> subprocess.CompletedProcess:
    outputs, out = tmp_path / "outputs", tmp_path / "paper"
    return subprocess.run(
        [sys.executable, "scripts/paper.py", *SLICE_ARGS, "--outputs", str(outputs), "--out", str(out)],
        cwd=REPO,
        env=run_env(outputs),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slurm
@pytest.mark.slow
@needs_data
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_make_paper_slice_chains_every_phase_on_slurm_and_a_relaunch_queues_nothing(tmp_path):
    """The whole chain at budget=tiny: six phases queued, P4 held by SLURM until P1's bridge is done, the
    tables job after every job; then the page from the copied records, and a relaunch that queues nothing.
    A gate job holds the node while the launch queues, so that no job finishes before the dependencies are
    read (a tiny P1 would otherwise end before P4 is queued, and P4 would need no dependency)."""
    outputs, out = tmp_path / "outputs", tmp_path / "paper"
    already = repo_jobs()
    try:
        chain(outputs, out, tmp_path)
    finally:  # a failure leaves no job of this test behind
        left = repo_jobs() - already
        if left:
            subprocess.run(["scancel", *sorted(left)], check=False)


def chain(outputs: Path, out: Path, tmp_path: Path) -> None:
    gate = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--job-name=paper-test-gate",
            "--cpus-per-task=8",
            "--time=20",
            f"--output={tmp_path}/gate-%j.out",
            "--wrap=sleep 900",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=run_env(outputs),
    ).stdout.strip()
    try:
        deadline = time.time() + 120
        while scontrol(gate)["JobState"] != "RUNNING":
            assert time.time() < deadline, f"the gate job {gate} did not start: {scontrol(gate)['Reason']}"
            time.sleep(1)
        proc = launch(tmp_path)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        (first,) = json.loads((outputs / "paper" / "launches.json").read_text())["launches"]
        for phase in paper.PHASES:
            assert first["queued"][f"demo/{phase}"], (phase, first["queued"])

        # P4 waits (afterok) for P1's SST-2 bridge, which is still queued behind the gate
        p1_bridges = first["p4_waits_for"]
        assert len(p1_bridges) == 1 and p1_bridges[0] in first["queued"]["demo/p1_seeds"], first
        p4_jobs = first["queued"]["demo/p4_latency"]
        assert len(p4_jobs) == 4  # the slice's 2 x 2 grid
        for job in p4_jobs:
            info = scontrol(job)
            assert dependencies(info["Dependency"]) == {("afterok", p1_bridges[0])}, (job, info["Dependency"])
            assert info["KillOInInvalidDependent"] == "Yes"  # a failed P1 bridge ends P4 instead of a wait forever
        # the tables job is last: afterany on every job the launch queued
        tables = scontrol(first["tables_job"])
        assert tables["JobName"] == "paper-tables-demo", tables
        waits = dependencies(tables["Dependency"])
        assert {kind for kind, _ in waits} == {"afterany"}, tables["Dependency"]
        every = {j for ids in first["queued"].values() for j in ids}
        assert every <= {job for _, job in waits}, (every - {job for _, job in waits}, tables["Dependency"])
    finally:
        subprocess.run(["scancel", gate], check=False)

    queued = every | {first["tables_job"]}
    deadline = time.time() + 900
    while time.time() < deadline and repo_jobs() & queued:
        time.sleep(5)
    assert not repo_jobs() & queued, "the plan did not end within 15 minutes"
    log = next((outputs / "paper").glob("tables-*.log")).read_text()
    assert "paper: " in log and "README.md from" in log, log[-3000:]

    # every phase's records were copied, and the page is what they give
    built = json.loads((out / "paper.json").read_text())
    assert all(built["phases"][p]["records"] > 0 for p in paper.PHASES), built["phases"]
    assert all(built["phases"][p]["records"] == built["phases"][p]["listed"] for p in paper.PHASES)
    trained = {c["compression"]: c["bridge_trained"] for c in built["phases"]["p4_latency"]["cells"]}
    assert trained == {4.0: False, 8.0: True}  # c8 read P1's checkpoint (bridge_checkpoint=auto)
    assert paper.check(out / "records", out, n_boot_of(out)) == []
    assert not list((out / "records").rglob("*.pt")) and not list((out / "records").rglob("checkpoints"))

    # the same command again: everything is done, nothing is queued, no second tables job
    before = repo_jobs()
    again = launch(tmp_path)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "paper: queued 0 jobs" in again.stdout and "no tables job" in again.stdout, again.stdout[-3000:]
    assert not repo_jobs() - before
    second = json.loads((outputs / "paper" / "launches.json").read_text())["launches"][-1]
    assert second["tables_job"] is None and not any(second["queued"].values())
