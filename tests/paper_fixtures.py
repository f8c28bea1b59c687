"""Synthetic records folders in the layout ``scripts/paper.py tables`` writes and
``telepathy.analysis.paper`` reads (index.json, plan.json, runs/, latency/), with values the tests choose."""

from __future__ import annotations

import json
from pathlib import Path

from analysis_fixtures import write_run

# a P1 bridge's per-item correctness for seeds 1..3 (40 items): 0.75, 0.70, 0.80 accuracy
N_ITEMS = 40
P1_BRIDGE = {1: 30, 2: 28, 3: 32}
REFERENCE = ("smollm2_135m", "gemma3_270m")
OTHER = ("gemma3_270m", "smollm2_135m")


def _correct(n_right: int, n: int = N_ITEMS, shift: int = 0) -> list[int]:
    return [1 if (i + shift) % n < n_right else 0 for i in range(n)]


def _patch(run_dir: Path, **blocks) -> Path:
    """Add top-level blocks (probe, latency, attempts, ...) to a written result.json."""
    path = Path(run_dir) / "result.json"
    rec = json.loads(path.read_text())
    rec.update(blocks)
    path.write_text(json.dumps(rec, indent=1))
    return run_dir


def _span(minute: int, seconds: int) -> dict:
    start = f"2026-01-01T10:{minute:02d}:00+00:00"
    end = f"2026-01-01T10:{minute + seconds // 60:02d}:{seconds % 60:02d}+00:00"
    return {"started_at": start, "finished_at": end, "total_s": float(seconds)}


def _attempt(minute: int, seconds: int) -> list[dict]:
    span = _span(minute, seconds)
    return [{"status": "completed", "started_at": span["started_at"], "finished_at": span["finished_at"]}]


def _run(root: Path, name: str, minute: int, seconds: int = 60, **kwargs) -> Path:
    span = _span(minute, seconds)
    run_dir = write_run(root, name=name, timing=span, attempts=_attempt(minute, seconds), **kwargs)
    return _patch(run_dir, finished_at=span["finished_at"])


