"""``logger=``: the config as typed hyper-parameters at the start, each log.jsonl row while the run
trains (at its step), the final metrics and record at the end; read back with each library's own reader.

In-process and model-free: a run directory is fed as the lifecycle feeds it (``tracking.start``,
``training.fit`` on a toy module inside ``tracking.live``, ``finish`` with the record). Each
backend's test skips, with the reason, when its library is not installed (``pip install -e
".[tracking]"``); ``make setup``, and so CI, installs all three.
"""

import csv
import importlib.util
import io
import json
import struct
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from helpers import REPO, TINY, compose, needs_data, run_train
from telepathy import config as tconfig
from telepathy import tracking
from telepathy.training import fit

METRICS = {"accuracy": 0.875, "macro_f1": 0.8, "n_test": 16}
STEPS = 6


def _needs(module):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f'{module} is not installed (pip install -e ".[tracking]")'
    )


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)


X = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))


def _trainer(**kw):
    small = dict(lr=1e-2, warmup_steps=1, batch_size=4, max_steps=STEPS, checkpoint_every=2, eval_every=2, log_every=1)
    return OmegaConf.merge(OmegaConf.load(REPO / "conf/trainer/default.yaml"), small, kw)


def _train(cfg, run_dir, seen=None, crash_at=None):
    """One attempt of a run as the lifecycle makes it: a tracker, ``fit`` feeding it live, the record at the end.
    ``seen(step)`` is called inside the loop (what the tracker holds mid-run); ``crash_at``: a preemption."""
    model = Toy()
    calls = {"n": 0}

    def loss_fn(idx):
        calls["n"] += 1
        if crash_at and calls["n"] == crash_at:
            raise SystemExit("preempted")
        if seen is not None:
            seen(calls["n"])
        loss = model.lin(X[idx]).pow(2).mean()
        return loss, {"loss": loss.item()}

    tracker = tracking.start(cfg, run_dir)
    try:
        with tracking.live(tracker):
            fit(model, loss_fn, 20, _trainer(), seed=7, run_dir=run_dir, eval_fn=lambda: {"eval_accuracy": 0.75})
    except SystemExit:
        tracker.finish({"run_id": run_dir.name, "status": "interrupted", "metrics": {}})
        raise
    record = {"run_id": run_dir.name, "status": "completed", "metrics": METRICS}
    tracker.finish(record)
    return record


def _run(tmp_path, logger, *overrides):
    cfg = compose(*TINY, f"logger={logger}", f"paths.output_dir={tmp_path / 'outputs'}", *overrides)
    run_dir = tconfig.run_dir(cfg)
    run_dir.mkdir(parents=True)
    return cfg, run_dir


def _logged(run_dir, name):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], pytest.approx(r[name])) for r in rows if name in r]


