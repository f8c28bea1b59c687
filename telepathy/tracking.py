"""Optional experiment tracking (``logger=tensorboard|mlflow|wandb``; default ``none``).

``log.jsonl`` and ``result.json`` stay the record of a run; a tracker is a live view of them
for dashboards, fed by the lifecycle (telepathy/lifecycle.py) and the training loop:

* at the start, the run's config, flattened (``trainer.lr``, ``task.name``, ...), as typed
  hyper-parameters, so the runs of an lr sweep can be filtered and compared by lr;
* while it runs, every ``log.jsonl`` row as it is written (``training.fit`` calls ``log_row``),
  at the row's own step; the rows an earlier attempt left (kept by a resume) go first;
* at the end (completed, failed or interrupted), ``final/<metric>`` at the last step, the
  status and the record itself (result.json).

A rerun or a resumed run replaces its earlier copy (TensorBoard and W&B: the run's folder;
MLflow: the run tagged with this run id), so a dashboard holds one curve per run. A run that
had completed before ``logger=`` was added is skipped as always, and published from its files
(the log says so). A tracker that fails never fails the run: one warning, then it stops.
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

from omegaconf import OmegaConf

from telepathy import config as tconfig
from telepathy.results import LOG_FILE, RESULT_FILE

log = logging.getLogger("telepathy")

# backend -> the Python module it needs (pip install -e ".[tracking]")
MODULES = {"none": None, "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
# the headline metrics each task type ends with (declared up front for TensorBoard's HParams table)
HEADLINE = {"classification": ("accuracy", "macro_f1"), "generation": ("rouge1", "rouge2", "rougeL")}


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


def flat(tree: dict, prefix: str = "") -> dict:
    """``{"trainer": {"lr": 1e-3}}`` → ``{"trainer.lr": 1e-3}``; values keep their types (lists stay lists)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def hyperparameters(cfg) -> dict:
    """The run's resolved config, nested (W&B flattens it itself); Hydra's own node left out."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree.pop("hydra", None)
    return tree


def _scalar(v):
    """A hyper-parameter value a tracker can type: numbers, strings and booleans as they are, the rest as JSON."""
    return v if isinstance(v, (int, float, str, bool)) else json.dumps(v)


class Tracker:
    """One run's view in a tracker. This base is ``logger=none``: every call does nothing."""

    def __init__(self, logger_cfg=None, run_dir: Path | None = None, run_id: str | None = None):
        self.cfg, self.run_dir, self.run_id = logger_cfg, Path(run_dir) if run_dir else None, run_id
        self.live = False  # rows arrive one by one (after the first, which brings the earlier ones)
        self.last_step = 0
        self.broken = False

    # --- what the run calls ---------------------------------------------------------------
    def start(self, hparams: dict, metric_names: list[str]) -> None:
        """A new copy of the run (an earlier one is removed) with its hyper-parameters."""
        self._guard(self._start, hparams, metric_names)

    def row(self, row: dict) -> None:
        """A row just appended to log.jsonl; the first also brings the rows already there (a resume's)."""
        if self.broken or self.cfg is None:
            return
        rows = [row] if self.live else _rows(self.run_dir)
        self.live = True
        self._guard(self._log, rows)

    def finish(self, record: dict) -> None:
        """The run's final record: the rows not sent live, ``final/<metric>``, status and record."""
        if self.broken or self.cfg is None:
            return
        rows = [] if self.live else _rows(self.run_dir)
        rows += [{"step": None, **{f"final/{k}": v for k, v in _numbers(record.get("metrics") or {}).items()}}]
        self._guard(self._log, rows)
        self._guard(self._end, record)

    def has_copy(self) -> bool:
        return False

    # --- what a backend implements ----------------------------------------------------------
    def _start(self, hparams: dict, metric_names: list[str]) -> None: ...

    def _scalars(self, step: int, values: dict[str, float]) -> None: ...

    def _flush(self) -> None: ...

    def _end(self, record: dict) -> None: ...

    # ----------------------------------------------------------------------------------------
    def _log(self, rows: list[dict]) -> None:
        for row in rows:
            step = self.last_step if row.get("step") is None else int(row["step"])
            values = _numbers(row)
            if values:
                self.last_step = max(self.last_step, step)
                self._scalars(step, values)
        self._flush()

    def _guard(self, fn, *args) -> None:
        if self.broken or self.cfg is None:
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a dashboard problem must never fail or stop a run
            self.broken = True
            log.warning("logger=%s: stopped logging (%s: %s)", self.cfg.name, type(err).__name__, err)