def write_records(records: Path) -> Path:
    """Every phase of the paper at scale ``demo``: P1 (bridge x 3 seeds, text relay), P2 (probes of two
    models at two depths), P3 (P1's bridge, LLMLingua), P4 (2 x 2 latency cells), P5 (bridge x 2 seeds and
    a zero-shot on XSum, ROUGE) and P6 (the reference pair and its reverse, 2 seeds each)."""
    records = Path(records)
    runs = records / "runs"
    phases: dict[str, list[str]] = {}

    def listed(phase: str, rel: str) -> None:
        phases.setdefault(f"demo/{phase}", []).append(rel)

    sender, receiver = REFERENCE
    pair = {"sender": sender, "receiver": receiver}
    for seed, right in P1_BRIDGE.items():
        name = f"sst2-bridge-ref-s{seed}"
        _run(
            runs,
            name,
            minute=seed,
            seed=seed,
            metrics={"accuracy": right / N_ITEMS, "majority_accuracy": 0.5},
            correct=_correct(right, shift=seed),
            shuffled=_correct(N_ITEMS // 2, shift=seed),
            **pair,
        )
        for phase in ("p1_seeds", "p3_baselines", "p6_ablations"):
            listed(phase, f"runs/{name}")
    _run(
        runs,
        "sst2-text_relay",
        minute=5,
        method="text_relay",
        seed=1,
        compression=None,
        metrics={"accuracy": 0.6, "majority_accuracy": 0.5},
        correct=_correct(24),
        **pair,
    )
    listed("p1_seeds", "runs/sst2-text_relay")
    _run(
        runs,
        "sst2-llmlingua",
        minute=6,
        method="llmlingua",
        seed=1,
        compression=None,
        metrics={"accuracy": 0.55, "majority_accuracy": 0.5},
        correct=_correct(22),
        **pair,
    )
    listed("p3_baselines", "runs/sst2-llmlingua")
    for seed in (1, 2):  # P6: the reverse pair, a little worse
        name = f"sst2-bridge-other-s{seed}"
        _run(
            runs,
            name,
            minute=7 + seed,
            seed=seed,
            sender=OTHER[0],
            receiver=OTHER[1],
            metrics={"accuracy": 0.6, "majority_accuracy": 0.5},
            correct=_correct(24, shift=seed),
            shuffled=_correct(N_ITEMS // 2, shift=seed),
        )
        listed("p6_ablations", f"runs/{name}")
    # P2: one probe run per model, two layers each
    for model, blocks, accs in (("smollm2_135m", 30, (0.7, 0.8)), ("gemma3_270m", 18, (0.65, 0.9))):
        name = f"sst2-probe-{model}"
        layers = [blocks // 2, blocks - 1]
        metrics = {"accuracy": max(accs), "n_test": N_ITEMS, "majority_accuracy": 0.5, "reported_layer": layers[1]}
        metrics.update({f"layer_{la}_accuracy": a for la, a in zip(layers, accs)})
        run_dir = _run(
            runs, name, minute=10, method="linear_probe", seed=42, compression=None, metrics=metrics, sender=model
        )
        _patch(run_dir, probe={"model": model, "num_layers": blocks, "layers": layers, "reported_layer": layers[1]})
        listed("p2_probes", f"runs/{name}")
    # P4: compression {4, 8} x batch {1, 4}; the relay is 3x (batch 1) or 10x (batch 4) slower than the bridge
    for comp in (4, 8):
        for batch in (1, 4):
            cell = records / "latency" / f"c{comp}-b{batch}"
            for path, p50 in (("bridge", 100.0), ("text_relay", 300.0 if batch == 1 else 1000.0), ("direct", 50.0)):
                run_dir = _run(
                    cell,
                    path,
                    minute=12,
                    method="latency",
                    seed=0,
                    compression=comp,
                    num_latents=16 // comp,
                    metrics={"p50_ms": p50, "p99_ms": 2 * p50, "throughput_eps": 1000.0 * batch / p50},
                    config_extra={"path": path, "batch_size": batch},
                    **pair,
                )
                _patch(
                    run_dir,
                    latency={
                        "bridge_trained": comp == 8,
                        "num_latents": 16 // comp,
                        "iterations": 3,
                        "torch_threads": 2,
                    },
                )
            (cell / "summary.json").write_text("{}")
            listed("p4_latency", f"latency/c{comp}-b{batch}")
    # P5: XSum, the bridge on two seeds, the receiver's zero-shot
    for seed, score in ((1, 0.20), (2, 0.24)):
        name = f"xsum-bridge-s{seed}"
        rouge = {m: score * f for m, f in (("rouge1", 1.5), ("rouge2", 0.5), ("rougeL", 1.0))}
        _run(runs, name, minute=13, task="xsum", seed=seed, metrics=rouge, **pair)
        _items(runs / name, score)
        listed("p5_xsum", f"runs/{name}")
    rouge = {"rouge1": 0.15, "rouge2": 0.03, "rougeL": 0.1}
    rouge.update(
        {f"{m}_ci_{s}": v * (0.8 if s == "low" else 1.2) for m, v in list(rouge.items()) for s in ("low", "high")}
    )
    _run(
        runs,
        "xsum-zeroshot",
        minute=14,
        task="xsum",
        method="zeroshot",
        seed=1,
        compression=None,
        metrics=rouge,
        **pair,
    )
    _items(runs / "xsum-zeroshot", 0.1)
    listed("p5_xsum", "runs/xsum-zeroshot")
    index = {
        "scale": "demo",
        "slice": False,
        "cluster": "paper_demo",
        "launches": [
            {
                "started_at": "2026-01-01T09:59:00+0000",
                "command": "python scripts/paper.py --scale demo",
                "overrides": [],
                "load_average": [1.0, 1.0, 1.0],
                "tables_job": "99",
            }
        ],
        "phases": phases,
        "revisions": ["abc123"],
        "machine": {"hostname": "test", "cpu": "test CPU", "cores": 2, "memory_gb": 8.0},
        "collected_at": "2026-01-01T10:30:00+0000",
        "load_average_at_collect": [1.0, 1.0, 1.0],
    }
    (records / "index.json").write_text(json.dumps(index, indent=1))
    plan = {
        "makespan_s": 1200.0,
        "makespan_range_s": {"low": 900.0, "high": 1800.0},
        "calibration": [],
        "jobs": [
            {
                "phase": "demo/p1_seeds",
                "run_dir": f"/x/runs/sst2-bridge-ref-s{s}",
                "start_s": 60.0 * s,
                "predicted_s": 90.0,
            }
            for s in P1_BRIDGE
        ],
    }
    (records / "plan.json").write_text(json.dumps(plan, indent=1))
    return records


def _items(run_dir: Path, score: float) -> None:
    """predictions.jsonl of an XSum run: per-article ROUGE around ``score`` (and the shuffled-sender control)."""
    with open(run_dir / "predictions.jsonl", "w") as f:
        for i in range(N_ITEMS):
            value = score + 0.05 * ((i % 5) - 2) / 2
            row = {"idx": i, "id": f"xsum-{i}", "rouge1": 1.5 * value, "rouge2": 0.5 * value, "rougeL": value}
            row.update({f"{m}_shuffled_sender": 0.5 * v for m, v in list(row.items()) if m.startswith("rouge")})
            f.write(json.dumps(row) + "\n")
