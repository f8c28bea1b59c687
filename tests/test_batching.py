"""Per-device batch by model size keeps the recipe's effective batch; a bad table is one clear
error; a split with fewer rows than asked for is said, not silent."""

from __future__ import annotations

import logging

import pytest

from helpers import compose, needs_data
from telepathy import batching, data
from telepathy.config import ConfigError
from telepathy.methods import validate


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["sender=llama31_8b", "receiver=mistral7b"], (2, 8, "medium")),  # dual 7-8B: 1-2
        (["sender=llama32_1b", "receiver=qwen25_15b"], (8, 2, "small")),  # dual 1-2B: 4-8
        (["receiver=mistral7b", "method=lora"], (8, 2, "medium")),  # single 7B: 4-8
        (["sender=llama32_1b", "receiver=mistral7b"], (2, 8, "medium")),  # the larger model decides
        ([], (16, 1, "demo")),  # demo models: no cap
        (["sender=llama31_8b", "receiver=mistral7b", "batch_by_size=off"], (16, 1, None)),
    ],
)
def test_per_device_batch_follows_model_size_and_keeps_the_effective_batch(overrides, expect):
    cfg = compose("budget=paper", *overrides)
    out = batching.plan(cfg)
    assert (out["per_device"], out["grad_accum"], out["size"]) == expect
    assert out["effective"] == 16 == out["per_device"] * out["grad_accum"]
    batching.apply(cfg)
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum) == expect[:2]
    assert batching.plan(cfg) == out  # idempotent: the job re-plans the same split


def test_a_bad_batch_table_is_one_line_naming_the_key():
    cfg = compose("budget=paper", "batch_by_size.sizes.1.dual=0")
    with pytest.raises(ConfigError, match=r"batch_by_size.sizes\[1\].dual=0 is not allowed; allowed: an integer >= 1"):
        validate(cfg)


@needs_data
def test_fewer_rows_than_asked_are_logged_and_recorded(caplog):
    cfg = compose("task=xsum", "task.train_samples=1000", "task.test_samples=10")
    with caplog.at_level(logging.WARNING):
        train, test = data.load_task(cfg)
    assert len(train) == 500 and len(test) == 10
    assert "asked for 1000 rows (task.train_samples), it has 500: using all 500" in caplog.text
    assert [(s["split"], s["requested"], s["used"]) for s in data.SHORTFALLS] == [("train", 1000, 500)]


def test_a_run_that_trains_with_one_model_resident_gets_the_largest_split_that_fits():
    # before: the 8B -> 7B bridge trained 2 x 8 (the table's dual-model row), though with the sender's
    # features computed only the receiver and the bridge are on the device while it trains
    from telepathy import resources

    cfg = compose("budget=paper", "sender=llama31_8b", "receiver=mistral7b")
    out = resources.batch_plan(cfg)
    assert (out["per_device"], out["grad_accum"], out["rule"], out["table_per_device"]) == (16, 1, "memory", 2)
    assert "memory: receiver + trainable + activations" in resources.describe_batch(out)
    small = compose("budget=paper", "sender=llama31_8b", "receiver=mistral7b", "cluster.gpu_mem_gb=19")
    d = resources.batch_plan(small)["per_device"]
    bigger = min(x for x in (2, 4, 8, 16) if x > d)
    assert resources.training_gb(small, d, ["receiver"]) <= 19 < resources.training_gb(small, bigger, ["receiver"])
    # a method that says nothing of what stays resident keeps the seed's table
    table = resources.batch_plan(compose("budget=paper", "sender=llama31_8b", "receiver=mistral7b", "~method.work"))
    assert (table["per_device"], table["rule"]) == (2, "table")
    batching.apply(cfg, out)
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum) == (16, 1) and resources.batch_plan(cfg) == out


def test_the_dry_run_shows_each_training_jobs_split_and_why():
    from hydra_plugins.telepathy_launcher.launcher import batch_lines
    from telepathy import resources
    from telepathy.cluster.sweep import PlannedJob

    bridge = compose("+phase=p1_seeds", "method=bridge", "task=trec")
    zeroshot = compose("+phase=p1_seeds", "method=zeroshot", "task=trec")
    jobs = [PlannedJob(i, [], f"r{i}", "queue", resources.plan(c)) for i, c in enumerate([bridge, zeroshot])]
    assert batch_lines(jobs).strip().splitlines() == [
        "batch #0: per-device 16 x accumulation 1 = 16 (memory: receiver + trainable + activations = 20.5 GB "
        "with margin; the size table would give 2)"
    ]
