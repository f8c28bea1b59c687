"""Nothing on disk can block or silently change a run (issue 23; docs/cluster.md, "What survives what").

Each test damages one file the project wrote (or a user's data file) the way a full disk, a
bad copy or a stray editor does, and checks that reading it back neither blocks the next run
nor silently gives another result: the damage is named in one line (file and line), the file
is recomputed or read from a copy, and what the run cost is kept. Then: one atomic writer
honouring the umask, one reader of result.json, the file names from results.py, secrets
redacted, and (on the local SLURM cluster) an array queued by a launcher killed during its
sbatch, and cancelled pending array tasks.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_training import Toy, make_loss, trainer_cfg

from helpers import REPO, TINY, compose, needs_data, run_env, run_train
from telepathy import results
from telepathy.training import CHECKPOINT_DIR, fit, latest_checkpoint

# --- 1. log.jsonl with a damaged line ---------------------------------------------------------


def _train(run_dir: Path, **kw):
    model = Toy()
    return model, fit(model, make_loss(model), 20, trainer_cfg(**kw), seed=7, run_dir=run_dir)


@pytest.mark.parametrize("damage", ["half_last_line", "not_utf8_line"])
def test_a_damaged_log_line_does_not_block_the_resume(tmp_path, caplog, damage):
    """before: every relaunch failed in training.truncate_log with a raw JSONDecodeError naming no file
    (a half-written last line, what a full disk leaves) or UnicodeDecodeError (bytes that are not UTF-8)."""
    ref, _ = _train(tmp_path / "ref", max_steps=6)
    run = tmp_path / "run"
    _train(run, max_steps=6)  # checkpoints 3 and 6, log rows 1..6
    shutil.rmtree(latest_checkpoint(run))  # killed after step 6 was logged, before its checkpoint
    log_path = run / results.LOG_FILE
    lines = log_path.read_bytes().splitlines(keepends=True)
    if damage == "half_last_line":
        log_path.write_bytes(b"".join(lines) + b'{"step": 7, "lo')  # the disk filled mid-row
        line = len(lines) + 1
    else:
        lines[1] = b'{"step": 2, "loss": "\xff\xfe"}\n'
        log_path.write_bytes(b"".join(lines))
        line = 2

    with caplog.at_level(logging.WARNING):
        model, result = _train(run, max_steps=6)
    assert result.resumed_from == 3
    assert f"{log_path}:{line}: " in caplog.text  # the file and line, in one warning
    rows = [json.loads(raw) for raw in log_path.read_text().splitlines()]  # every line is whole JSON again
    expected = [1, 2, 3, 4, 5, 6] if damage == "half_last_line" else [1, 3, 4, 5, 6]
    assert [r["step"] for r in rows] == expected
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)  # the resume itself is exact


# --- 7. stray temporary checkpoint folders ----------------------------------------------------


def test_stray_checkpoint_writes_are_removed_on_the_next_start(tmp_path, monkeypatch):
    """before: a .tmp_step_* folder of a write that failed (full disk, kill) stayed for ever."""
    from telepathy import training

    run = tmp_path / "run"
    _train(run, max_steps=3)
    stray = run / CHECKPOINT_DIR / ".tmp_step_00000004_99999"
    stray.mkdir()
    (stray / "trainable.safetensors").write_bytes(b"half a file")

    def full_disk(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(training.torch, "save", full_disk)  # a checkpoint write that fails part-way
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _train(run, max_steps=6)
    monkeypatch.undo()
    assert not list((run / CHECKPOINT_DIR).glob(".tmp_step_*"))  # neither the stray one nor its own
    _, result = _train(run, max_steps=6)
    assert result.resumed_from == 3


# --- 2. jobs.json -----------------------------------------------------------------------------


def _planned(tmp_path: Path, n: int = 2):
    from telepathy.cluster.sweep import PlannedJob
    from telepathy.resources import Resources

    res = Resources(gpus=1, cpus=2, mem_gb=8, timeout_min=60, placement={}, estimate_gb=1.0, device_gb=(1.0,))
    return [
        PlannedJob(
            idx=i,
            overrides=[f"seed={i}"],
            run_dir=str(tmp_path / "out" / "runs" / f"r{i}"),
            state="queue",
            resources=res,
            slurm_job_id=f"999999{i}_0",
        )
        for i in range(n)
    ]


def _sweep(tmp_path: Path) -> Path:
    from telepathy.cluster import sweep

    sweep_dir = tmp_path / "out" / "sweeps" / "2026-01-01_00-00-00-000000"
    sweep_dir.mkdir(parents=True)
    sweep.write_manifest(sweep_dir, _planned(tmp_path), [{"class": "1gpu", "job_id": "9999990"}], "p1_seeds", "slurm")
    return sweep_dir


@pytest.mark.parametrize("damage", ["truncated", "not_utf8"])
def test_a_damaged_manifest_keeps_its_jobs(tmp_path, caplog, damage):
    """before: a truncated jobs.json was skipped silently (its queued jobs vanished from status, and
    a relaunch queued them again); one with non-UTF-8 bytes crashed status and every launch."""
    from telepathy.cluster import status

    manifest = _sweep(tmp_path) / "jobs.json"
    raw = manifest.read_bytes()
    manifest.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else raw.replace(b'"seed=1"', b'"seed=\xff"'))
    with caplog.at_level(logging.WARNING):
        rows = status.collect(tmp_path / "out")
    assert sorted(r["slurm_job_id"] for r in rows) == ["9999990_0", "9999991_0"]
    assert f"{manifest}:" in caplog.text and "read its copy .jobs.json.bak" in caplog.text


def test_a_manifest_with_no_readable_copy_is_one_row_naming_it(tmp_path):
    from telepathy.cluster import status

    sweep_dir = _sweep(tmp_path)
    for name in ("jobs.json", ".jobs.json.bak"):
        (sweep_dir / name).write_bytes(b'{"jobs": [\xff')
    (row,) = status.collect(tmp_path / "out")
    assert row["state"] == "unknown" and row["run"] == "jobs.json"
    assert f"{sweep_dir / 'jobs.json'}:1: not UTF-8 (byte 0xff at column 11)" in row["detail"]


# --- 3. the converted model cache ------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """(model config, conversions so far): a GGUF "package" whose conversion (transformers'
    GGUF loading) is replaced by a 1-layer random Llama and a word-level tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    name = f"fake_gguf_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "pkgs" / name).mkdir(parents=True)
    (tmp_path / "pkgs" / name / "__init__.py").write_text("")
    (tmp_path / "pkgs" / name / "m.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    conversions = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_from(source, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model(source, *args, **kwargs)
        conversions.append(gguf_file)
        config = transformers.LlamaConfig(
            vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        return transformers.AutoModelForCausalLM.from_config(config)

    def tokenizer_from(source, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_tok(source, *args, **kwargs)
        words = {w: i for i, w in enumerate(["<unk>", "a", "b", "c", "good", "bad", "film", "</s>"])}
        tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from)
    cfg = OmegaConf.create(
        {"name": "fake", "gguf_package": name, "gguf_file": "m.gguf", "cache_dir": str(tmp_path / "cache")}
    )
    return cfg, conversions


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json"])
def test_a_damaged_converted_model_is_converted_again(fake_gguf, caplog, damaged):
    """before: a truncated model.safetensors failed every run (a 34-line traceback) and was never
    converted again; a truncated tokenizer.json gave one line with the wrong fix (pre-download it)."""
    from telepathy.models import load_model, load_tokenizer

    cfg, conversions = fake_gguf
    first = load_model(cfg)
    (folder,) = [p for p in (Path(cfg.cache_dir) / "models").iterdir() if p.is_dir()]
    file = folder / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a copy or a disk cut it short
    with caplog.at_level(logging.WARNING):
        again = load_model(cfg) if damaged == "model.safetensors" else None
        tokenizer = load_tokenizer(cfg)
    assert conversions == ["m.gguf", "m.gguf"]
    assert f"{damaged} has" in caplog.text and "converting it again" in caplog.text
    assert tokenizer("good film").input_ids == [4, 6]
    if again is not None:
        for a, b in zip(first.model.parameters(), again.model.parameters()):
            assert a.shape == b.shape
    left = [p.name for p in (Path(cfg.cache_dir) / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == [folder.name]  # the damaged copy is not left aside


def test_a_converted_model_altered_in_place_is_caught_by_its_hash(fake_gguf, caplog):
    from telepathy.models import load_model

    cfg, conversions = fake_gguf
    load_model(cfg)
    (folder,) = [p for p in (Path(cfg.cache_dir) / "models").iterdir() if p.is_dir()]
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-3] ^= 0x10  # same size, one weight changed
    (folder / "model.safetensors").write_bytes(bytes(weights))
    with caplog.at_level(logging.WARNING):
        load_model(cfg)
    assert len(conversions) == 2 and "model.safetensors does not match its sha256" in caplog.text


# --- 5. a completed run's result.json unreadable ----------------------------------------------


def _fake_method(monkeypatch, outcomes):
    from telepathy import methods

    plan = iter(outcomes)

    def run(cfg, ctx):
        time.sleep(next(plan))
        return {"predictions": None, "metrics": {"accuracy": 1.0}, "params": {}, "details": {}, "timing": {}}

    monkeypatch.setattr(
        methods, "get", lambda name: types.SimpleNamespace(DETERMINISTIC=False, run=run, validate=lambda cfg: None)
    )


def test_a_completed_run_whose_record_is_damaged_is_redone_keeping_its_attempts(tmp_path, monkeypatch, caplog):
    """before: the relaunch rewrote the record with one short attempt, as if the run had cost that
    (2012 s of real cost recorded as 22 s); now the heartbeat keeps every attempt too."""
    from telepathy import lifecycle

    cfg = compose(*TINY, "task=sst2", f"paths.output_dir={tmp_path / 'out'}", "cluster.telemetry_interval_s=0")
    run_dir = lifecycle.tconfig.run_dir(cfg)
    _fake_method(monkeypatch, [0.6, 0.05])
    lifecycle.main(cfg)
    first = json.loads((run_dir / "result.json").read_text())["attempts"]
    raw = (run_dir / "result.json").read_bytes()
    (run_dir / "result.json").write_bytes(raw[: len(raw) // 3])  # the record of a completed run, cut short

    with caplog.at_level(logging.WARNING):
        lifecycle.main(cfg)
    assert f"{run_dir / 'result.json'}:" in caplog.text and "moved to result.json.damaged" in caplog.text
    assert (run_dir / "result.json.damaged").read_bytes() == raw[: len(raw) // 3]
    done = json.loads((run_dir / "result.json").read_text())
    assert [a["status"] for a in done["attempts"]] == ["completed", "completed"]
    assert done["attempts"][0] == first[0] and first[0]["seconds"] >= 0.6
    assert done["timing"]["all_attempts_s"] == pytest.approx(sum(a["seconds"] for a in done["attempts"]), abs=1e-3)
    assert done["timing"]["all_attempts_s"] > done["timing"]["total_s"] + 0.5


def test_status_names_a_damaged_record_instead_of_a_run_without_one(tmp_path):
    """before: "failed: SLURM job ended COMPLETED without a result"."""
    from telepathy.cluster import status

    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    (run_dir / "result.json").write_text('{"status": "completed", "metrics": {"accur')
    state, detail = status.run_state({"run_dir": str(run_dir), "slurm_job_id": "7_0"}, {}, {"7_0": "COMPLETED"})
    assert state == "malformed"
    assert detail.startswith(f"{run_dir / 'result.json'}:1: not valid JSON") and "relaunch redoes it" in detail


@needs_data  # the cost model measures the task's token counts
def test_a_resumed_run_does_not_calibrate_training_time_from_its_last_attempt():
    """before: a run resumed at its last checkpoint (train_s 0.0006 of its last attempt) calibrated
    the train stage thousands of times too fast."""
    from telepathy.cluster import costs

    cfg = compose("budget=tiny", "task=trec")
    base = costs.predict(cfg, "cpu")
    record = {
        "status": "completed",
        "run_id": "r",
        "config": OmegaConf.to_container(cfg, resolve=True),
        "env": {"device": "cpu"},
        "training": {"resumed_from": 30, "steps": 30},
        "timing": {"train_s": 0.0006, "eval_s": 2 * base.seconds["eval"], "total_s": 22.0},
    }
    cal = costs.Calibration()
    costs.calibrate_from_record(cal, record)
    stages = {key[2] for key in cal.ratios}
    assert "train" not in stages and "load" not in stages and "features" not in stages
    assert costs.predict(cfg, "cpu", cal).seconds["eval"] == pytest.approx(2 * base.seconds["eval"])
    cal = costs.Calibration()
    costs.calibrate_from_record(cal, {**record, "training": {"resumed_from": None}})
    assert "train" in {key[2] for key in cal.ratios}  # a run trained in one attempt still calibrates it


# --- 6. bytes that are not UTF-8 ---------------------------------------------------------------


def test_non_utf8_bytes_in_a_data_file_name_the_file_and_line(tmp_path):
    """before: UnicodeDecodeError naming no file (a traceback from deep in the run)."""
    from telepathy.data import DataError, load_split

    cfg = compose(*TINY, f"data.root={tmp_path}")
    folder = tmp_path / cfg.task.local_dir
    folder.mkdir(parents=True)
    rows = [json.dumps({"sentence": f"s{i}", "label": i % 2}).encode() for i in range(3)]
    rows[2] = b'{"sentence": "caf\xe9", "label": 0}'  # Latin-1, not UTF-8
    (folder / "train.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(DataError) as err:
        load_split(cfg.task, cfg.data, "train")
    assert str(err.value) == f"{folder / 'train.jsonl'}:3: not UTF-8 (byte 0xe9 at column 18)"


def test_every_reader_of_a_record_names_a_non_utf8_result_json(tmp_path):
    """before: status and the plan checklist crashed on UnicodeDecodeError; now status, the
    checklist, the read side (report) and the lifecycle read it through one reader."""
    from analysis_fixtures import write_run
    from telepathy import analysis
    from telepathy.cluster import checklist, status

    run = write_run(tmp_path / "out" / "runs", seed=0, metrics={"accuracy": 0.8})
    raw = (run / "result.json").read_bytes()
    (run / "result.json").write_bytes(raw.replace(b'"completed"', b'"compl\xe9ted"'))
    where = f"{run / 'result.json'}:"

    (row,) = status.collect(tmp_path / "out")
    assert row["state"] == "malformed" and row["detail"].startswith(where) and "not UTF-8" in row["detail"]
    plan = {"cluster": {"window_h": 1}, "jobs": [{"job": "j", "phase": "p", "run_dir": str(run), "start_s": 0}]}
    report = checklist.compare({**plan, "jobs": [{**plan["jobs"][0], "predicted_s": 1, "gpus": 1}]}, [])
    assert report["jobs"][0]["status"] == "malformed"
    from telepathy.analysis.report import SUCCESS_CHECKS

    assert dict((name, ok) for name, ok, _ in report["checklist"])[SUCCESS_CHECKS["valid"]] is False
    with pytest.warns(UserWarning, match="not UTF-8"):
        runs = analysis.load_runs(tmp_path / "out" / "runs")
    assert runs["status"].tolist() == ["malformed"] and runs["error.message"][0].startswith(where)
    found = results.load_result(run)
    assert found.status == "malformed" and found.problem.startswith(where)


def test_a_plan_json_that_is_not_utf8_is_one_line_of_status(tmp_path, capsys):
    """before: ``status --plan`` died on a UnicodeDecodeError traceback."""
    from telepathy.cluster import status

    plan = tmp_path / "plan.json"
    plan.write_bytes(b'{"jobs": [\xff]}')
    assert status.main([str(tmp_path), "--plan", str(plan)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{plan}:1: not UTF-8 (byte 0xff at column 11)" in line


# --- one writer, honouring the umask ----------------------------------------------------------


@pytest.mark.parametrize("mask,mode", [(0o002, 0o664), (0o077, 0o600)])
def test_every_shared_file_honours_the_umask(tmp_path, mask, mode):
    """before: result.json, predictions.jsonl and heartbeat.json came out 0600 and atomic_path's
    files 0644 whatever the umask, so colleagues in a shared outputs dir could not read the records."""
    from telepathy import features, fsutil, runlock

    old = os.umask(mask)
    try:
        results.write_json(tmp_path / "result.json", {"status": "completed"})
        results.write_jsonl(tmp_path / "predictions.jsonl", [{"idx": 0}])
        with runlock.hold(tmp_path):  # its first heartbeat
            pass
        sweep_dir = _sweep(tmp_path)
        features.save_entry(tmp_path / "features" / "L1.safetensors", [torch.ones(2, 3)], "k")
        with fsutil.atomic_path(tmp_path / "cache" / "m.gguf") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    written = [
        tmp_path / "result.json",
        tmp_path / "predictions.jsonl",
        tmp_path / "heartbeat.json",
        sweep_dir / "jobs.json",
        sweep_dir / ".jobs.json.bak",
        tmp_path / "features" / "L1.safetensors",
        tmp_path / "cache" / "m.gguf",
    ]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written if p.exists()}
    assert modes == {p.name: oct(mode) for p in written}


# --- the file names come from results.py -------------------------------------------------------

NAMES = ("result.json", "log.jsonl", "predictions.jsonl", "heartbeat.json", "jobs.json")
# a string used as a path (a name, or a glob / path ending in one); prose that mentions a file is not
PATH_USE = re.compile(r"(^|[/*])(" + "|".join(re.escape(n) for n in NAMES) + r")$")
# code another issue owns (issue 22: telepathy/cluster/costs.py outside calibrate_from_record)
OWNED_ELSEWHERE = {("telepathy/cluster/costs.py", "load_calibration")}


def _code_strings(path: Path):
    """(line, function, text) of every string constant of ``path`` that is code: not a docstring,
    not the definition of a constant (``RESULT_FILE = "result.json"``)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            skip.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            skip.update(id(n) for n in ast.walk(node.value))  # a constant's definition
    owner = {}  # node -> the innermost function around it (ast.walk goes outer first)
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        owner.update((id(node), func.name) for node in ast.walk(func))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, owner.get(id(node), ""), node.value


def test_file_names_come_from_their_constants():
    """before: "log.jsonl" / "result.json" / ... were typed again in the lifecycle, the training loop,
    status, the checklist and the benchmarks, so a reader could drift from the writer."""
    dirs = ("telepathy", "hydra_plugins", "benchmarks", "scripts")
    files = [REPO / "train.py", *(p for d in dirs for p in sorted((REPO / d).rglob("*.py")))]
    found = set()
    for path in files:
        rel = str(path.relative_to(REPO))
        for line, func, text in _code_strings(path):
            if PATH_USE.search(text) and (rel, func) not in OWNED_ELSEWHERE:
                found.add(f"{rel}:{line} {text!r}")
    assert not found, "\n".join(sorted(found))


# --- secrets ------------------------------------------------------------------------------------

SECRET = "hf_Zq8secretTOKENvalue"


def test_secret_values_are_redacted_from_manifests_and_the_launch_table(tmp_path, monkeypatch):
    from telepathy.cluster import sweep

    monkeypatch.setattr(sys, "argv", ["train.py", "-m", f"+cluster.env.HF_TOKEN={SECRET}", "seed=0,1"])
    jobs = _planned(tmp_path)
    for job in jobs:
        job.overrides.append(f"+cluster.env.HF_TOKEN={SECRET}")
    sweep_dir = tmp_path / "sweep"
    sweep.write_manifest(sweep_dir, jobs, [], None, "slurm")
    text = (sweep_dir / "jobs.json").read_text()
    assert SECRET not in text and "+cluster.env.HF_TOKEN=***" in text
    assert SECRET not in sweep.describe(jobs, "") and "HF_TOKEN=***" in sweep.describe(jobs, "")
    counts = {"model": {"num_key_value_heads": 8, "max_new_tokens": 4}, "metrics": {"target_token": 4}}
    assert results.redact({**counts, "overrides": ["method.target_token=4"]}) == {
        **counts,
        "overrides": ["method.target_token=4"],
    }  # names that end in KEY / TOKEN but hold counts are not secrets


@needs_data
def test_a_secret_in_cluster_env_reaches_no_record_and_no_log(tmp_path):
    """before: cluster.env values were written as they are into result.json and .hydra/."""
    out = tmp_path / "out"
    proc = run_train(*TINY, "trainer.max_steps=2", f"+cluster.env.WANDB_API_KEY={SECRET}", outputs=out)
    (run_dir,) = (out / "runs").iterdir()
    written = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log")]
    assert {p.name for p in written} >= {"result.json", "config.yaml", "hydra.yaml", "overrides.yaml", "train.log"}
    assert [p.name for p in written if SECRET in p.read_text()] == []
    assert SECRET not in proc.stdout + proc.stderr
    record = json.loads((run_dir / "result.json").read_text())
    assert record["config"]["cluster"]["env"]["WANDB_API_KEY"] == "***"
    assert "+cluster.env.WANDB_API_KEY=***" in record["overrides"]


# --- SLURM: an array queued by a killed launcher, cancelled pending array tasks ----------------


def _slurm():
    from test_slurm import SKIP_REASON

    return pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


SBATCH_THEN_DIE = """#!/bin/bash
# sbatch as the launcher calls it, but the job stays held, and the launcher is killed before it
# reads sbatch's answer: what a launcher killed during its last sbatch leaves behind
out=$({real} --hold "$@")
rc=$?
echo "$out"
echo "$out" >> {submitted}
kill -9 $PPID
exit $rc
"""


@pytest.mark.slurm
@needs_data
@_slurm()
def test_an_array_queued_by_a_launcher_killed_during_sbatch_is_found_and_not_queued_again(tmp_path):
    """before: the launcher recorded an array only after sbatch answered, so one killed during its
    last sbatch left queued jobs that no manifest named: status did not show them and a relaunch
    queued them a second time."""
    from telepathy.cluster import status

    shim = tmp_path / "bin"
    shim.mkdir()
    submitted = tmp_path / "submitted"
    (shim / "sbatch").write_text(SBATCH_THEN_DIE.format(real=shutil.which("sbatch"), submitted=submitted))
    (shim / "sbatch").chmod(0o755)
    out = tmp_path / "out"
    args = ["-m", "hydra/launcher=slurm", *TINY, "task=sst2,trec", "trainer.max_steps=2", "cluster=test_node"]
    env = run_env(out, PATH=f"{shim}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    try:
        rows = status.collect(out)
        assert len(rows) == 2 and all(r["slurm_job_id"] for r in rows), rows
        assert {r["state"] for r in rows} == {"pending"} and len({r["run_dir"] for r in rows}) == 2, rows
        relaunch = run_train(*args, "+dry_run=true", outputs=out)
        assert "total: 0 to run" in relaunch.stdout and "2 still queued/running" in relaunch.stdout, relaunch.stdout

        subprocess.run(["scancel", rows[0]["slurm_job_id"].split("_")[0]], check=True)
        deadline = time.time() + 60
        while {r["state"] for r in status.collect(out)} != {"cancelled"} and time.time() < deadline:
            time.sleep(1)
        assert [r["state"] for r in status.collect(out)] == ["cancelled", "cancelled"]
    finally:  # the held jobs, whatever the launcher recorded
        for line in submitted.read_text().splitlines() if submitted.exists() else []:
            subprocess.run(["scancel", line.split()[-1]], check=False)


@pytest.mark.slurm
@_slurm()
def test_cancelled_pending_array_tasks_show_as_cancelled(tmp_path):
    """before: sacct lists the never-started tasks of a cancelled array as one line (``N_[0-2]``), so
    status looked each task up, found nothing and said ``unknown``."""
    from telepathy.cluster import status, sweep

    submitted = subprocess.run(
        ["sbatch", "--hold", "--array=0-2", "--job-name=telepathy-cancel-test", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    array = submitted.split()[-1]
    jobs = _planned(tmp_path, n=3)
    for k, job in enumerate(jobs):
        job.slurm_job_id = f"{array}_{k}"
    sweep_dir = tmp_path / "out" / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    sweep.write_manifest(sweep_dir, jobs, [{"class": "1gpu", "job_id": array}], None, "slurm")
    try:
        assert [r["state"] for r in status.collect(tmp_path / "out")] == ["pending"] * 3
    finally:
        subprocess.run(["scancel", array], check=True)
    deadline = time.time() + 60
    rows = status.collect(tmp_path / "out")
    while [r["state"] for r in rows] != ["cancelled"] * 3 and time.time() < deadline:
        time.sleep(1)
        rows = status.collect(tmp_path / "out")
    assert [r["state"] for r in rows] == ["cancelled"] * 3, rows
    assert all("relaunch queues it again" in r["detail"] for r in rows)


# --- docs/cluster.md ------------------------------------------------------------------------------

CITED = re.compile(r"`(?:[\w/]+\.py::)?(test_\w+?)(?:\.\.\.)?(?:\[[^\]`]*\])?`")


def test_the_docs_give_every_fault_here_a_row_and_say_who_can_run_code_through_the_sweep_dir():
    """before: the "What survives what" table had no row for any of these faults, and nothing said
    that whoever can write a sweep dir runs code as you (submitit unpickles the job from it)."""
    text = (REPO / "docs" / "cluster.md").read_text()
    table = text[text.index("### What survives what") : text.index("## Local runs")]
    cited = set(CITED.findall(table))
    defined = {
        name
        for path in (REPO / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }
    assert not [c for c in cited if not any(d.startswith(c) for d in defined)], "rows cite tests that do not exist"
    here = re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M)
    uncited = [
        t
        for t in here
        if t != test_the_docs_give_every_fault_here_a_row_and_say_who_can_run_code_through_the_sweep_dir.__name__
        and not any(t.startswith(c) for c in cited)
    ]
    assert not uncited, f"faults without a row in docs/cluster.md: {uncited}"
    who = text[text.index("**Who can run code through the sweep dir.**") :].split("\n\n")[0]
    assert "_submitted.pkl" in who and "unpickles" in who and "umask" in who
