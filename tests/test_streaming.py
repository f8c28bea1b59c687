"""A feature set larger than the RAM budget: streamed through the cache, peak RSS stays
bounded; held in RAM (``cache.mode=off``, what the cache did before it streamed), it does not.
Each mode runs in its own process (benchmarks/feature_memory.py; peak RSS only grows)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import REPO, run_env
from telepathy.bridge import PerceiverBridge

RAM_BUDGET_MB = 80  # what the feature path may add to the process; the feature set is 3x that
SIZE = ["--examples", "960", "--tokens", "64", "--hidden", "1024"]  # 240 MB of float32 features


def _measure(mode: str, tmp_path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.feature_memory", "--mode", mode, *SIZE, "--cache-dir", str(tmp_path / mode)],
        cwd=REPO,
        env=run_env(tmp_path, OMP_NUM_THREADS=1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_features_keep_peak_rss_within_the_budget(tmp_path):
    stream, ram = _measure("stream", tmp_path), _measure("ram", tmp_path)
    assert stream["feature_mb"] == ram["feature_mb"] >= 3 * RAM_BUDGET_MB
    assert stream["growth_mb"] < RAM_BUDGET_MB, stream
    assert ram["growth_mb"] > stream["feature_mb"], ram  # in RAM, the whole set (and more) is resident


def test_streaming_statistics_equal_the_in_memory_ones():
    torch.manual_seed(0)
    states = [torch.randn(int(n), 8) * 50 + 1000 for n in torch.randint(1, 40, (300,))]  # massive-activation scale
    bridge = PerceiverBridge(8, 4, num_latents=2, dim=8, depth=1, heads=2)
    bridge.set_input_stats(states)
    flat = torch.cat(states).double()
    torch.testing.assert_close(bridge.in_mean, flat.mean(0).float())
    torch.testing.assert_close(bridge.in_std, flat.std(0).float())


def test_host_ram_request_counts_features_only_when_they_are_held_in_memory():
    from helpers import compose
    from telepathy import resources

    paper = ["budget=paper", "sender=llama31_8b", "receiver=mistral7b", "task=agnews"]
    streamed = compose(*paper)
    in_ram = compose(*paper, "cache=off")
    weights_only = 1.2 * (8.03e9 + 7.25e9) * 2 / 2**30 + resources.HOST_BASE_GB
    assert resources.host_ram_gb(streamed) == pytest.approx(weights_only)
    # AG News from the hub held in RAM: 127,600 prompts x 128 tokens x 4096 x bf16, twice: ~250 GB more
    assert resources.host_ram_gb(in_ram) - weights_only == pytest.approx(2 * 127600 * 128 * 4096 * 2 / 2**30)
    assert resources.plan(streamed).mem_gb == math.ceil(weights_only)  # the request is the estimate
    assert resources.plan(in_ram).mem_gb >= 280
