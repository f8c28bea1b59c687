"""Does the calibrated cost model predict real runs? Calibrate on one real demo-pair run, predict others.

    python -m benchmarks.cpu_prediction --out outputs/cpu_prediction [-- overrides for every run]

Runs ``train.py`` (the demo pair, real weights, on this CPU) once as the *calibration* run A, then,
for each of ``RUNS`` (another task, seed and step count), predicts its seconds per stage with
``costs.predict(cfg, "cpu", calibration from A)`` **before** running it, runs it, and compares with
what its result.json measured: ``train`` (``timing.train_s``), ``eval`` (``eval_s``: evaluation and
decoding) and ``prep`` (the rest of ``total_s``: loading and the sender's features). The target is
every stage within +-30 %. Machine load changes CPU timings: the load average is printed with every
run, and A and the others should run on an equally loaded (best: idle) machine.
Output: the table and ``<out>/cpu_prediction.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from telepathy.cluster import costs
from telepathy.results import RESULT_FILE, write_json

REPO = Path(__file__).resolve().parent.parent
# a short demo budget; cache off: every run computes its sender features, so "prep" is measured, not a cache read
SHORT = (
    "task.train_samples=240 task.test_samples=60 trainer.eval_every=0 eval.receiver_zeroshot=false cache=off".split()
)
CALIBRATION = ["task=sst2", "seed=1", "trainer.max_steps=30"]
RUNS = [
    ["task=trec", "seed=2", "trainer.max_steps=30"],
    ["task=agnews", "seed=3", "trainer.max_steps=20"],
    ["task=sst2", "seed=4", "trainer.max_steps=60"],
]


def run(overrides: list[str], out: Path) -> dict:
    env = {**os.environ, "TELEPATHY_OUTPUTS": str(out), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    found = sorted((out / "runs").glob(f"*/{RESULT_FILE}"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())


def measured(record: dict) -> dict:
    t = record["timing"]
    train, evaluate = float(t.get("train_s") or 0), float(t.get("eval_s") or 0)
    return {"train": train, "eval": evaluate, "prep": float(t["total_s"]) - train - evaluate}


def predicted(pred) -> dict:
    s = pred.seconds
    return {
        "train": s.get("train", 0.0),
        "eval": s.get("eval", 0.0) + s.get("decode", 0.0),
        "prep": s.get("load", 0.0) + s.get("features", 0.0),
    }


def compose(overrides: list[str]):
    from benchmarks.label_scoring import compose as train_compose

    return train_compose(overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/cpu_prediction"))
    parser.add_argument("overrides", nargs="*", help="added to every run (default: a short demo budget)")
    args = parser.parse_args(argv)
    common = SHORT + list(args.overrides)
    load = [os.getloadavg()]
    a = run(common + CALIBRATION, args.out / "a")
    load.append(os.getloadavg())
    cal = costs.Calibration()
    costs.calibrate_from_record(cal, a)
    rows = []
    for overrides in RUNS:
        pred = predicted(costs.predict(compose(common + overrides), "cpu", cal))  # before the run
        record = run(common + overrides, args.out / "b")
        load.append(os.getloadavg())
        got = measured(record)
        rows.append({"run": " ".join(overrides), "predicted_s": pred, "measured_s": got, "load": load[-1]})
    lines = [
        f"calibrated on: {' '.join(CALIBRATION)} (measured {measured(a)})",
        "| run | stage | predicted s | measured s | predicted / measured |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    for r in rows:
        for stage in ("prep", "train", "eval"):
            p, m = r["predicted_s"][stage], r["measured_s"][stage]
            ratio = p / m if m else float("nan")
            worst = max(worst, abs(ratio - 1))
            lines.append(f"| {r['run']} | {stage} | {p:.1f} | {m:.1f} | {ratio:.2f} |")
    lines.append(f"worst stage error {worst:.0%} (target 30 %); load averages (1, 5, 15 min) per run: {load}")
    print("\n".join(lines))
    write_json(args.out / "cpu_prediction.json", {"calibration": measured(a), "rows": rows, "load": load})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
