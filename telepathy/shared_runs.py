"""One run of a deterministic method stands for every seed the sweep pointed at it.

Zero-shot, text relay, LLMLingua and the other deterministic baselines give the same
result for every seed. A sweep over seeds queues one job for them
(``telepathy.cluster.sweep.share_deterministic``) and passes the other seeds in
``run.reuse_seeds``; when that job completes, ``share_result`` writes its record (and
predictions) into each other seed's run dir, marked ``reused_from`` so the analysis
counts its cost once. A seed whose run dir already holds a completed result keeps it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from telepathy import config as tconfig
from telepathy.results import (
    PREDICTIONS_FILE,
    RESULT_FILE,
    read_result,
    run_identity,
    write_json,
)


def share_result(cfg, record: dict) -> list[Path]:
    """Write ``record`` as the completed result of every seed in ``run.reuse_seeds``; their run dirs."""
    seeds = OmegaConf.select(cfg, "run.reuse_seeds", default=None) or []
    written = []
    for seed in seeds:
        other = cfg.copy()
        with open_dict(other):
            other.seed = int(seed)
            other.run.reuse_seeds = []
        run_dir = tconfig.run_dir(other)
        existing = read_result(run_dir) or {}
        if existing.get("status") == "completed":
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        source = Path(record["run_dir"])
        if (source / PREDICTIONS_FILE).exists():
            shutil.copyfile(source / PREDICTIONS_FILE, run_dir / PREDICTIONS_FILE)
        write_json(
            run_dir / RESULT_FILE,
            {
                **{k: v for k, v in record.items() if k != "attempts"},  # it computed nothing: no attempt to cost
                "run_id": run_dir.name,
                "run_dir": str(run_dir),
                "seed": int(seed),
                "identity": run_identity(other, record["identity"].get("num_latents")),
                "config_hash": tconfig.config_hash(other),
                "config": OmegaConf.to_container(other, resolve=True),
                "reused_from": str(source),
            },
        )
        written.append(run_dir)
    return written
