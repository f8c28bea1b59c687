"""The planner: schedule (known optimal makespans), cuts, calibration from result.json, the CLI."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, compose, needs_data, run_env
from telepathy.cluster import costs
from telepathy.cluster.plan import Job, cuts, makespan, occupancy, schedule
from telepathy.config import ConfigError


def _brute_force_makespan(durations, n_gpus):
    """The optimal makespan of independent 1-GPU jobs: try every assignment."""
    best = float("inf")
    for assign in itertools.product(range(n_gpus), repeat=len(durations)):
        loads = [0.0] * n_gpus
        for d, g in zip(durations, assign):
            loads[g] += d
        best = min(best, max(loads))
    return best


def test_schedule_reaches_the_known_optimal_makespan():
    durations = [4, 3, 3, 2, 2, 2]
    jobs = [Job(name=f"j{i}", phase="p", duration_s=d) for i, d in enumerate(durations)]
    slots = schedule(jobs, n_gpus=2, gpu_mem_gb=80)
    assert makespan(slots) == _brute_force_makespan(durations, 2) == 8
    assert occupancy(slots, 2) == [1.0, 1.0]
    assert sorted(s.job.name for s in slots) == sorted(j.name for j in jobs)  # every job exactly once


def test_two_gpu_jobs_and_phase_dependencies_are_respected():
    jobs = [
        Job("big", "p1", 5, gpus=2, priority=1),
        Job("small", "p1", 1, priority=1),
        Job("lat1", "p4", 5, priority=2, after=("p1",)),
        Job("lat2", "p4", 5, priority=2, after=("p1",)),
    ]
    slots = {s.job.name: s for s in schedule(jobs, n_gpus=2, gpu_mem_gb=80)}
    assert len(slots["big"].gpus) == 2
    p1_end = max(slots["big"].end, slots["small"].end)
    assert slots["lat1"].start >= p1_end and slots["lat2"].start >= p1_end
    assert makespan(list(slots.values())) == 11  # big (5) | small (1) | both latency jobs in parallel (5)


def test_small_jobs_pack_onto_one_gpu_within_its_memory():
    small = [Job(f"s{i}", "p", 6, mem_gb=20, packable=True) for i in range(3)]
    assert makespan(schedule(small, 1, 80, pack_max=3)) == 6
    assert makespan(schedule(small, 1, 80, pack_max=1)) == 18
    fat = [Job(f"f{i}", "p", 6, mem_gb=30, packable=True) for i in range(3)]
    assert makespan(schedule(fat, 1, 80, pack_max=3)) == 12  # 3 x 30 GB > 80 GB: two at a time
    # a non-packable job never shares its GPU
    mixed = [Job("whole", "p", 6, mem_gb=10), *small]
    slots = schedule(mixed, 1, 80, pack_max=3)
    whole = next(s for s in slots if s.job.name == "whole")
    assert all(s.start >= whole.end or s.end <= whole.start for s in slots if s is not whole)


def test_a_plan_over_the_window_gets_cuts_that_fit():
    jobs = [Job(f"t{i}", "p1", 10, train_s=8, priority=1, params=(("seed", str(i % 3)),)) for i in range(6)]
    jobs += [Job("late", "p6", 10, priority=5)]
    assert makespan(schedule(jobs, 2, 80)) == 40  # 7 jobs of 10 s, 2 at a time
    found = cuts(jobs, 30, 2, 80, 1)
    assert any(c.startswith("fewer steps") for c in found)
    assert any(c.startswith("a phase later: run p6") for c in found)


def test_a_job_wider_than_the_cluster_is_one_error():
    with pytest.raises(ConfigError, match="cluster.gpus=1"):
        schedule([Job("x", "p", 1, gpus=2)], 1, 80)


def _record(cfg, train_s, eval_s, total_s):
    from omegaconf import OmegaConf

    return {
        "status": "completed",
        "run_id": "r",
        "config": OmegaConf.to_container(cfg, resolve=True),
        "env": {"device": "cpu"},
        "timing": {"train_s": train_s, "eval_s": eval_s, "total_s": total_s},
    }


@needs_data
def test_measured_runs_calibrate_the_prediction_and_say_so():
    cfg = compose("budget=tiny", "task=trec")
    before = costs.predict(cfg, "cpu")
    assert set(before.sources.values()) == {"default"}
    cal = costs.Calibration()
    costs.calibrate_from_record(
        cal, _record(cfg, 3 * before.seconds["train"], before.seconds["eval"], 10 * sum(before.seconds.values()))
    )
    after = costs.predict(cfg, "cpu", cal)
    assert after.seconds["train"] == pytest.approx(3 * before.seconds["train"])
    assert after.sources["train"] == "calibrated (1)"
    assert after.seconds["eval"] == pytest.approx(before.seconds["eval"], rel=0.01)
    # the rest of total_s calibrates load + features (model load has no model of its own: the receiver's key)
    prep = 10 * sum(before.seconds.values()) - 3 * before.seconds["train"] - before.seconds["eval"]
    assert after.seconds["load"] + after.seconds["features"] == pytest.approx(prep, rel=0.01)
    assert after.sources["load"] == after.sources["features"] == "calibrated (1)"
    # more steps → proportionally more train time at the calibrated rate
    longer = costs.predict(compose("budget=tiny", "task=trec", "trainer.max_steps=40"), "cpu", cal)
    assert longer.seconds["train"] == pytest.approx(10 * after.seconds["train"], rel=0.01)


@needs_data
def test_generation_counts_decoding_and_token_counts_come_from_the_data():
    stats = costs.token_stats(compose("budget=tiny", "task=xsum"))
    assert stats["train"]["rows"] == 500 and stats["test"]["rows"] == 500
    assert costs.capped_mean(stats["test"]["prompt_hist"], 512) > 300  # articles are long; capped at 512
    work = costs.job_work(compose("budget=tiny", "task=xsum"), stats)
    assert work["decode"].bytes > 0
    assert costs.job_work(compose("budget=tiny", "task=trec"))["decode"].bytes == 0


@pytest.mark.slow  # imports torch + transformers in a subprocess, composes 11 jobs: ~35 s on 2 shared cores
@needs_data
def test_plan_cli_plans_a_phase_slice_on_the_cpu(tmp_path):
    args = [
        sys.executable,
        "-m",
        "telepathy",
        "plan",
        "+phase=p1_seeds,p3_baselines",  # P3's bridge and zero-shot runs are P1's
        "budget=tiny",
        "task=trec",
        "seed=42",
        "cluster.device=cpu",
        "cluster.gpus=2",
        "--out",
        str(tmp_path / "plan"),
    ]
    proc = subprocess.run(args, cwd=REPO, env=run_env(tmp_path / "out"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [j["job"] for j in plan["jobs"] if j["phase"] == "p1_seeds"] == [
        "p1_seeds: method=bridge task=trec seed=42",
        "p1_seeds: method=zeroshot task=trec seed=42",
        "p1_seeds: method=zeroshot_sender task=trec seed=42",  # P1 scores both models zero-shot
        "p1_seeds: method=zeroshot_calibrated task=trec seed=42",  # and the receiver calibrated
    ]
    # a run two phases share is planned and costed once, in the first; the other lists it as shared
    assert [(s["job"], s["shared_with"]) for s in plan["shared"]] == [
        ("p3_baselines: method=bridge task=trec", "p1_seeds"),
        ("p3_baselines: method=zeroshot task=trec", "p1_seeds"),
        ("p3_baselines: method=zeroshot_calibrated task=trec", "p1_seeds"),
    ]
    assert not {s["run_dir"] for s in plan["shared"]} & {j["run_dir"] for j in plan["jobs"] if j["phase"] != "p1_seeds"}
    assert "shared: p3_baselines: method=bridge task=trec is planned and costed in p1_seeds" in proc.stdout
    assert plan["fits"] and plan["makespan_s"] > 0
    assert (tmp_path / "plan" / "gantt.png").stat().st_size > 0
    assert "| GPU |" in (tmp_path / "plan" / "gantt.md").read_text()
    assert "verdict: FITS" in proc.stdout and "on defaults only" in proc.stdout


def test_a_deterministic_methods_seeds_are_costed_once_as_the_launcher_queues_them(tmp_path):
    """The launcher queues one zero-shot job for all seeds (cluster.sweep.share_deterministic) and copies
    its record to the others; the plan used to cost every seed (the demo paper's P1: 18 zero-shot jobs
    predicted, 6 queued)."""
    args = [sys.executable, "-m", "telepathy", "plan", "+phase=p1_seeds", "budget=tiny", "task=trec"]
    args += ["seed=42,123,456", "cluster.device=cpu", "cluster.gpus=2", "--out", str(tmp_path / "plan")]
    proc = subprocess.run(args, cwd=REPO, env=run_env(tmp_path / "out"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    costed = sorted(j["job"].split(": ")[1] for j in plan["jobs"])
    assert costed == sorted(
        [f"method=bridge task=trec seed={s}" for s in (42, 123, 456)]
        + [f"method={m} task=trec seed=42" for m in ("zeroshot", "zeroshot_sender", "zeroshot_calibrated")]
    )
    shared = sorted((s["job"].split(": ")[1], s["shared_with"]) for s in plan["shared"])
    assert shared == sorted(
        (f"method={m} task=trec seed={s}", "p1_seeds")
        for m in ("zeroshot", "zeroshot_sender", "zeroshot_calibrated")
        for s in (123, 456)
    )
    assert len({s["run_dir"] for s in plan["shared"]}) == 6  # each seed keeps its own run dir (its copied record)


@needs_data
def test_the_plan_composes_each_job_in_the_order_hydras_sweeper_launches_it(tmp_path):
    """Hydra's basic sweeper puts the phase's parameters before the command line: a job of
    ``-m +phase=demo/p6_ablations`` runs as ``+pair=<pair> seed=<s> +phase=demo/p6_ablations``, so the
    phase's own ``sender.layer`` wins over a pair file's. The plan composed ``+phase`` first: it predicted
    the demo paper's SmolLM2 → Gemma P6 runs as P1's (block 15, shared, not costed) while the launch
    ran them at the phase's layer, as runs of their own."""
    from telepathy.config import run_dir

    args = [sys.executable, "-m", "telepathy", "plan", "+phase=demo/p1_seeds,demo/p6_ablations", "seed=42"]
    args += ["cluster=paper_demo", "--out", str(tmp_path / "plan")]
    proc = subprocess.run(args, cwd=REPO, env=run_env(tmp_path / "out"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    planned = {Path(r["run_dir"]).name for r in [*plan["jobs"], *plan["shared"]] if r["phase"] == "demo/p6_ablations"}
    from omegaconf import OmegaConf

    pairs = OmegaConf.load(REPO / "conf/phase/demo/p6_ablations.yaml").hydra.sweeper.params["+pair"].split(",")
    launched = {run_dir(compose(f"+pair={p}", "seed=42", "+phase=demo/p6_ablations")).name for p in pairs}
    assert planned == launched
    # and every job is named by what its phase sweeps, the pair included
    assert sorted(r["job"] for r in plan["jobs"] if r["phase"] == "demo/p6_ablations") == sorted(
        f"demo/p6_ablations: pair={p} seed=42" for p in pairs
    )


def test_plan_cli_rejects_a_bad_cluster_value_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "telepathy", "plan", "+phase=p1_seeds", "cluster.gpus=0"],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: cluster.gpus=0 is not allowed; allowed: an integer in [1, inf]"]


def test_loading_a_budget_tiny_stand_in_costs_its_own_bytes_not_the_paper_models():
    # before: the load stage of a tiny rehearsal job read 16 GB (Llama-3.1-8B's published size), so
    # the planner over-predicted every rehearsal job by the minutes it takes to read that
    paper, tiny = compose("sender=llama31_8b"), compose("sender=llama31_8b", "budget=tiny")
    assert costs._weight_bytes(paper.sender) == pytest.approx(2 * 8.03e9, rel=0.01)
    assert costs._weight_bytes(tiny.sender) < 50e6


def test_forward_flops_count_the_parameters_a_token_is_multiplied_by_for_paper_and_tiny_models():
    # before: 2 x all 8.03 B parameters of Llama-3.1-8B (its 2 x 128256 x 4096 embedding and head
    # rows are a lookup and a head applied only where a label is read), while tiny stand-ins had a
    # formula of their own that ignored grouped-query attention
    paper, tiny = compose("sender=llama31_8b"), compose("sender=llama31_8b", "budget=tiny")
    assert costs._flops_per_token(paper.sender) == pytest.approx(2 * (8.03e9 - 2 * 128256 * 4096), rel=1e-3)
    h, layers = int(tiny.sender.config_overrides.hidden_size), int(tiny.sender.config_overrides.num_hidden_layers)
    heads, kv = tiny.sender.config_overrides.num_attention_heads, tiny.sender.config_overrides.num_key_value_heads
    inter = int(tiny.sender.config_overrides.intermediate_size)
    per_layer = h * (h // heads) * 2 * (heads + kv) + 3 * h * inter + 2 * h  # q, o, k, v; gated MLP; norms
    assert costs._flops_per_token(tiny.sender) == pytest.approx(2 * (layers * per_layer + h))
