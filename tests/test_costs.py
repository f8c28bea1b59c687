"""The cost model (telepathy/cluster/costs.py) as the runs will really run: work the methods declare,
calls from the batch plan, the per-op dispatch floor, one label-scoring pass, LLMLingua per item,
decode steps, SLURM dispatch, a low / expected / high range, GPU-busy fractions, packing slowdown."""

from __future__ import annotations

import ast
import math

import pytest

from helpers import REPO, compose, needs_data
from telepathy import methods, resources
from telepathy.cluster import costs
from telepathy.config import ConfigError

P1 = ["+phase=p1_seeds", "task=trec", "seed=42"]


def test_costs_never_branches_on_a_method_name():
    # before: `if method == "bridge": ... elif method in ("prompt_tuning", "lora")` and so on; a new
    # method fell through to the zero-shot branch and was costed as zero-shot, silently
    tree = ast.parse((REPO / "telepathy/cluster/costs.py").read_text())
    names = set(methods.REGISTRY) | {"latency"}
    found = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names}
    assert not found, f"costs.py names methods: {sorted(found)}"


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_declares_its_work(name):
    cfg = compose("budget=tiny", f"method={name}")
    passes = costs.work_profile(cfg)
    assert passes and all(p["stage"] in ("features", "train", "eval") for p in passes)
    trains = any(p["items"] == "steps" for p in passes)
    assert trains == (costs.training_resident(cfg) is not None)  # a method that trains says what stays resident


@needs_data
def test_a_method_without_a_work_profile_is_refused_in_one_line():
    cfg = compose("budget=tiny", "method=zeroshot", "~method.work")
    with pytest.raises(ConfigError, match=r"^method.work=None is not allowed for method.name='zeroshot'; allowed: "):
        costs.job_work(cfg)


@needs_data
def test_training_calls_come_from_the_batch_plan_as_it_will_run():
    # before: steps x trainer.grad_accum of the config (1), not the split the job runs with
    cfg = compose(*P1[1:], "sender=llama31_8b", "receiver=mistral7b", "budget=paper_1k", "cluster.gpu_mem_gb=19")
    split = resources.batch_plan(cfg)
    assert split["grad_accum"] > 1  # a 19 GB card cannot hold 16 at once beside the 7B receiver
    train = costs.job_work(cfg)["train"]
    assert train.calls == int(cfg.trainer.max_steps) * split["grad_accum"]


@needs_data
def test_the_dispatch_floor_is_ops_per_layer_times_the_per_op_cost():
    # before: 40 us per layer + 5 ms per call, about 10x below what eager Hugging Face code costs
    cfg = compose("+pair=small", "method=zeroshot", "task=sst2", "budget=paper")  # Qwen2.5-1.5B, 28 layers
    work = costs.job_work(cfg)["eval"]
    # at least 53 top-level aten ops per layer of a forward (torch profiler), each >= 5 us of host time
    assert costs.default_seconds("eval", work, "h100") >= work.calls * 28 * 53 * 5e-6
    wall, busy = costs.stage_seconds("eval", work, "h100")
    assert busy < 0.5 * wall  # small batches of a 1.5B model: the GPU waits for the CPU


@needs_data
def test_decoding_pays_a_step_overhead_and_multi_token_labels_one_more_pass():
    xsum = costs.job_work(compose("+pair=small", "method=zeroshot", "task=xsum", "budget=paper_xsum"))
    step = xsum["decode"].groups[0]
    wall, _ = costs._call_seconds(step, costs.DEVICES["h100"])
    assert wall >= costs.DECODE_STEP_S + step.layers * costs.OPS_PER_LAYER["decode"] * costs.DEVICES["h100"]["op_s"]
    labels = ["abbreviation or acronym", "entity or thing", "description", "human", "location", "number"]
    run = [*P1[1:], "method=zeroshot", "budget=paper_1k", "receiver=mistral7b"]
    single, multi = compose(*run), compose(*run, f"task.labels=[{','.join(labels)}]")
    one, many = costs.job_work(single)["eval"], costs.job_work(multi)["eval"]
    assert many.calls == one.calls  # the prompt is not encoded again per label ...
    assert many.groups[0].ops_factor == 2 * one.groups[0].ops_factor  # ... one continuation pass, for all labels
    assert one.flops < many.flops < 1.5 * one.flops


