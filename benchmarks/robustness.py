"""Does a short bridge run learn on every seed, CPU kernel, thread count and micro-batch? The collapse table.

    python -m benchmarks.robustness --out outputs/robustness [--seeds 42,1,2,3,4] [--threads 1,2]
        [--kernels default,avx2] [--micro 8,2] [-- overrides]

Runs ``train.py seed=S <overrides>`` once per cell (threads x kernel x micro-batch) and seed, each
cell in its own output folder (``t1-avx2-mb2``: the thread count and the kernel are not part of a
run's id), then reads every run's result.json and predictions.jsonl and prints one row per run
and the collapse rate. The default overrides are the learning test's budget (tests/test_learning.py).

The cells are what changes float summation order, and so, for a fragile recipe, whether a short
run learns (issue 20: CI's AMD EPYC with AVX-512 collapsed where an AVX2 machine learned):
- ``--threads``: OMP_NUM_THREADS of the run;
- ``--kernels``: ``default`` is the machine's own (``torch.backends.cpu.get_cpu_capability()``);
  ``avx2`` sets ATEN_CPU_CAPABILITY=avx2 (torch's own kernels), MKL_ENABLE_INSTRUCTIONS=AVX2 (its
  matrix products) and ONEDNN_MAX_CPU_ISA=AVX2, as on a machine without AVX-512;
- ``--micro``: the per-device batch (the effective batch, ``trainer.batch_size``, is kept by
  gradient accumulation: ``resources.max_per_device``), as a smaller GPU would split it.

A run *collapsed* (did not learn) when its readout answers a single class or its accuracy is below
the test split's majority rate (the record's ``majority_accuracy``) + ``--margin`` (the floor of
docs/results.md). Runs of one
thread go ``cores`` at a time, runs of two threads half as many (two 2-thread runs on 2 cores
spin-wait each other); completed runs are skipped by train.py, so an interrupted table resumes.
Output: the table on stdout and ``<out>/robustness.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from telepathy.fsutil import read_jsonl
from telepathy.results import PREDICTIONS_FILE, require_result, write_json

REPO = Path(__file__).resolve().parent.parent

TEST_BUDGET = [
    "task.train_samples=480",
    "task.test_samples=120",
    "trainer.max_steps=120",
    "trainer.lr=1e-3",
    "trainer.eval_every=0",
    "eval.receiver_zeroshot=false",
]
KERNELS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def cell_name(threads: int, kernel: str, micro: int) -> str:
    return f"t{threads}-{kernel}-mb{micro}"


def micro_override(micro: int) -> str:
    """The per-device cap that splits the effective batch into micro-batches of ``micro``."""
    return f"resources.max_per_device={micro}"


def run_one(out: Path, threads: int, kernel: str, micro: int, seed: int, overrides: list[str]) -> None:
    cell = cell_name(threads, kernel, micro)
    env = {
        **os.environ,
        **KERNELS[kernel],
        "OMP_NUM_THREADS": str(threads),
        "TELEPATHY_OUTPUTS": str(out / cell),
    }
    log = out / f"{cell}-seed{seed}.log"
    with open(log, "w") as f:
        code = subprocess.call(
            [sys.executable, "train.py", f"seed={seed}", *overrides, micro_override(micro)],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        print(f"{cell} seed={seed} exited {code}; see {log}", file=sys.stderr)


def row(run_dir: Path, cell: str, margin: float) -> dict:
    """One run's numbers and whether it collapsed, from its own files."""
    record = require_result(run_dir)
    m = record["metrics"]
    preds = read_jsonl(run_dir / PREDICTIONS_FILE)
    classes = len({p["pred"] for p in preds if p["pred"] >= 0})
    majority = max(Counter(p["label"] for p in preds).values()) / len(preds)  # the test split's majority rate
    diag = record.get("bridge", {}).get("diagnostics", {})
    return {
        "cell": cell,
        "threads": record["env"].get("cpu_threads"),
        "kernel": record["env"].get("cpu_capability"),
        "micro": record["batch"]["per_device"],
        "seed": record["seed"],
        "accuracy": m["accuracy"],
        "majority": majority,
        "margin": m["accuracy"] - majority,
        "predicted_classes": classes,
        "soft_token_cosine": diag.get("soft_token_cosine_mean"),
        "final_loss": record["training"]["final_loss"],
        "collapsed": classes <= 1 or m["accuracy"] < majority + margin,
        "run_dir": str(run_dir),
    }


def table(rows: list[dict]) -> str:
    head = ["threads", "kernel", "micro-batch", "seed", "accuracy", "majority", "margin", "classes"]
    head += ["soft-token cosine", "collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cos = "-" if r["soft_token_cosine"] is None else f"{r['soft_token_cosine']:.3f}"
        lines.append(
            f"| {r['threads']} | {r['kernel']} | {r['micro']} | {r['seed']} | {r['accuracy']:.3f} | "
            f"{r['majority']:.3f} | {r['margin']:+.3f} | {r['predicted_classes']} | {cos} | "
            f"{'yes' if r['collapsed'] else 'no'} |"
        )
    n = sum(r["collapsed"] for r in rows)
    smallest = min(rows, key=lambda r: r["margin"]) if rows else None
    lines.append(f"\ncollapsed: {n}/{len(rows)}")
    if smallest:
        lines.append(f"smallest margin: {smallest['margin']:+.3f} ({smallest['cell']}, seed {smallest['seed']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/robustness"))
    ap.add_argument("--seeds", default="42,1,2,3,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--kernels", default="default,avx2", help=f"of {', '.join(KERNELS)}")
    ap.add_argument("--micro", default="8,2", help="per-device batches (the effective batch is kept)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the runs share")
    ap.add_argument("--margin", type=float, default=0.1, help="collapsed below the test majority rate + margin")
    ap.add_argument("--table-only", action="store_true", help="read the runs already in --out, run nothing")
    ap.add_argument("overrides", nargs="*", help="train.py overrides (default: the learning test's budget)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = args.overrides or TEST_BUDGET
    seeds = [int(s) for s in args.seeds.split(",")]
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        ap.error(f"--kernels {','.join(unknown)} is not allowed; allowed: {', '.join(KERNELS)}")
    cells = [(int(t), k, int(mb)) for t in args.threads.split(",") for k in kernels for mb in args.micro.split(",")]
    if not args.table_only:
        for threads in sorted({t for t, _, _ in cells}):
            jobs = max(1, args.cores // threads)
            todo = [(t, k, mb, s) for t, k, mb in cells if t == threads for s in seeds]
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                list(pool.map(lambda job: run_one(out, *job, overrides), todo))
    rows = [
        row(d, cell_name(*c), args.margin)
        for c in cells
        for d in sorted((out / cell_name(*c) / "runs").glob("*/"))
        if (d / PREDICTIONS_FILE).exists()
    ]
    order = {cell_name(*c): i for i, c in enumerate(cells)}
    rows.sort(key=lambda r: (order[r["cell"]], seeds.index(r["seed"]) if r["seed"] in seeds else r["seed"]))
    write_json(out / "robustness.json", {"overrides": overrides, "margin": args.margin, "runs": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
