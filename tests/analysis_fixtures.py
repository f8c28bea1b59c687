"""Synthetic run directories in the result.json / predictions.jsonl / log.jsonl
layout of docs/ARCHITECTURE.md, with values the tests choose."""

import hashlib
import json
from pathlib import Path

from telepathy.results import identity_block


def write_run(
    root,
    task="sst2",
    method="bridge",
    seed=0,
    metrics=None,
    status="completed",
    compression=4,
    sender="tiny-sender",
    receiver="tiny-receiver",
    layer=-1,
    num_latents=None,
    correct=None,
    log=None,
    reused_from=None,
    error=None,
    timing=None,
    memory=None,
    resources=None,
    config_extra=None,
    name=None,
    attempts=None,
    shuffled=None,
    flags=None,
    git_rev="abc123",
    measured=None,
):
    """Write one run directory and return its path.

    correct: list of 0/1 per test item -> predictions.jsonl (item ids shared across runs).
    shuffled: list of 0/1 per item -> the shuffled-sender control's ``correct_shuffled_sender``.
    flags: the bridge run's ``bridge.flags``; git_rev: ``env.git_rev``; measured: the bridge's measured ×.
    log: list of dicts -> log.jsonl.
    """
    has_bridge = method == "bridge"
    # like conf/method/*.yaml: which models and parts a method uses
    models = ["receiver"] if method == "receiver_only" else ["sender", "receiver"]
    config = {
        "seed": seed,
        "task": {"name": task},
        "method": {"name": method, "models": models, "uses": ["bridge"] if has_bridge else []},
        "sender": {"name": sender, "layer": layer},
        "receiver": {"name": receiver},
        "compression": 8 if compression is None else compression,  # every config has one
    }
    for k, v in (config_extra or {}).items():
        config[k] = v
    name = name or f"{task}-{method}-c{compression}-s{seed}"
    run_dir = Path(root) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = {
        "schema_version": 1,
        "run_id": name,
        "run_dir": str(run_dir),
        "status": status,
        "method": method,
        "task": task,
        "seed": seed,
        # as telepathy/results.py writes it: compression and M only where soft tokens are read
        # (the bridge, the latency benchmark), a role only where the method loads it
        "identity": identity_block(
            task=task,
            method=method,
            seed=seed,
            sender=sender if "sender" in models else None,
            receiver=receiver,
            layer=layer if "sender" in models else None,
            compression=compression if method in ("bridge", "latency") else None,
            num_latents=(num_latents or 8) if method in ("bridge", "latency") else None,
        ),
        "config": config,
        # like telepathy/lifecycle.py: the config's hash without its seed
        "seedless_hash": hashlib.sha256(
            json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True).encode()
        ).hexdigest()[:8],
        "overrides": [f"task={task}", f"method={method}", f"seed={seed}"],
        "metrics": metrics if metrics is not None else {},
        "params": {"trainable": 1000 if has_bridge else 0},
        "timing": timing
        or {
            "train_s": 10.0,
            "eval_s": 2.0,
            "total_s": 12.0,
            "started_at": "2026-01-01T00:00:00",
            "finished_at": "2026-01-01T00:00:12",
        },
        "memory": memory or {"peak_rss_mb": 900.0, "peak_gpu_mb": 0.0},
        "resources": resources or {"gpus": 0, "mem_gb": 8, "cpus": 2, "estimate_gb": 1.0, "placement": "cpu"},
        "env": {
            "git_rev": git_rev,
            "git_dirty": False,
            "hostname": "test",
            "device": "cpu",
            "python": "3.11",
            "packages": {"torch": "2.13"},
            "slurm_job_id": None,
        },
        "reused_from": str(reused_from) if reused_from else None,
        "error": error,
    }
    if attempts is not None:
        rec["attempts"] = attempts
    if has_bridge:
        rec["bridge"] = {
            "num_latents": num_latents or 8,
            "compression_factor": compression,
            "mean_sender_tokens": 32.0,
            "compression_ratio": 32.0 / (num_latents or 8),
            # 20 text tokens per item: what the sender read, per soft token
            "text_tokens_mean": 20.0,
            "measured_compression_mean": measured if measured is not None else 20.0 / (num_latents or 8),
            "flags": list(flags or []),
        }
    (run_dir / "result.json").write_text(json.dumps(rec, indent=1))
    if correct is not None:
        with open(run_dir / "predictions.jsonl", "w") as f:
            for i, c in enumerate(correct):
                f.write(
                    json.dumps(
                        {
                            "idx": i,
                            "id": f"{task}-{i}",
                            "label": 1,
                            "pred": 1 if c else 0,
                            "correct": bool(c),
                            "scores": [0.1, 0.9],
                            **({"correct_shuffled_sender": bool(shuffled[i])} if shuffled is not None else {}),
                        }
                    )
                    + "\n"
                )
    if log is not None:
        with open(run_dir / "log.jsonl", "w") as f:
            for r in log:
                f.write(json.dumps(r) + "\n")
    return run_dir


