"""``logger=``: the rows of log.jsonl and the final metrics, read back with each library's own reader.

In-process and model-free: a run directory is written as a run leaves it, then published.
Each backend's test skips, with the reason, when its library is not installed
(``pip install -e ".[tracking]"``); ``make setup``, and so CI, installs all three.
"""

import importlib.util
import json
import struct

import pytest

from helpers import TINY, compose
from telepathy import config as tconfig
from telepathy import tracking
from telepathy.results import write_json

ROWS = [
    {"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 1.0},
    {"step": 2, "loss": 1.5, "lr": 2e-4, "grad_norm": 0.5},
    {"step": 2, "eval_accuracy": 0.75},
    {"step": 3, "loss": 0.5, "lr": 1e-4, "grad_norm": 0.25},
]
METRICS = {"accuracy": 0.875, "macro_f1": 0.8, "n_test": 16}


def _needs(module):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f'{module} is not installed (pip install -e ".[tracking]")'
    )


def _finished_run(tmp_path, logger):
    """(cfg, run_dir, record) of a completed run as lifecycle.main leaves it."""
    cfg = compose(*TINY, f"logger={logger}", f"paths.output_dir={tmp_path / 'outputs'}")
    run_dir = tconfig.run_dir(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    record = {
        "run_id": run_dir.name,
        "status": "completed",
        "metrics": METRICS,
        "config": {"task": {"name": "sst2"}, "method": {"name": "bridge"}, "seed": 42, "compression": 8},
    }
    return cfg, run_dir, record


def _expected(name):
    return [(r["step"], r[name]) for r in ROWS if name in r]


def test_unknown_or_uninstalled_logger_is_a_config_error(monkeypatch):
    with pytest.raises(tconfig.ConfigError, match=r"logger.name='nope' is not allowed; allowed: none, tensorboard"):
        tracking.check(compose(*TINY, "logger=none", "logger.name=nope"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(tconfig.ConfigError, match=r"logger=mlflow needs the Python package 'mlflow'"):
        tracking.check(compose(*TINY, "logger=mlflow"))


@_needs("tensorboard")
def test_tensorboard_event_files_hold_the_log_rows_and_final_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir, record = _finished_run(tmp_path, "tensorboard")
    with tracking.publishing(cfg):
        write_json(run_dir / "result.json", record)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    read = lambda tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]  # noqa: E731
    assert read("loss") == _expected("loss") and read("eval_accuracy") == _expected("eval_accuracy")
    assert read("final/accuracy") == [(3, 0.875)]
    first = sorted(p.name for p in (run_dir / "tensorboard").iterdir())
    with tracking.publishing(cfg):  # a skipped rerun (same record) publishes nothing
        pass
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == first


@_needs("mlflow")
def test_mlflow_file_store_holds_the_log_rows_and_one_run_per_run_dir(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, run_dir, record = _finished_run(tmp_path, "mlflow")
    tracking.publish(cfg.logger, run_dir, {**record, "status": "interrupted"})
    tracking.publish(cfg.logger, run_dir, record)  # the resumed run replaces the interrupted one
    client = MlflowClient(tracking_uri=(tmp_path / "outputs" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("telepathy")
    (run,) = client.search_runs([experiment.experiment_id])
    history = lambda key: [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert sorted(history("loss")) == _expected("loss")
    assert history("eval_accuracy") == _expected("eval_accuracy")
    assert run.data.metrics["final/accuracy"] == pytest.approx(0.875)
    assert run.data.params["seed"] == "42" and run.data.params["run_id"] == run_dir.name
    assert run.info.status == "FINISHED"


def _wandb_records(path):
    """The records of a W&B offline run file, decoded by wandb's own protobuf classes.

    wandb >= 0.19 ships no Python reader for its transaction log (the old
    ``wandb.sdk.internal.datastore`` is gone); the framing is LevelDB's log format: a
    7-byte file header (":W&B", magic, version), then 32 KiB blocks of chunks, each
    ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)``.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@_needs("wandb")
def test_wandb_offline_run_file_holds_the_log_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, run_dir, record = _finished_run(tmp_path, "wandb")
    tracking.publish(cfg.logger, run_dir, record)
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in _wandb_records(path)
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [(h["_step"], pytest.approx(h["loss"])) for h in history] == _expected("loss")
    assert history[1]["eval_accuracy"] == pytest.approx(0.75)
    assert history[2]["final/accuracy"] == pytest.approx(0.875)
