"""Bridge-training throughput with and without the sender-feature cache.

Runs the same seed sweep twice through the real entry point, in fresh output folders:

    python train.py -m seed=<seeds> cache=off                    <overrides>
    python train.py -m seed=<seeds> cache=on cache.dir=<fresh>   <overrides>

and reports, per sweep, the wall time, each run's end-to-end examples/s (training
examples seen / run time), the training loop's own examples/s (median of log.jsonl)
and the peak memory; then checks that the cached and uncached runs of each seed have
identical metrics and predictions. The first cached run computes the features and
writes them; every later run of the sweep reads them.

    python -m benchmarks.train_throughput --seeds 1,2,3 -- task.train_samples=192 trainer.max_steps=24

Results: ``<out>/result.json`` (method "train_throughput"), printed as a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from telepathy.fsutil import read_jsonl
from telepathy.results import (
    LOG_FILE,
    PREDICTIONS_FILE,
    RESULT_FILE,
    environment,
    identity_block,
    now,
    record,
    require_result,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent


def run_sweep(seeds: str, overrides: list[str], outputs: Path, cache_args: list[str]) -> float:
    """One ``train.py -m`` sweep in a subprocess; returns its wall time in seconds."""
    env = {**os.environ, "TELEPATHY_OUTPUTS": str(outputs), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "train.py", "-m", f"seed={seeds}", *cache_args, *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall


def run_stats(run_dir: Path) -> dict:
    """Per-run numbers from what train.py wrote: result.json and log.jsonl."""
    rec = require_result(run_dir)
    steps = read_jsonl(run_dir / LOG_FILE)
    loop_eps = [row["examples_per_s"] for row in steps if "examples_per_s" in row]
    seen = rec["training"]["examples_seen"]
    return {
        "seed": rec["seed"],
        "identity": rec["identity"],
        "total_s": rec["timing"]["total_s"],
        "train_s": rec["timing"]["train_s"],
        "eval_s": rec["timing"]["eval_s"],
        "examples_seen": seen,
        "end_to_end_eps": seen / rec["timing"]["total_s"],
        "train_loop_eps": statistics.median(loop_eps) if loop_eps else None,
        "peak_rss_mb": rec["memory"]["peak_rss_mb"],
        "peak_gpu_mb": rec["memory"]["peak_gpu_mb"],
        "metrics": rec["metrics"],
        "predictions": (run_dir / PREDICTIONS_FILE).read_text(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3", help="the sweep's seeds (comma-separated)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where result.json and the runs go (default: $TELEPATHY_OUTPUTS/benchmarks/...)",
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    out = args.out or Path(
        os.environ.get("TELEPATHY_OUTPUTS", "outputs")
    ) / "benchmarks" / "train_throughput" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    feature_dir = Path(tempfile.mkdtemp(prefix="features-", dir=out))  # empty: the cached sweep starts cold

    sweeps = {}
    for name, cache_args in [("uncached", ["cache=off"]), ("cached", ["cache=on", f"cache.dir={feature_dir}"])]:
        outputs = out / name
        wall = run_sweep(args.seeds, args.overrides, outputs, cache_args)
        runs = sorted(
            (run_stats(p.parent) for p in (outputs / "runs").glob(f"*/{RESULT_FILE}")), key=lambda r: r["seed"]
        )
        sweeps[name] = {"wall_s": wall, "runs": runs}

    identical = all(
        a["metrics"] == b["metrics"] and a["predictions"] == b["predictions"]
        for a, b in zip(sweeps["uncached"]["runs"], sweeps["cached"]["runs"])
    )
    identical = identical and len(sweeps["uncached"]["runs"]) == len(sweeps["cached"]["runs"])
    for sweep in sweeps.values():
        for r in sweep["runs"]:
            r.pop("predictions")
    speedup = sweeps["uncached"]["wall_s"] / sweeps["cached"]["wall_s"]
    # the runs it timed say what was trained (task, models, compression); the benchmark has no one seed
    timed = {**sweeps["cached"]["runs"][0]["identity"], "method": "train_throughput", "seed": None}
    result = record(
        "completed",
        run_id=out.name,
        run_dir=out,
        identity=identity_block(**timed),
        config={"seeds": args.seeds, "overrides": args.overrides},
        metrics={
            "uncached_sweep_s": sweeps["uncached"]["wall_s"],
            "cached_sweep_s": sweeps["cached"]["wall_s"],
            "sweep_speedup": speedup,
            "identical_metrics": identical,
            "feature_cache_mb": sum(p.stat().st_size for p in feature_dir.rglob("*.safetensors")) / 2**20,
        },
        sweeps=sweeps,
        env=environment(),
        finished_at=now(),
    )
    write_json(out / RESULT_FILE, result)

    print(
        f"\n{'sweep':<9} {'seed':>4} {'run s':>7} {'train s':>8} {'e2e ex/s':>9} {'loop ex/s':>10} "
        f"{'peak RSS MB':>12}  accuracy"
    )
    for name, sweep in sweeps.items():
        for r in sweep["runs"]:
            print(
                f"{name:<9} {r['seed']:>4} {r['total_s']:>7.1f} {r['train_s']:>8.1f} {r['end_to_end_eps']:>9.2f} "
                f"{r['train_loop_eps'] or 0:>10.2f} {r['peak_rss_mb']:>12.0f}  {r['metrics']['accuracy']:.4f}"
            )
        print(f"{name:<9} sweep wall time {sweep['wall_s']:.1f}s")
    print(f"speedup (uncached / cached sweep): {speedup:.2f}x; identical metrics and predictions: {identical}")
    print(f"result: {out / RESULT_FILE}")


if __name__ == "__main__":
    main()