def training_log(steps=10, final_eval=0.7):
    rows = [
        {"step": s, "loss": 2.0 / (s + 1), "lr": 1e-3, "grad_norm": 1.0, "examples_per_s": 50.0}
        for s in range(1, steps + 1)
    ]
    rows.append({"step": steps // 2, "eval_accuracy": final_eval / 2})
    rows.append({"step": steps, "eval_accuracy": final_eval})
    return rows


def write_sweep(root, n_items=40):
    """A small sweep: 2 tasks x (bridge at c=2,4,8; text_relay; deterministic
    receiver_only) x 3 seeds, with predictions and logs, one failed run and one
    run that died before writing result.json. Returns the runs dir."""
    root = Path(root)
    acc_bridge = {2: 0.80, 4: 0.75, 8: 0.65}
    for task, shift in (("sst2", 0.0), ("agnews", -0.1)):
        for seed in (0, 1, 2):
            for c, acc in acc_bridge.items():
                a = acc + shift + 0.01 * seed
                k = round(a * n_items)
                write_run(
                    root,
                    task,
                    "bridge",
                    seed,
                    {"accuracy": k / n_items, "macro_f1": k / n_items - 0.02, "n_test": n_items},
                    compression=c,
                    correct=[1] * k + [0] * (n_items - k),
                    log=training_log(final_eval=k / n_items),
                )
            # deterministic receiver_only: seed 0 runs, seeds 1 and 2 reuse it
            src = root / f"{task}-receiver_only-cNone-s0"
            for method, acc, reused in (
                ("text_relay", 0.6 + shift + 0.02 * seed, None),
                ("receiver_only", 0.5 + shift, src if seed > 0 else None),
            ):
                k = round(acc * n_items)
                correct = [1] * k + [0] * (n_items - k)
                if method == "text_relay":
                    correct.reverse()  # text_relay gets the last items right
                metrics = {"accuracy": k / n_items, "n_test": n_items}
                write_run(root, task, method, seed, metrics, compression=None, correct=correct, reused_from=reused)
    write_run(
        root,
        "sst2",
        "bridge",
        3,
        {},
        status="failed",
        compression=4,
        error={"type": "OutOfMemoryError", "message": "CUDA out of memory", "traceback": "...", "oom": True},
    )
    died = root / "sst2-bridge-c8-s3"
    (died / ".hydra").mkdir(parents=True)
    (died / ".hydra" / "config.yaml").write_text(
        "seed: 3\ntask:\n  name: sst2\n  max_input_tokens: 64\nmethod:\n  name: bridge\n  models: [sender, receiver]\n"
        "  uses: [bridge]\nbridge:\n  num_latents: null\nsender:\n  name: tiny-sender\n  layer: -1\n"
        "receiver:\n  name: tiny-receiver\ncompression: 8\n"
    )
    return root


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the pipe tables in ``markdown`` (header rows too; not the alignment rows)."""
    return [
        [cell.strip() for cell in line.strip()[1:-1].split("|")]
        for line in markdown.splitlines()
        if line.startswith("|") and not set(line) <= set("|:- ")
    ]