@needs_data
def test_llmlingua_is_costed_per_item():
    cfg = compose(*P1[1:], "method=llmlingua", "budget=paper_1k", "sender=llama31_8b", "receiver=mistral7b")
    compress = costs.job_work(cfg)["eval"].groups[0]
    n_test = costs.token_stats(cfg)["test"]["rows"]
    assert compress.n >= n_test and compress.host_s > 0  # one text per call, and the library's own Python per text


@needs_data
def test_a_prediction_has_a_range_a_gpu_busy_fraction_and_the_slurm_dispatch():
    cfg = compose(*P1[1:], "method=bridge", "sender=llama31_8b", "receiver=mistral7b", "budget=paper_1k")
    low, mid, high = (costs.predict(cfg, "h100", scenario=s) for s in ("low", "expected", "high"))
    assert low.total_s < mid.total_s < high.total_s
    assert mid.dispatch_s == cfg.cluster.dispatch_s and mid.total_s > mid.dispatch_s + mid.startup_s
    assert 0 < mid.busy_fraction < 1 and mid.busy["train"] <= mid.seconds["train"]
    bound = costs.lower_bound(cfg, "h100")
    assert all(bound[s] < mid.seconds[s] for s in bound)  # never below the physics


def test_gpu_bound_jobs_sharing_a_gpu_slow_each_other_down():
    from telepathy.cluster.plan import Job, gpu_busy, makespan, phase_busy, schedule

    # before: packed jobs ran as fast as alone, and the three most GPU-bound jobs shared GPU 0
    alone = [Job(f"j{i}", "p", 100, mem_gb=10, packable=True, busy=0.0) for i in range(2)]
    busy = [Job(f"b{i}", "p", 100, mem_gb=10, packable=True, busy=0.5) for i in range(2)]
    assert makespan(schedule(alone, 1, 80, pack_max=3)) == 100
    slots = schedule(busy, 1, 80, pack_max=3)
    assert makespan(slots) == pytest.approx(100 * (1 + 0.5 * 0.5))
    assert gpu_busy(slots, 1)[0] == pytest.approx(100 / 125)  # the same GPU work over a longer span
    assert phase_busy(slots)["p"] == pytest.approx(100 / 225)


def test_the_downloads_are_a_line_of_their_own():
    from telepathy.cluster.plan import prepare_line

    rows = [{"weights": {"llama31_8b": 16e9, "mistral7b": 14e9}}, {"weights": {"mistral7b": 14e9}}]
    outside, text = prepare_line(rows, {"download_gb_s": 0.5, "prepare_in_window": False})
    assert outside == 0 and "2 models, 30.0 GB" in text and "0:01:00" in text and "before the window" in text
    inside, _ = prepare_line(rows, {"download_gb_s": 0.5, "prepare_in_window": True})
    assert inside == pytest.approx(60)


@needs_data
def test_an_h200_calibration_applies_to_an_h100_plan_and_says_so():
    cfg = compose("budget=tiny", "task=trec", "method=zeroshot")
    cal = costs.Calibration()
    key = costs.job_work(cfg)["eval"].model
    cal.add((key, "h200", "eval"), 2.0, "table:calibration.json")
    before, after = costs.predict(cfg, "h100"), costs.predict(cfg, "h100", cal)
    assert after.sources["eval"] == "calibrated on h200 (1)"
    assert math.isclose(after.seconds["eval"], 2 * before.seconds["eval"], rel_tol=1e-6)


@needs_data
def test_a_generation_tasks_quick_evals_are_a_forward_not_a_generation():
    cfg = compose("+phase=p5_xsum", "method=bridge", "seed=42")
    decode = costs.job_work(cfg)["decode"]
    batches = math.ceil(min(costs.token_stats(cfg)["test"]["rows"], cfg.task.test_samples) / cfg.eval.batch_size)
    per_batch = int(cfg.task.max_target_tokens)
    assert decode.calls == 2 * batches * per_batch  # the bridge's summaries and the receiver's own, test items only
