"""Optional experiment tracking (``logger=tensorboard|mlflow|wandb``; default ``none``).

``log.jsonl`` and ``result.json`` stay the record of a run. A tracker is a view of the same
rows for dashboards: when a run ends (completed, failed or interrupted) ``publishing``
replays its ``log.jsonl`` rows (training steps and periodic evals, each at its ``step``)
and the final metrics (``final/<metric>``) into the configured backend. Built from the
files, it can never disagree with them, and it adds nothing to the training loop. A
resumed run publishes again and replaces its earlier copy (TensorBoard and W&B: the
run's folder; MLflow: the run tagged with this run id), so dashboards hold one curve per run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path

from telepathy import config as tconfig
from telepathy.results import LOG_FILE, read_result

log = logging.getLogger("telepathy")

# backend -> the Python module it needs (pip install -e ".[tracking]")
MODULES = {"none": None, "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check(cfg) -> None:
    """``logger.name`` is a known backend whose library is installed (before anything runs)."""
    if cfg.get("logger") is None:
        return
    tconfig.check_choice(cfg, "logger.name", list(MODULES))
    module = MODULES[cfg.logger.name]
    if module and importlib.util.find_spec(module) is None:
        raise tconfig.ConfigError(
            f"logger={cfg.logger.name} needs the Python package {module!r}, which is not "
            f'installed; allowed without it: logger=none (or pip install -e ".[tracking]")'
        )


@contextlib.contextmanager
def publishing(cfg):
    """Around a run: when it has written a new final record, publish it (a skipped run publishes nothing)."""
    if cfg.get("logger") is None or cfg.logger.name == "none":
        yield
        return
    run_dir = tconfig.run_dir(cfg)
    before = read_result(run_dir)
    try:
        yield
    finally:
        record = read_result(run_dir)
        if record and record != before and record.get("status") != "running":
            try:
                publish(cfg.logger, run_dir, record)
            except Exception as err:  # noqa: BLE001 - a dashboard problem must not fail a finished run
                log.warning("logger=%s: not published (%s: %s)", cfg.logger.name, type(err).__name__, err)


def _rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut off by a kill
            rows.append(json.loads(line))
    return rows


def _numbers(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def scalars(run_dir: Path, record: dict) -> list[tuple[int, str, float]]:
    """``(step, name, value)``: every number of every log.jsonl row, then ``final/<metric>`` at the last step."""
    out = [(int(row["step"]), k, v) for row in _rows(run_dir) if "step" in row for k, v in _numbers(row).items()]
    last = max((s for s, _, _ in out), default=0)
    out += [(last, f"final/{k}", v) for k, v in _numbers(record.get("metrics") or {}).items()]
    return out


def params(record: dict) -> dict[str, str]:
    """What identifies the run, for the tracker's parameter table."""
    cfg = record.get("config") or {}
    keys = {
        "task": ("task", "name"),
        "method": ("method", "name"),
        "sender": ("sender", "name"),
        "receiver": ("receiver", "name"),
        "layer": ("sender", "layer"),
        "seed": ("seed",),
        "compression": ("compression",),
    }
    out = {"run_id": record.get("run_id"), "status": record.get("status")}
    for name, path in keys.items():
        node = cfg
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        out[name] = node
    return {k: str(v) for k, v in out.items() if v is not None}


def publish(logger_cfg, run_dir: Path, record: dict) -> None:
    BACKENDS[logger_cfg.name](logger_cfg, Path(run_dir), record)


def _tensorboard(logger_cfg, run_dir: Path, record: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    log_dir = run_dir / logger_cfg.log_dir
    shutil.rmtree(log_dir, ignore_errors=True)
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for step, name, value in scalars(run_dir, record):
            writer.add_scalar(name, value, step)
        writer.add_text("params", "\n".join(f"{k}: {v}  " for k, v in params(record).items()))


def _mlflow(logger_cfg, run_dir: Path, record: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    # the file store: many SLURM jobs may write at once on a shared file system, where an SQLite
    # store's locking is unreliable; MLflow >= 3.x wants this opt-in for it
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=Path(logger_cfg.tracking_dir).expanduser().resolve().as_uri())
    experiment = client.get_experiment_by_name(logger_cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(logger_cfg.experiment)
    run_id = record.get("run_id") or run_dir.name
    for old in client.search_runs([experiment_id], filter_string=f"tags.telepathy_run_id = '{run_id}'"):
        client.delete_run(old.info.run_id)
    run = client.create_run(
        experiment_id, run_name=run_id, tags={"telepathy_run_id": run_id, "telepathy_run_dir": str(run_dir)}
    )
    metrics = [Metric(name, value, 0, step) for step, name, value in scalars(run_dir, record)]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in params(record).items()],
        tags=[RunTag("status", str(record.get("status")))],
    )
    client.set_terminated(run.info.run_id, "FINISHED" if record.get("status") == "completed" else "FAILED")


def _wandb(logger_cfg, run_dir: Path, record: dict) -> None:
    import wandb

    shutil.rmtree(run_dir / "wandb", ignore_errors=True)
    run = wandb.init(
        project=logger_cfg.project,
        mode=logger_cfg.mode,
        dir=str(run_dir),
        name=record.get("run_id") or run_dir.name,
        config=params(record),
        reinit="create_new",
    )
    try:
        by_step: dict[int, dict] = {}
        for step, name, value in scalars(run_dir, record):
            by_step.setdefault(step, {})[name] = value
        for step in sorted(by_step):
            run.log(by_step[step], step=step)
    finally:
        run.finish(exit_code=0 if record.get("status") == "completed" else 1)
        wandb.teardown()  # waits for wandb's service process to write out the run file


BACKENDS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
