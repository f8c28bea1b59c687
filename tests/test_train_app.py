"""`python train.py` end to end through Hydra: single runs, multiruns, skip, resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, needs_data, results, run_env, run_train

pytestmark = needs_data


def test_single_run_writes_a_complete_record(outputs):
    proc = run_train(*TINY, outputs=outputs)
    (record,) = results(outputs)
    assert record["status"] == "completed"
    run_dir = Path(record["run_dir"])
    assert run_dir.parent == outputs.resolve() / "runs"
    for key in ("accuracy", "macro_f1", "n_test", "majority_accuracy", "receiver_zeroshot_accuracy"):
        assert isinstance(record["metrics"][key], (int, float)), key
    assert record["metrics"]["n_test"] == 16
    assert record["metrics"]["text_truncated_items"] == 0  # task.max_text_words cut no SST-2 test item here
    assert record["bridge"]["num_latents"] == 8  # ceil(64 / 8)
    assert record["bridge"]["compression_ratio"] == pytest.approx(record["bridge"]["mean_sender_tokens"] / 8)
    # measured compression counts the text the sender read, not the template around it
    assert 0 < record["bridge"]["text_tokens_mean"] < record["bridge"]["mean_sender_tokens"]
    assert record["bridge"]["measured_compression_mean"] == pytest.approx(record["bridge"]["text_tokens_mean"] / 8)
    assert record["params"]["trainable"] == record["params"]["bridge"] > 0
    cfg = record["config"]
    assert record["identity"] == {
        "task": "sst2",
        "method": "bridge",
        "sender": cfg["sender"]["name"],
        "receiver": cfg["receiver"]["name"],
        "compression": 8,
        "num_latents": 8,
        "layer": cfg["sender"]["layer"],
        "model": None,
        "seed": 42,
    }
    assert record["training"]["steps"] == 4 and record["timing"]["eval_s"] > 0
    assert record["config"]["trainer"]["max_steps"] == 4 and record["overrides"] == ["budget=tiny"]
    assert {"git_rev", "git_dirty", "hostname", "packages", "device"} <= set(record["env"])
    # they change float summation order (issue 21): every record says which it ran with
    assert record["env"]["cpu_threads"] >= 1 and record["env"]["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
    assert record["timing"]["train_s"] > 0 and record["memory"]["peak_rss_mb"] > 0
    telemetry = record["telemetry"]  # sampled in the background; this machine has no GPU: host figures only
    assert telemetry["gpu_available"] is False and telemetry["gpu_unavailable"] and telemetry["n_samples"] >= 1
    assert telemetry["host"]["rss_peak_mb"] > 50 and (run_dir / "telemetry.jsonl").exists()
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and {"idx", "label", "pred", "correct", "scores"} <= set(predictions[0])
    diagnostics = record["bridge"]["diagnostics"]  # collapse: reported, and warned about when it happens
    assert -1 <= diagnostics["soft_token_cosine_mean"] <= 1 and diagnostics["cosine_inputs"] == 4  # eval_samples
    assert diagnostics["single_class"] == (len({p["pred"] for p in predictions}) == 1)
    assert ("WARNING: single_class" in proc.stdout) == diagnostics["single_class"]
    assert {"input_cosine_mean", "shared_rms_ratio"} <= set(diagnostics)  # the prompt's share, apart
    # the shuffled-sender control: the same trained bridge, each item reading another item's sender states
    metrics, control = record["metrics"], record["bridge"]["control"]
    assert 0 <= metrics["accuracy_shuffled_sender"] <= 1 and control["metric"] == "accuracy"
    own = sum(p["correct"] for p in predictions) - sum(p["correct_shuffled_sender"] for p in predictions)
    assert control["delta"] == pytest.approx(own / 16) and control["delta_ci_low"] <= control["delta_ci_high"]
    assert metrics["majority_accuracy"] == max(sum(p["label"] == k for p in predictions) for k in (0, 1)) / 16
    flags = record["bridge"]["flags"]  # in the log and the record whenever one applies
    assert ("below_majority" in flags) == (metrics["accuracy"] < metrics["majority_accuracy"] + 0.1)
    assert ("sender_unread" in flags) == (control["delta_ci_low"] <= 0)
    assert all(f"WARNING: {flag}" in proc.stdout for flag in flags) and "own - shuffled sender" in proc.stdout
    assert record["training"]["loss"] == "classes"  # trainer.loss=auto on a classification task
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_accuracy" in r for r in log)
    assert record["training"]["heldout_probe_items"] == 4  # the quick eval reads training items, not test
    assert (run_dir / "checkpoints").is_dir()


def test_rerun_of_a_completed_run_is_skipped(outputs):
    run_train(*TINY, outputs=outputs)
    first = results(outputs)[0]
    proc = run_train(*TINY, outputs=outputs)
    assert "skipped" in proc.stderr + proc.stdout
    assert results(outputs)[0]["finished_at"] == first["finished_at"]


def test_local_multirun_makes_one_dir_per_config(outputs):
    run_train("-m", *TINY, "seed=1,2", outputs=outputs)
    records = results(outputs)
    assert [r["seed"] for r in records] == [1, 2]
    assert all(r["status"] == "completed" for r in records)
    assert len({r["run_dir"] for r in records}) == 2
    # the same sweep again finds the same dirs and skips them
    run_train("-m", *TINY, "seed=1,2", outputs=outputs)
    assert [r["finished_at"] for r in results(outputs)] == [r["finished_at"] for r in records]


def test_failed_run_records_the_error(outputs):
    proc = run_train(*TINY, "task.answer_prompt=", "task.labels=[a,a]", outputs=outputs, check=False)
    assert proc.returncode != 0
    assert "task.labels must be a non-empty list of distinct verbalisers" in proc.stderr


def _interrupt_after_first_step(overrides, outputs, signum=signal.SIGTERM):
    """Start a run, send ``signum`` once it has logged a step, wait for it to stop."""
    cmd = [sys.executable, "train.py", *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=run_env(outputs),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C reaches Python as in a terminal, even when the shell that started pytest ignores SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list((outputs / "runs").glob("*/log.jsonl")) if (outputs / "runs").exists() else []
        if logs and logs[0].read_text().strip():
            proc.send_signal(signum)
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    overrides = [*TINY, "trainer.max_steps=12", "trainer.checkpoint_every=100", "trainer.eval_every=0"]
    run_train(*overrides, outputs=tmp_path / "straight")
    (straight,) = results(tmp_path / "straight")

    code, out = _interrupt_after_first_step(overrides, tmp_path / "interrupted")
    assert code != 0, "the run finished before it could be interrupted:\n" + out[-2000:]
    (stopped,) = results(tmp_path / "interrupted")
    assert stopped["status"] == "interrupted"
    run_train(*overrides, outputs=tmp_path / "interrupted")  # the same command again resumes
    (resumed,) = results(tmp_path / "interrupted")
    assert resumed["status"] == "completed"
    assert resumed["training"]["resumed_from"] >= 1
    assert resumed["metrics"] == straight["metrics"]
    pred = lambda root, r: (Path(r["run_dir"]) / "predictions.jsonl").read_text()  # noqa: E731
    assert pred(tmp_path / "interrupted", resumed) == pred(tmp_path / "straight", straight)


def test_ctrl_c_checkpoints_after_the_step_and_says_how_to_resume_in_one_line(tmp_path):
    """Before: Ctrl-C wrote no checkpoint (the steps since the last one were lost) and printed a
    traceback of about a hundred lines. Now it is SIGTERM's path: finish the step, checkpoint, one line."""
    outputs = tmp_path / "outputs"
    overrides = [*TINY, "trainer.max_steps=200", "trainer.checkpoint_every=1000", "trainer.eval_every=0"]
    code, out = _interrupt_after_first_step(overrides, outputs, signal.SIGINT)
    (stopped,) = results(outputs)
    run_dir = Path(stopped["run_dir"])
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert code == 130 and stopped["status"] == "interrupted", out[-3000:]
    step = steps[-1]
    assert 1 <= step < 200 and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{step:08d}"]
    line = f"interrupted at step {step}; rerun the same command to resume"
    assert out.rstrip().endswith(line) and "Traceback" not in out, out[-3000:]
    after = [x for x in out[out.index("received SIGINT") :].splitlines()[1:] if "[telepathy.progress]" not in x]
    assert len(after) == 1, out[-3000:]  # the notice, the progress line of the step it finished, that line
    assert line in (run_dir / "train.log").read_text()
    assert stopped["error"] == {"type": "Interrupted", "message": f"interrupted at step {step} (SIGINT)"}
    run_train(*overrides, outputs=outputs)  # the same command again
    (resumed,) = results(outputs)
    assert resumed["status"] == "completed" and resumed["training"]["resumed_from"] == step


