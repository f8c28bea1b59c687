"""The command line behaves like Hydra's own: one-line errors before any run dir exists, exit code 1."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, needs_data, results, run_env, run_train

pytestmark = needs_data
HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."


def _fails_in_one_line(proc, outputs, *expected):
    """Exit code 1, stderr = the error line + Hydra's traceback hint, nothing written under outputs/."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines == [lines[0], HINT], proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0]
    assert not outputs.exists() or not any(outputs.rglob("*")), sorted(map(str, outputs.rglob("*")))
    return lines[0]


def test_bad_seed_fails_in_one_line_before_the_run_dir_exists(outputs):
    # before: seed=abc made outputs/runs/...-sabc-.../ and crashed in int() after the models loaded
    _fails_in_one_line(
        run_train(*TINY, "seed=abc", outputs=outputs, check=False),
        outputs,
        "seed='abc' is not allowed; allowed: an integer in [0, 4294967295]",
    )


def test_bad_value_of_one_multirun_job_leaves_no_run_dir(outputs):
    proc = run_train("-m", *TINY, "seed=-1,7", outputs=outputs, check=False)
    assert proc.returncode == 1
    assert "seed=-1 is not allowed" in proc.stderr
    assert not (outputs / "runs").exists()


def test_a_sweep_checks_every_job_before_the_first_runs_one_line_per_bad_job(outputs):
    """Before: the default launcher ran job #0, then died on #1's bad value with #2 never started."""
    proc = run_train("-m", *TINY, "seed=7,-1,8", "trainer.lr=1e-3,-1", outputs=outputs, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines == [
        "error: 4 of 6 jobs are invalid; none ran:",
        "  #1 budget=tiny seed=7 trainer.lr=-1: trainer.lr=-1 is not allowed; allowed: a number in [0, inf]",
        "  #2 budget=tiny seed=-1 trainer.lr=0.001: seed=-1 is not allowed; allowed: an integer in [0, 4294967295]",
        "  #3 budget=tiny seed=-1 trainer.lr=-1: seed=-1 is not allowed; allowed: an integer in [0, 4294967295]",
        "  #5 budget=tiny seed=8 trainer.lr=-1: trainer.lr=-1 is not allowed; allowed: a number in [0, inf]",
    ], proc.stderr[-3000:]
    assert not (outputs / "runs").exists() and "Launching" not in proc.stdout


def test_a_failing_job_is_a_row_of_the_end_table_and_the_sweep_goes_on(outputs, tmp_path):
    """Before: the job after the failed one ran, then the sweep ended in the failed job's traceback
    and the end-of-sweep table was lost. Now: every job runs, the table has the failure, exit 1."""
    from helpers import data_root

    root = tmp_path / "data"  # sst2 as it is; trec's test split breaks at line 4, after the checks before the run
    (root / "trec").mkdir(parents=True)
    (root / "sst2").symlink_to(data_root() / "sst2")
    (root / "trec" / "train.jsonl").symlink_to(data_root() / "trec" / "train.jsonl")
    head = (data_root() / "trec" / "test.jsonl").read_text().splitlines()[:3]
    (root / "trec" / "test.jsonl").write_text("\n".join([*head, '{"text": broken']) + "\n")
    proc = run_train("-m", *TINY, "task=trec,sst2", f"data.root={root}", outputs=outputs, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    trec, sst2 = sorted(results(outputs), key=lambda r: r["task"], reverse=True)
    assert (trec["status"], sst2["status"]) == ("failed", "completed")
    table = proc.stdout[proc.stdout.index("multirun summary (2 jobs)") :]
    assert "(1 completed, 1 failed)" in table
    failed = re.search(rf"failed .* {trec['run_id']}  (DataError: \S+)", table)  # the error, cut at 80 characters
    expected, shown = f"DataError: {root}/trec/test", failed and failed.group(1)
    assert shown and len(shown) > len("DataError: "), table
    assert shown.startswith(expected) or expected.startswith(shown), table
    assert re.search(rf"completed .* {sst2['run_id']}  accuracy=", table), table
    assert "1 of 2 jobs failed" in table


def test_a_phase_narrowed_to_one_job_runs_without_multirun(outputs):
    """A packed SLURM job runs each member as ``train.py +phase=... method=... task=... seed=...`` without -m
    (before: the phase check rejected it, every member exited 1 and the job still ended COMPLETED)."""
    proc = run_train(*TINY, "+phase=p1_seeds", "method=zeroshot", "task=sst2", "seed=42", outputs=outputs, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = results(outputs)
    assert (record["method"], record["task"], record["seed"], record["status"]) == ("zeroshot", "sst2", 42, "completed")
    partly = run_train(*TINY, "+phase=p1_seeds", "task=sst2", outputs=outputs, check=False)  # method, seed still swept
    assert partly.returncode == 1 and "+phase=p1_seeds is a sweep" in partly.stderr
    appended = run_train(*TINY, "+phase=p6_ablations", "+pair=small", "seed=42", outputs=outputs, check=False)
    assert appended.returncode == 0, appended.stderr[-3000:]  # a swept key that adds a group: +pair


def test_an_added_key_no_config_or_code_reads_fails_in_one_line_naming_the_closest_key(outputs):
    # before: Hydra's hint for `trainer.lrr=1` is `+trainer.lrr=1`, which then ran, the key a no-op, with a new run id
    _fails_in_one_line(
        run_train(*TINY, "+trainer.lrr=1", outputs=outputs, check=False),
        outputs,
        "+trainer.lrr=1 is not allowed: no config or code reads trainer.lrr; did you mean trainer.lr=1?",
    )


def test_a_phase_without_multirun_fails_in_one_line_instead_of_running_one_job(outputs):
    # before: Hydra ignored the phase's sweep and ran its first job, silently
    _fails_in_one_line(
        run_train(*TINY, "+phase=p1_seeds", outputs=outputs, check=False),
        outputs,
        "+phase=p1_seeds is a sweep (method=bridge,zeroshot,zeroshot_sender,zeroshot_calibrated "
        "task=sst2,agnews,trec seed=42,123,456)",
        "allowed: python train.py -m +phase=p1_seeds",
    )


def test_missing_model_fails_in_one_line(outputs):
    line = _fails_in_one_line(
        run_train(
            *TINY,
            "sender=llama32_1b",
            "sender.stand_in=null",  # budget=tiny would build it offline from its family (the next test)
            "paths.hf_cache_dir=" + str(outputs.parent / "hf"),
            outputs=outputs,
            check=False,
        ),
        outputs,
    )
    assert "model 'llama32_1b'" in line and "python -m telepathy.prepare sender=llama32_1b" in line


def test_preflight_accepts_a_hub_only_model_that_budget_tiny_builds_from_its_stand_in(monkeypatch, tmp_path):
    # before: under HF_HUB_OFFLINE=1 the preflight asked the hub cache for Llama-3.1-8B even though
    # budget=tiny never loads it (2 random layers + the SmolLM2 tokenizer): every rehearsal job failed
    from helpers import compose
    from telepathy import hydra_glue

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose("+phase=p1_seeds", *TINY, "paths.hf_cache_dir=" + str(tmp_path / "empty_hub_cache"))
    assert (cfg.sender.name, cfg.receiver.name) == ("llama31_8b", "mistral7b")
    hydra_glue.preflight(cfg)  # raises ModelNotAvailableError before the fix
    with_own_weights = compose("+phase=p1_seeds", *TINY, "sender.stand_in=null", "paths.hf_cache_dir=" + str(tmp_path))
    try:
        hydra_glue.preflight(with_own_weights)
    except hydra_glue.ModelNotAvailableError as err:
        assert "python -m telepathy.prepare sender=llama31_8b" in str(err)
    else:
        raise AssertionError("a random_init model without a stand-in needs its hub config: preflight must say so")


def test_missing_data_fails_in_one_line_and_full_error_shows_the_traceback(outputs, tmp_path):
    bad = [*TINY, f"data.root={tmp_path / 'nodata'}"]
    _fails_in_one_line(run_train(*bad, outputs=outputs, check=False), outputs, "task 'sst2'", "not found")
    proc = run_train(*bad, outputs=outputs, check=False, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "UsageError: task 'sst2'" in proc.stderr


def test_sigterm_during_feature_extraction_leaves_interrupted(outputs):
    """Before: SIGTERM outside the training loop killed the process and result.json kept saying "running"."""
    # the whole SST-2 train split (67k sentences), uncached: seconds of extraction to interrupt
    cmd = [sys.executable, "train.py", *TINY, "task.train_samples=null", "cache=off"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=run_env(outputs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    for line in proc.stdout:  # progress is logged (no TTY): its first line says extraction has begun
        seen.append(line)
        if "sender features (train): 0/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, out[-3000:]
    (record,) = results(outputs)
    assert record["status"] == "interrupted", out[-3000:]
    assert record["error"] == {"type": "SystemExit", "message": "stopped by signal SIGTERM"}
    assert "train: 0/" not in out  # stopped before the training loop (its guard is not what caught it)


def test_logs_hold_progress_evals_and_final_metrics_and_a_multirun_ends_with_a_table(outputs):
    proc = run_train("-m", *TINY, "seed=1,2", outputs=outputs)
    records = results(outputs)
    assert [r["status"] for r in records] == ["completed", "completed"]
    for record in records:
        log = (Path(record["run_dir"]) / "train.log").read_text()  # Hydra's job log = the SLURM log's content
        assert (
            "final metrics: bridge on sst2" in log
            and f"accuracy                    {record['metrics']['accuracy']:.4f}" in log
        )
        assert 'eval at step 2: {"step": 2, "eval_accuracy"' in log
        # at the start, what the run changes from the defaults (before: no config in the log at all)
        changes = log[log.index("values differ from the defaults (all of it: .hydra/config.yaml)") :]
        assert "\n  groups: budget=tiny\n" in changes and f"\n  seed: 42 → {record['seed']}\n" in changes
        # no TTY: the progress bars are log lines with rate and ETA
        assert re.search(r"train: 4/4 step \(100%\) [\d.]+ step/s elapsed \d\d:\d\d ETA 00:00, loss=[\d.]+", log)
    summary = proc.stdout[proc.stdout.index("multirun summary (2 jobs)") :]
    for record in records:
        assert re.search(rf"completed .* {record['run_id']}  accuracy={record['metrics']['accuracy']:.4f}", summary)


def test_help_names_the_groups_and_phases():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for group in ("task=", "sender=", "receiver=", "method=", "budget=", "+phase=", "logger="):
        assert f"  {group}" in proc.stdout
    phases = sorted(p.stem for p in (REPO / "conf" / "phase").glob("*.yaml"))
    assert f"phase: {', '.join(phases)}" in proc.stdout
    assert "python train.py -sc install=bash" in proc.stdout


# --- failures found while the run executes: one line too (issue 23) ----------------------------


def _one_line(proc) -> str:
    """Exit code 1 and stderr = one line + Hydra's traceback hint, as Hydra's own errors; that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 2 and lines[1] == HINT, proc.stderr[-3000:]
    return lines[0]


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (root only); False where this process cannot."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB file system (a tmpfs; root only): enough for a tiny run's records, not its checkpoint."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=64k"):
        pytest.skip("a full disk is a small tmpfs here, which needs root (mount)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this user cannot write: a read-only tmpfs as root (root ignores permission bits), else 0555."""
    folder = tmp_path / "ro"
    mounted = _mount_tmpfs(folder, "ro,size=64k")
    if not mounted:
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o755)


def test_a_read_only_outputs_dir_fails_in_one_line_before_anything_is_written(read_only_dir):
    """before: Hydra's own mkdir of the run dir raised, with a traceback."""
    line = _fails_in_one_line(
        run_train(*TINY, outputs=read_only_dir / "outputs", check=False), read_only_dir / "outputs"
    )
    assert line.startswith(f"paths.output_dir='{read_only_dir / 'outputs'}': cannot write {read_only_dir} (")
    assert "allowed: a folder this user can write" in line


def test_a_full_disk_fails_in_one_line_naming_the_file(small_disk):
    """before: the checkpoint write failed in torch.save with "unexpected pos" and a long traceback."""
    out = small_disk / "outputs"
    line = _one_line(run_train(*TINY, "trainer.max_steps=2", outputs=out, check=False))
    assert (
        line.startswith(f"paths.output_dir='{out}': cannot write {out}/runs/") and "(No space left on device)" in line
    )
    (record,) = results(out)  # the failure is recorded where there was room for it
    assert record["status"] == "failed" and "No space left on device" in record["error"]["message"]
    assert not list(Path(record["run_dir"]).glob("checkpoints/.tmp_step_*"))  # no half checkpoint left


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_fails_in_one_line_before_the_run_dir_exists(outputs):
    """before: 42 lines of traceback from deep in model loading, and a failed run dir left behind."""
    line = _fails_in_one_line(run_train(*TINY, "device=cuda", outputs=outputs, check=False), outputs)
    assert line.startswith("device='cuda' is not allowed on this machine (torch ")
    assert line.endswith("; allowed: cpu, auto")


def _data_root(tmp_path: Path, test_rows: list[bytes]) -> Path:
    """A data root whose sst2 split has 32 short training sentences and ``test_rows`` as its test split."""
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    train = [json.dumps({"sentence": f"a fine film number {i}", "label": i % 2}).encode() for i in range(32)]
    (folder / "train.jsonl").write_bytes(b"\n".join(train) + b"\n")
    (folder / "validation.jsonl").write_bytes(b"\n".join(test_rows) + b"\n")
    return folder.parent


def test_non_utf8_bytes_in_a_data_file_fail_in_one_line_naming_the_file_and_line(outputs, tmp_path):
    """before: a UnicodeDecodeError traceback naming no file."""
    rows = [json.dumps({"sentence": f"a dull film {i}", "label": i % 2}).encode() for i in range(8)]
    rows[4] = b'{"sentence": "un caf\xe9 film", "label": 1}'
    root = _data_root(tmp_path, rows)
    line = _one_line(run_train(*TINY, f"data.root={root}", outputs=outputs, check=False))
    assert line == f"{root / 'sst2' / 'validation.jsonl'}:5: not UTF-8 (byte 0xe9 at column 21)"


def test_an_uncapped_100000_word_text_is_refused_in_one_line(outputs, tmp_path):
    """before: task.max_text_words=null let the receiver read a 100,000-word text: a 10 GB allocation
    that failed as a traceback, recorded as ``oom: false``."""
    import resource

    rows = [json.dumps({"sentence": f"a dull film {i}", "label": i % 2}).encode() for i in range(8)]
    rows[3] = json.dumps({"sentence": " ".join(["film"] * 100_000), "label": 1}).encode()
    root = _data_root(tmp_path, rows)
    limit = 8 << 30  # address space: what the test may take of the machine even where the fix is missing

    proc = subprocess.run(
        [sys.executable, "train.py", *TINY, "trainer.max_steps=2", "task.max_text_words=null", f"data.root={root}"],
        cwd=REPO,
        env=run_env(outputs),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    line = _one_line(proc)
    assert line.startswith("task.max_text_words: a prompt of 100") and "max_position_embeddings" in line
    (record,) = results(outputs)
    assert record["status"] == "failed" and record["error"]["type"] == "PromptTooLong"


def test_a_host_allocation_failure_is_recorded_as_out_of_memory():
    """before: torch's "DefaultCPUAllocator: can't allocate memory" was recorded as ``oom: false``."""
    import torch

    from telepathy import lifecycle

    host = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
        "to allocate 10002000100 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert lifecycle._is_oom(host) and lifecycle._is_oom(MemoryError())
    assert lifecycle._oom_kind(host) == "host" and lifecycle._oom_kind(MemoryError()) == "host"
    assert lifecycle._oom_kind(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "gpu"
    assert lifecycle._oom_kind(ValueError("bad label")) is None
