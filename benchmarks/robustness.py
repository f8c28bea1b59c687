"""Does a short bridge run learn on every seed and thread count? The collapse table.

    python -m benchmarks.robustness --out outputs/robustness [--seeds 42,1,2,3,4] [--threads 1,2] [--jobs 1]
        [-- overrides]

Runs ``train.py seed=S <overrides>`` once per (OMP_NUM_THREADS, seed), each thread
count in its own output folder (the thread count is not part of a run's id), then
reads every run's result.json and predictions.jsonl and prints one row per run and
the collapse rate. The default overrides are the learning test's budget
(tests/test_learning.py). A run *collapsed* when its readout answers a single class
or its accuracy is below majority + ``--margin``: a float-luck collapse shows up as
a seed or thread count that lands on the majority rate.

``--jobs N`` runs N of them at once (each keeps its own OMP_NUM_THREADS: the thread count
decides the float summation order, not the speed). Runs that already completed are
skipped by train.py, so an interrupted table
resumes. The collapse columns come from the predictions, so the table also reads
runs made before result.json carried ``bridge.diagnostics`` (then no cosine).
Output: the table on stdout and ``<out>/robustness.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

from telepathy.results import write_json

REPO = Path(__file__).resolve().parent.parent

TEST_BUDGET = [
    "task.train_samples=480",
    "task.test_samples=120",
    "trainer.max_steps=60",
    "trainer.lr=1e-3",
    "trainer.eval_every=0",
    "eval.receiver_zeroshot=false",
]


def run_one(out: Path, threads: int, seed: int, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TELEPATHY_OUTPUTS": str(out / f"threads{threads}")}
    log = out / f"threads{threads}-seed{seed}.log"
    with open(log, "w") as f:
        code = subprocess.call(
            [sys.executable, "train.py", f"seed={seed}", *overrides],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        print(f"threads={threads} seed={seed} exited {code}; see {log}", file=sys.stderr)


def row(run_dir: Path, threads: int, margin: float) -> dict:
    """One run's numbers and whether it collapsed, from its own files."""
    record = json.loads((run_dir / "result.json").read_text())
    m = record["metrics"]
    preds = [json.loads(line)["pred"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    classes = len({p for p in preds if p >= 0})
    diag = record.get("bridge", {}).get("diagnostics", {})
    return {
        "threads": threads,
        "seed": record["seed"],
        "accuracy": m["accuracy"],
        "majority": m["majority_accuracy"],
        "margin": m["accuracy"] - m["majority_accuracy"],
        "predicted_classes": classes,
        "soft_token_cosine": diag.get("soft_token_cosine_mean"),
        "final_loss": record["training"]["final_loss"],
        "collapsed": classes <= 1 or m["accuracy"] < m["majority_accuracy"] + margin,
        "run_dir": str(run_dir),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| threads | seed | accuracy | majority | margin | classes | soft-token cosine | collapsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cos = "-" if r["soft_token_cosine"] is None else f"{r['soft_token_cosine']:.3f}"
        lines.append(
            f"| {r['threads']} | {r['seed']} | {r['accuracy']:.3f} | {r['majority']:.3f} | "
            f"{r['margin']:+.3f} | {r['predicted_classes']} | {cos} | {'yes' if r['collapsed'] else 'no'} |"
        )
    n = sum(r["collapsed"] for r in rows)
    lines.append(f"\ncollapsed: {n}/{len(rows)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/robustness"))
    ap.add_argument("--seeds", default="42,1,2,3,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--margin", type=float, default=0.1, help="collapsed below majority + margin")
    ap.add_argument("--table-only", action="store_true", help="read the runs already in --out, run nothing")
    ap.add_argument("overrides", nargs="*", help="train.py overrides (default: the learning test's budget)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = args.overrides or TEST_BUDGET
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if not args.table_only:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda ts: run_one(out, *ts, overrides), [(t, s) for t in threads for s in seeds]))
    rows = [
        row(d, t, args.margin)
        for t in threads
        for d in sorted((out / f"threads{t}" / "runs").glob("*/"))
        if (d / "predictions.jsonl").exists()
    ]
    rows.sort(key=lambda r: (r["threads"], seeds.index(r["seed"]) if r["seed"] in seeds else r["seed"]))
    write_json(out / "robustness.json", {"overrides": overrides, "margin": args.margin, "runs": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