def test_unknown_or_uninstalled_logger_is_a_config_error(monkeypatch):
    with pytest.raises(tconfig.ConfigError, match=r"logger.name='nope' is not allowed; allowed: none, tensorboard"):
        tracking.check(compose(*TINY, "logger=none", "logger.name=nope"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(tconfig.ConfigError, match=r"logger=mlflow needs the Python package 'mlflow'"):
        tracking.check(compose(*TINY, "logger=mlflow"))


@_needs("tensorboard")
def test_tensorboard_gets_typed_hparams_then_each_step_as_it_happens_then_the_record(tmp_path):
    """Before: the event file was written once the run had ended, with 9 identity fields as strings."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    cfg, run_dir = _run(tmp_path, "tensorboard", "trainer.lr=0.003")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    live = {}

    def seen(call):  # mid-run: the steps already finished are in the event file
        events.Reload()
        live[call] = [e.step for e in events.Scalars("loss")] if "loss" in events.Tags()["scalars"] else []

    _train(cfg, run_dir, seen)
    assert live[1] == [] and live[4] == [1, 2, 3]
    events.Reload()
    read = lambda tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]  # noqa: E731
    assert read("loss") == _logged(run_dir, "loss") and read("eval_accuracy") == _logged(run_dir, "eval_accuracy")
    assert read("final/accuracy") == [(STEPS, 0.875)]
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["trainer.lr"].number_value == pytest.approx(0.003)  # a number: comparable by lr
    assert start.hparams["task.name"].string_value == "sst2" and start.hparams["seed"].number_value == 42
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["final/accuracy", "final/macro_f1"]
    assert "_hparams_/session_end_info" in content  # completed
    assert run_dir.name in events.Tensors("record/text_summary")[0].tensor_proto.string_val[0].decode()


@_needs("mlflow")
def test_mlflow_gets_the_config_as_params_each_step_live_and_one_run_per_run_dir(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in for the file store

    cfg, run_dir = _run(tmp_path, "mlflow", "trainer.lr=0.003")
    client = MlflowClient(tracking_uri=(tmp_path / "outputs" / "mlruns").resolve().as_uri())
    live = {}

    def seen(call):
        (run,) = client.search_runs([client.get_experiment_by_name("telepathy").experiment_id])
        live[call] = (run.info.status, [m.step for m in client.get_metric_history(run.info.run_id, "loss")])

    with pytest.raises(SystemExit):  # preempted at step 4 (checkpoint at 2), then resumed
        _train(cfg, run_dir, crash_at=4)
    _train(cfg, run_dir, seen)
    # resumed from step 2: call 2 is step 4, after step 3's row brought the kept rows of steps 1-2 before it
    assert live[2] == ("RUNNING", [1, 2, 3]) and live[4] == ("RUNNING", [1, 2, 3, 4, 5])
    experiment = client.get_experiment_by_name("telepathy")
    (run,) = client.search_runs([experiment.experiment_id])  # the resumed attempt replaced the interrupted one
    history = lambda key: [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("loss") == _logged(run_dir, "loss") and history("eval_accuracy") == _logged(run_dir, "eval_accuracy")
    assert run.data.metrics["final/accuracy"] == pytest.approx(0.875)
    assert run.data.params["trainer.lr"] == "0.003" and run.data.params["task.name"] == "sst2"
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    lr_sweep = client.search_runs([experiment.experiment_id], filter_string="params.`trainer.lr` = '0.003'")
    assert [r.info.run_id for r in lr_sweep] == [run.info.run_id]
    assert client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))  # the record
    assert json.loads((tmp_path / "result.json").read_text())["metrics"] == METRICS


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
def test_wandb_offline_run_file_holds_the_typed_config_the_rows_and_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, run_dir = _run(tmp_path, "wandb", "trainer.lr=0.003")
    _train(cfg, run_dir)
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(path)
    items = lambda kind, field: [  # noqa: E731
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in getattr(getattr(r, kind), field)
        }
        for r in records
        if r.WhichOneof("record_type") == kind
    ]
    history = items("history", "item")
    assert [h["_step"] for h in history] == list(range(1, STEPS + 1))
    assert [(h["_step"], pytest.approx(h["loss"])) for h in history] == _logged(run_dir, "loss")
    assert history[1]["eval_accuracy"] == pytest.approx(0.75) and history[-1]["final/accuracy"] == pytest.approx(0.875)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]  # written at the start
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["trainer"]["lr"] == pytest.approx(0.003) and config["task"]["name"] == "sst2"  # typed: filterable
    summary = {k: v for s in items("summary", "update") for k, v in s.items()}
    assert summary["record/status"] == "completed" and summary["record/metrics.n_test"] == 16


@needs_data
@_needs("tensorboard")
def test_a_logger_added_to_a_finished_run_publishes_it_and_says_so(outputs):
    """Before: `logger=` on a completed run did nothing, silently (the run is skipped, so nothing was sent)."""
    run_train(*TINY, outputs=outputs)
    proc = run_train(*TINY, "logger=tensorboard", outputs=outputs)
    out = proc.stdout + proc.stderr
    assert "skipped:" in out and "logger=tensorboard: this run completed before the logger was set" in out, out
    (run_dir,) = (outputs / "runs").iterdir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4] and events.Scalars("final/accuracy")
    again = run_train(*TINY, "logger=tensorboard", outputs=outputs)  # it has the run now: nothing more to say
    assert "logger=tensorboard" not in again.stdout + again.stderr


@_needs("mlflow")
def test_the_documented_mlflow_reader_lists_the_runs_with_their_params_and_metrics(tmp_path, monkeypatch):
    """README's MLflow reader, run as written. (Its former `mlflow ui --backend-store-uri outputs/mlruns`
    failed: `make setup` installs mlflow-skinny, which has no UI, and MLflow 3 refuses the file store
    without MLFLOW_ALLOW_FILE_STORE=true.)"""
    import os

    cfg, run_dir = _run(tmp_path, "mlflow", "trainer.lr=0.003")
    _train(cfg, run_dir)
    readme = (REPO / "README.md").read_text().splitlines()
    (command,) = [line for line in readme if line.startswith("MLFLOW_TRACKING_URI=") and "search_runs" in line]
    monkeypatch.chdir(tmp_path)  # the command reads outputs/mlruns
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = csv.DictReader(io.StringIO(proc.stdout))
    assert row["params.trainer.lr"] == "0.003" and row["params.task.name"] == "sst2"
    assert float(row["metrics.final/accuracy"]) == pytest.approx(0.875) and row["tags.telepathy_run_id"] == run_dir.name
