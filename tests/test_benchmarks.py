"""The benchmarks run end to end on tiny models and write results the analysis code reads.
No timing thresholds: benchmarks report numbers, tests check that they are well formed."""

from __future__ import annotations

import json
import math

from helpers import TINY, needs_data, run_script
from telepathy.analysis import load_runs

LATENCY_TINY = [*TINY, "iterations=2", "warmup_batches=1", "relay.max_new_tokens=3"]


@needs_data
def test_latency_writes_one_valid_record_per_path(tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_script(
        "-m benchmarks.latency",
        *LATENCY_TINY,
        "batch_size=2",
        "num_inputs=3",  # 2 iterations x batch 2 = 4 timed inputs from 3 distinct ones: cycled
        "answer=generate",
        "answer_tokens=2",
        outputs=outputs,
    )
    assert "UNTRAINED bridge" in proc.stdout and "text_relay/bridge" in proc.stdout
    records = [json.loads(p.read_text()) for p in sorted((outputs / "benchmarks" / "latency").rglob("result.json"))]
    assert sorted(r["config"]["path"] for r in records) == ["bridge", "direct", "text_relay"]
    for r in records:
        assert r["method"] == "latency" and r["status"] == "completed"
        assert r["config"]["batch_size"] == 2 and r["config"]["compression"] == 8
        assert r["identity"] == {
            "task": "sst2",
            "method": "latency",
            "sender": r["config"]["sender"]["name"],
            "receiver": r["config"]["receiver"]["name"],
            "compression": 8,
            "num_latents": r["latency"]["num_latents"],
            "layer": r["config"]["sender"]["layer"],
            "model": None,
            "seed": r["config"]["seed"],
        }
        m = r["metrics"]
        assert m["n_examples"] == 4 and m["n_batches"] == 2
        assert {k: r["latency"][k] for k in ("iterations", "distinct_inputs", "inputs_reused")} == {
            "iterations": 2,
            "distinct_inputs": 3,
            "inputs_reused": True,
        }
        assert 0 < m["p50_ms"] <= m["p90_ms"] <= m["p99_ms"]
        assert m["throughput_eps"] > 0 and math.isfinite(m["throughput_eps"])
        assert r["latency"]["bridge_trained"] is False
        assert r["latency"]["mean_relay_message_tokens"] <= 3
    bridge = next(r for r in records if r["config"]["path"] == "bridge")
    shares = [v for k, v in bridge["metrics"].items() if k.endswith("_share")]
    assert {"sender_share", "bridge_share", "receiver_share"} <= set(bridge["metrics"])
    assert 0.5 < sum(shares) <= 1.0 + 1e-6  # the stages account for (almost) all of the call
    # the analysis code sees one latency run per path with its batch size and compression
    runs = load_runs(outputs / "benchmarks" / "latency")
    assert sorted(runs["path"]) == ["bridge", "direct", "text_relay"]
    assert set(runs["method"]) == {"latency"} and set(runs["batch_size"]) == {2}
    assert set(runs["compression"]) == {8.0}


@needs_data
def test_latency_loads_a_trained_bridge_checkpoint(tmp_path):
    """A train.py run's checkpoint is what the bridge path times."""
    from helpers import run_train

    run_train(*TINY, "trainer.max_steps=2", f"cache.dir={tmp_path / 'features'}", outputs=tmp_path / "train")
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    outputs = tmp_path / "outputs"
    proc = run_script(
        "-m benchmarks.latency",
        *LATENCY_TINY,
        "iterations=1",
        "batch_size=4",
        f"bridge_checkpoint={run_dir}",
        outputs=outputs,
    )
    assert "trained bridge" in proc.stdout and "UNTRAINED" not in proc.stdout
    summary = json.loads(next((outputs / "benchmarks" / "latency").rglob("summary.json")).read_text())
    assert summary["info"]["bridge_trained"] and "step_00000002" in summary["info"]["bridge_checkpoint"]
    # 1 iteration x batch 4 = 4 distinct inputs: none reused
    assert (summary["info"]["iterations"], summary["info"]["distinct_inputs"]) == (1, 4)
    assert summary["info"]["inputs_reused"] is False and summary["paths"]["bridge"]["n_batches"] == 1


@needs_data
def test_train_throughput_reports_identical_cached_and_uncached_runs(tmp_path):
    out = tmp_path / "bench"
    run_script(
        "-m benchmarks.train_throughput",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--",
        *TINY,
        "trainer.max_steps=2",
        "eval.receiver_zeroshot=false",
        outputs=tmp_path / "outputs",
    )
    record = json.loads((out / "result.json").read_text())
    assert record["method"] == "train_throughput"
    assert record["metrics"]["identical_metrics"] is True
    assert record["metrics"]["feature_cache_mb"] > 0
    for name in ("uncached", "cached"):
        (run,) = record["sweeps"][name]["runs"]
        assert run["examples_seen"] == 2 * 4 and run["end_to_end_eps"] > 0 and run["peak_rss_mb"] > 0