class _TensorBoard(Tracker):
    def _dir(self) -> Path:
        return self.run_dir / self.cfg.log_dir

    def has_copy(self) -> bool:
        return any(self._dir().glob("events.out.tfevents.*"))

    def _start(self, hparams, metric_names):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        shutil.rmtree(self._dir(), ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(self._dir()))
        values = {k: _scalar(v) for k, v in flat(hparams).items()}
        experiment, start, self._end_info = hparams_summaries(values, {name: 0.0 for name in metric_names})
        for summary in (experiment, start):  # the HParams tab: one row per run, these metrics as columns
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("run_id", self.run_id)

    def _scalars(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def _flush(self):
        self.writer.flush()  # a dashboard open during the run sees every step

    def _end(self, record):
        self.writer.add_text("record", "```\n" + json.dumps(record, indent=1, default=str) + "\n```", self.last_step)
        self.writer.add_text("status", str(record.get("status")), self.last_step)
        if record.get("status") == "completed":
            self.writer.file_writer.add_summary(self._end_info)
        self.writer.close()


class _MLflow(Tracker):
    STATUS = {"completed": "FINISHED", "failed": "FAILED"}  # interrupted: KILLED

    def _client(self):
        from mlflow.tracking import MlflowClient

        # the file store: many SLURM jobs may write at once on a shared file system, where an SQLite
        # store's locking is unreliable; MLflow >= 3.x wants this opt-in for it
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=Path(self.cfg.tracking_dir).expanduser().resolve().as_uri())
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.cfg.experiment)
        return client, experiment_id

    def _copies(self, client, experiment_id) -> list:
        return client.search_runs([experiment_id], filter_string=f"tags.telepathy_run_id = '{self.run_id}'")

    def has_copy(self) -> bool:
        return bool(self._copies(*self._client()))

    def _start(self, hparams, metric_names):
        from mlflow.entities import Param

        self.client, experiment_id = self._client()
        for old in self._copies(self.client, experiment_id):
            self.client.delete_run(old.info.run_id)
        tags = {"telepathy_run_id": self.run_id, "telepathy_run_dir": str(self.run_dir), "status": "running"}
        self.id = self.client.create_run(experiment_id, run_name=self.run_id, tags=tags).info.run_id
        params = [Param(k, str(_scalar(v))) for k, v in flat(hparams).items()]
        for first in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.id, params=params[first : first + 100])
        self.pending = []

    def _scalars(self, step, values):
        from mlflow.entities import Metric

        self.pending += [Metric(name, value, 0, step) for name, value in values.items()]

    def _flush(self):
        for first in range(0, len(self.pending), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.id, metrics=self.pending[first : first + 1000])
        self.pending = []

    def _end(self, record):
        self.client.set_tag(self.id, "status", str(record.get("status")))
        self.client.log_dict(self.id, record, RESULT_FILE)  # the record, as an artifact of the run
        self.client.set_terminated(self.id, self.STATUS.get(record.get("status"), "KILLED"))


class _WandB(Tracker):
    def has_copy(self) -> bool:
        return (self.run_dir / "wandb").is_dir()

    def _start(self, hparams, metric_names):
        import wandb

        shutil.rmtree(self.run_dir / "wandb", ignore_errors=True)
        self.run = wandb.init(
            project=self.cfg.project,
            mode=self.cfg.mode,
            dir=str(self.run_dir),
            name=self.run_id,
            config=hparams,  # nested and typed; W&B's filters read trainer.lr as a number
            reinit="create_new",
        )

    def _scalars(self, step, values):
        self.run.log(values, step=step)  # rows of one step (a training row and its eval) merge

    def _end(self, record):
        import wandb

        try:
            summary = {k: v for k, v in flat({k: v for k, v in record.items() if k != "config"}).items()}
            self.run.summary.update({f"record/{k}": _scalar(v) for k, v in summary.items() if v is not None})
        finally:
            self.run.finish(exit_code=0 if record.get("status") == "completed" else 1)
            wandb.teardown()  # waits for wandb's service process to write out the run file


BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}
_ACTIVE: Tracker | None = None


def tracker(cfg, run_dir: Path) -> Tracker:
    """The run's tracker (``Tracker()``, doing nothing, for ``logger=none``)."""
    logger_cfg = cfg.get("logger")
    if logger_cfg is None or logger_cfg.name == "none":
        return Tracker()
    return BACKENDS[logger_cfg.name](logger_cfg, Path(run_dir), Path(run_dir).name)


def start(cfg, run_dir: Path) -> Tracker:
    """A new copy of this run in the tracker, with the config as hyper-parameters."""
    found = tracker(cfg, run_dir)
    task_type = OmegaConf.select(cfg, "task.type", default="classification")
    found.start(hyperparameters(cfg), [f"final/{m}" for m in HEADLINE.get(task_type, ())])
    return found


@contextlib.contextmanager
def live(found: Tracker):
    """While the method runs, ``log_row`` sends each log.jsonl row to ``found``."""
    global _ACTIVE
    before, _ACTIVE = _ACTIVE, found
    try:
        yield found
    finally:
        _ACTIVE = before


def log_row(row: dict) -> None:
    """A row just appended to the run's log.jsonl (``training.fit``): to the live tracker, if any."""
    if _ACTIVE is not None:
        _ACTIVE.row(row)


def skipped(cfg, run_dir: Path, record: dict) -> None:
    """A completed run that is skipped: a tracker that lacks it gets it from its files (and the log says so)."""
    found = tracker(cfg, run_dir)
    try:
        if found.cfg is None or found.has_copy():
            return
    except Exception as err:  # noqa: BLE001 - a dashboard problem must never fail a run
        log.warning("logger=%s: could not look for this run (%s: %s)", found.cfg.name, type(err).__name__, err)
        return
    log.info(
        "logger=%s: this run completed before the logger was set; publishing it from its files "
        "(log.jsonl, result.json)",
        found.cfg.name,
    )
    config = OmegaConf.create(record.get("config") or {})
    found.start(hyperparameters(config), [f"final/{m}" for m in HEADLINE.get(config.get("task", {}).get("type"), ())])
    found.finish(record)