def test_a_run_learns_the_same_whatever_the_micro_batch_split(outputs):
    """The effective batch of 4 as 4 x 1 and, with a per-device cap of 2 (``resources.max_per_device``: the
    split a smaller GPU gets), as 2 x 2: every step's loss and gradient norm agree, so a result does not
    depend on the card. The previous default (bridge.centre_grad) differed by 14% at step 1 here."""
    rows = {}
    for cap in (4, 2):
        out = outputs / f"cap{cap}"
        run_train(*TINY, f"resources.max_per_device={cap}", outputs=out)
        (record,) = results(out)
        assert record["batch"]["per_device"] == cap and record["batch"]["effective"] == 4
        log = [json.loads(line) for line in (Path(record["run_dir"]) / "log.jsonl").read_text().splitlines()]
        rows[cap] = [r for r in log if "loss" in r]
    assert len(rows[4]) == len(rows[2]) == 4
    for whole, split in zip(rows[4], rows[2]):
        assert split["loss"] == pytest.approx(whole["loss"], rel=1e-4)
        assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)


def test_a_bridge_trains_at_the_split_its_resident_memory_allows_not_the_two_model_table(outputs):
    # before: the size table's dual-model cap (2 here, as the 8B pair's) split the batch although the
    # sender leaves the device once its features are computed; the record said per-device 2
    run_train(*TINY, "batch_by_size.sizes=[{name:t,max_params:null,dual:2,single:2}]", outputs=outputs)
    (record,) = results(outputs)
    assert (record["batch"]["per_device"], record["batch"]["grad_accum"]) == (4, 1)
    assert record["batch"]["rule"] == "memory" and record["batch"]["resident"] == ["receiver"]
