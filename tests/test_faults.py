"""Fault injection: what survives what (docs/cluster.md, "What survives what").

Each test injects one fault the way it happens on a cluster and checks that no work
is lost, doubled or left in an unknown state. The unit tests here need no cluster;
the ones that need the scheduler are in the ``slurm``-marked section at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_training import Toy, make_loss, trainer_cfg

from helpers import REPO, TINY, compose, needs_data, run_train
from telepathy.training import CHECKPOINT_DIR, fit, latest_checkpoint

# --- checkpoints ----------------------------------------------------------------------


def _train(run_dir: Path, **kw):
    model = Toy()
    return model, fit(model, make_loss(model), 20, trainer_cfg(**kw), seed=7, run_dir=run_dir)


def test_truncated_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    ref, _ = _train(tmp_path / "ref", max_steps=6)
    run = tmp_path / "run"
    _train(run, max_steps=6)  # checkpoints step 3 and step 6
    newest = latest_checkpoint(run)
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a node died mid-copy

    model, result = _train(run, max_steps=6)
    assert result.resumed_from == 3
    assert "step_00000006: trainable.safetensors has" in caplog.text  # which and why
    assert (run / CHECKPOINT_DIR / "damaged_step_00000006").is_dir()
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)  # resuming from the older checkpoint is still exact


def test_checkpoint_damaged_in_place_is_caught_by_its_hash(tmp_path, caplog):
    run = tmp_path / "run"
    _train(run, max_steps=6)
    state = latest_checkpoint(run) / "state.pt"
    raw = bytearray(state.read_bytes())
    raw[-40] ^= 0xFF  # same size, one flipped byte
    state.write_bytes(bytes(raw))
    _, result = _train(run, max_steps=6)
    assert result.resumed_from == 3
    assert "state.pt does not match its sha256" in caplog.text


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_pickle_payload_in_state_pt_is_refused_and_never_runs(tmp_path, caplog):
    run = tmp_path / "run"
    _train(run, max_steps=3)
    folder = latest_checkpoint(run)
    marker = tmp_path / "payload-ran"
    payload = _Payload()
    payload.target = str(marker)
    state = torch.load(folder / "state.pt", weights_only=False)  # the test's own file
    state["data_position"] = payload
    torch.save(state, folder / "state.pt")  # someone who can write the scratch dir...
    if (folder / "checkpoint.json").exists():  # ...rewrites the checksums too
        from telepathy.checkpoint import write_manifest

        write_manifest(folder, 3)

    _, result = _train(run, max_steps=3)
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert result.resumed_from is None  # refused, so training started again
    assert "does not load (UnpicklingError" in caplog.text


def test_log_rows_after_the_checkpoint_are_not_doubled_on_resume(tmp_path):
    run = tmp_path / "run"
    _train(run, max_steps=5, checkpoint_every=2)  # keeps checkpoints 4 and the final 5; log rows 1..5
    for folder in sorted((run / CHECKPOINT_DIR).glob("step_*"))[1:]:
        shutil.rmtree(folder)  # as if killed (-9) after step 5 was logged but before it was checkpointed
    assert latest_checkpoint(run).name == "step_00000004"
    _, result = _train(run, max_steps=5, checkpoint_every=2)
    assert result.resumed_from == 4
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# --- shared model cache ---------------------------------------------------------------

CONTENT = b"A" * 4096 + b"B" * 4096
FAKE_PACKAGE = """
import os, time
from pathlib import Path

def assemble(path):
    # like the real chunk packages: copy the chunks into `path`, slowly
    with open(Path(__file__).parent / "calls", "a") as log:
        log.write("x")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"A" * 4096)
        f.flush()
        time.sleep(0.3)
        if os.environ.get("FAKE_GGUF_FAIL"):
            raise OSError("job killed mid-assembly")
        f.write(b"B" * 4096)
    return Path(path)
"""


@pytest.fixture
def chunked_gguf(tmp_path, monkeypatch):
    """(model config, cached GGUF path, assemble-call counter) for a fake chunked-GGUF package."""
    from omegaconf import OmegaConf

    name = f"fake_gguf_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "pkgs" / name).mkdir(parents=True)
    (tmp_path / "pkgs" / name / "__init__.py").write_text(FAKE_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    cfg = OmegaConf.create(
        {
            "name": "fake",
            "gguf_package": name,
            "gguf_file": "m.gguf",
            "gguf_assemble": True,
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    calls = tmp_path / "pkgs" / name / "calls"
    return cfg, tmp_path / "cache" / "gguf" / "m.gguf", lambda: len(calls.read_text()) if calls.exists() else 0


def test_a_killed_assembly_leaves_no_half_file_in_the_cache(chunked_gguf, monkeypatch):
    from telepathy.models import _gguf_source

    cfg, target, calls = chunked_gguf
    monkeypatch.setenv("FAKE_GGUF_FAIL", "1")
    with pytest.raises(OSError):
        _gguf_source(cfg)
    assert not target.exists()
    monkeypatch.delenv("FAKE_GGUF_FAIL")
    _gguf_source(cfg)  # the next job assembles it again instead of reading half a file
    assert calls() == 2 and target.read_bytes() == CONTENT


def test_concurrent_jobs_assemble_once_and_never_read_half_a_file(chunked_gguf):
    from telepathy.models import _gguf_source

    cfg, target, calls = chunked_gguf
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            if target.exists():
                seen.append(target.read_bytes())
            time.sleep(0.01)

    threads = [threading.Thread(target=_gguf_source, args=(cfg,)) for _ in range(3)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    seen.append(target.read_bytes())
    assert calls() == 1
    assert all(content == CONTENT for content in seen), "a reader saw a half-written GGUF"


# --- run-dir lock and heartbeat ---------------------------------------------------------

HOLDER = """
import sys, time
from telepathy import runlock
from telepathy.results import write_json
with runlock.hold(sys.argv[1], float(sys.argv[2])):
    write_json(sys.argv[1] + "/result.json", {"status": "running"})
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder():
    """Start a process that owns a run dir (lock + heartbeat) the way a running job does."""
    procs = []

    def start(run_dir: Path, heartbeat_s: float = 30.0) -> subprocess.Popen:
        run_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(run_dir), str(heartbeat_s)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@needs_data
def test_a_second_job_on_a_live_run_exits_in_one_line_without_writing(tmp_path, holder):
    """before: 13 lines of traceback, and Hydra rewrote the live run's .hydra/*.yaml on its way in."""
    from telepathy.config import run_dir as config_run_dir

    args = [*TINY, "task=sst2", "trainer.max_steps=2", f"paths.output_dir={tmp_path / 'out'}"]
    run_dir = config_run_dir(compose(*args))
    holder(run_dir, heartbeat_s=3600)  # its heartbeat.json does not change during the test
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):  # what the live run's own start wrote
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / name).write_text(f"# the live run's {name}\n")
    (run_dir / "train.log").write_text("the live run's log\n")
    time.sleep(0.05)  # any later write would show in the modification times

    def snapshot():
        return {
            str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in run_dir.rglob("*")
            if p.is_file()
        }

    before = snapshot()
    proc = run_train(*args, outputs=tmp_path / "out", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 2, proc.stderr[-2000:]
    assert lines[0].startswith(f"{run_dir} is already running as job - on"), lines
    assert lines[1] == "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
    assert snapshot() == before  # nothing written, created or touched in the live run's dir
    assert json.loads((run_dir / "result.json").read_text()) == {"status": "running"}


def test_a_run_killed_without_a_signal_shows_interrupted_stale(tmp_path, holder):
    from telepathy.cluster import status

    run_dir = tmp_path / "out" / "runs" / "r1"
    proc = holder(run_dir, heartbeat_s=1)
    rows = status.collect(tmp_path / "out")
    assert [(r["state"], r["detail"].startswith("heartbeat")) for r in rows] == [("running", True)]
    proc.kill()  # kill -9: no signal handler runs, result.json stays "running"
    proc.wait()
    (row,) = status.collect(tmp_path / "out")
    assert row["state"] == "interrupted" and row["detail"].startswith("(stale) pid"), row
    assert "relaunch starts it again" in row["detail"]


def test_a_heartbeat_from_another_host_goes_stale_after_four_beats(tmp_path):
    from telepathy import runlock

    beat = {"host": "elsewhere", "pid": 1, "time": 1000.0, "interval_s": 30}
    assert runlock.staleness(beat, now=1000.0 + 4 * 30) is None
    assert runlock.staleness(beat, now=1000.0 + 4 * 30 + 1).startswith("no heartbeat for 121s from elsewhere")


# --- the cost of a resumed run: every attempt counts --------------------------------------


def test_a_resumed_run_records_and_sums_every_attempt(tmp_path, monkeypatch):
    """kill -9, then preempted, then completed: the record keeps all three attempts (the killed
    one ending at its last heartbeat) and timing.all_attempts_s is their sum; total_s stays the last."""
    import types

    from telepathy import lifecycle, methods, runlock
    from telepathy.results import _epoch

    cfg = compose(*TINY, "task=sst2", f"paths.output_dir={tmp_path / 'out'}", "cluster.telemetry_interval_s=0")
    run_dir = lifecycle.tconfig.run_dir(cfg)
    plan = iter(["kill -9", "preempted", "completed"])

    def run(cfg, ctx):
        what = next(plan)
        time.sleep(0.2)
        if what == "kill -9":  # what a SIGKILL leaves: the "running" record, a heartbeat 5 s after the start
            raise KeyError(json.loads((ctx.run_dir / "result.json").read_text()))
        if what == "preempted":
            raise SystemExit("preempted")
        return {"predictions": None, "metrics": {"accuracy": 1.0}, "params": {}, "details": {}, "timing": {}}

    monkeypatch.setattr(
        methods, "get", lambda name: types.SimpleNamespace(DETERMINISTIC=False, run=run, validate=lambda cfg: None)
    )
    with pytest.raises(KeyError) as killed:
        lifecycle.main(cfg)
    running = killed.value.args[0]
    (run_dir / "result.json").write_text(json.dumps(running))
    beat = {**runlock.read_heartbeat(run_dir), "time": _epoch(running["started_at"]) + 5.0}
    (run_dir / runlock.HEARTBEAT_FILE).write_text(json.dumps(beat))
    with pytest.raises(SystemExit):
        lifecycle.main(cfg)
    lifecycle.main(cfg)

    done = json.loads((run_dir / "result.json").read_text())
    attempts = done["attempts"]
    assert [(a["status"], a["end"]) for a in attempts] == [
        ("interrupted", "heartbeat"),
        ("interrupted", "record"),
        ("completed", "record"),
    ]
    assert attempts[0]["seconds"] == 5.0 and all(0.2 <= a["seconds"] < 5 for a in attempts[1:])
    assert all(a["gpus"] == 0 for a in attempts)  # a CPU run
    assert done["timing"]["total_s"] == pytest.approx(attempts[-1]["seconds"], abs=1e-3)
    assert done["timing"]["all_attempts_s"] == pytest.approx(sum(a["seconds"] for a in attempts), abs=1e-3)


# --- launches on the local SLURM cluster ------------------------------------------------


def _slurm():
    from test_slurm import SKIP_REASON

    return pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


slurm = [pytest.mark.slurm, needs_data]
# a 1-GPU job (150G) and a 2-GPU job (300G): the node has 256G, so the second array cannot run
TOO_BIG = [
    "-m",
    "hydra/launcher=slurm",
    *TINY,
    "task=trec",
    "trainer.max_steps=2",
    "compression=8,1",  # 1 GPU, and 2 GPUs on a 1.05 GB "GPU" (test_slurm.GPU_SPLIT)
    "cluster.gpu_mem_gb=1.05",
    "cluster=test_node",
    "cluster.mem_gb_per_gpu=150",
]
TWO_RUNS = [
    "-m",
    "hydra/launcher=slurm",
    *TINY,
    "task=sst2,trec",
    "trainer.max_steps=2",
    "cluster=test_node",
]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Start every launch of this section at once (each is a train.py start), then wait for all."""
    from test_slurm import _job_ids

    from helpers import run_env

    base = tmp_path_factory.mktemp("faults")
    before = _job_ids()
    commands = {"partial": [*TOO_BIG, "cluster.preflight=false"], "twin_a": TWO_RUNS, "twin_b": TWO_RUNS}
    outputs = {name: base / ("twins" if name.startswith("twin") else name) for name in commands}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "train.py", *args],
            cwd=REPO,
            env=run_env(outputs[name]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    done = {name: (proc.wait(timeout=300), *proc.communicate()) for name, proc in procs.items()}
    new = _job_ids() - before
    yield {"out": outputs, "procs": done, "new_jobs": new}
    for job in new:  # these tests check what was queued, not the runs: free the node
        subprocess.run(["scancel", job.split("_")[0]], capture_output=True, check=False)


def _manifest_jobs(out: Path) -> list[dict]:
    return [j for path in sorted(out.glob("sweeps/*/jobs.json")) for j in json.loads(path.read_text())["jobs"]]


@pytest.mark.slurm
@_slurm()
def test_an_array_no_node_can_run_is_refused_in_one_line_by_sinfo():
    """What the launcher asks before its first sbatch (``_submit`` → ``_preflight``), against the real sinfo."""
    from telepathy.cluster import preflight
    from telepathy.resources import Resources

    def request(gpus, mem_gb):
        return Resources(
            gpus=gpus, cpus=gpus, mem_gb=mem_gb, timeout_min=240, placement={}, estimate_gb=1.0, device_gb=(1.0,) * gpus
        )

    assert preflight.check({"1gpu": request(1, 150)}, None) is None
    message = preflight.check({"1gpu": request(1, 150), "2gpu": request(2, 300)}, None)
    assert "\n" not in message and message.startswith("the cluster cannot run this launch; nothing was submitted")
    assert "array 2gpu (--gpus-per-node=2 --cpus-per-task=2 --mem=300G) fits no node of partition" in message
    assert "1gpu" not in message.split("fits no node")[0].replace("array 2gpu", "")
    assert "does not exist on this cluster" in preflight.check({"1gpu": request(1, 1)}, "nosuchpartition")
    assert "fits no node" in preflight.check({"9gpu": request(9, 1)}, None)  # more GPUs than a node has


def test_sinfo_lines_are_parsed_per_node_and_partition():
    from telepathy.cluster.preflight import parse_sinfo

    nodes, default = parse_sinfo(
        "gpu*|64|515000|gpu:a100:4(S:0-1)\ngpu*|64|515000|gpu:a100:4(S:0-1)\n"
        "long|64|515000|gpu:a100:4(S:0-1)\ncpu|128|256000|(null)\n"
    )
    assert default == "gpu"
    assert sorted((n.partitions, n.gpus, n.cpus) for n in nodes) == [(("cpu",), 0, 128), (("gpu", "long"), 4, 64)]


@pytest.mark.slurm
@needs_data
@_slurm()
def test_a_failing_sbatch_leaves_every_queued_array_recorded(launches):
    from telepathy.cluster import status

    out = launches["out"]["partial"]
    rc, _, stderr = launches["procs"]["partial"]
    assert rc == 1
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: sbatch failed for array 2gpu") and "were queued before it and are recorded" in error
    jobs = _manifest_jobs(out)
    assert [(j["resources"]["gpus"], j["state"]) for j in jobs] == [(1, "queued")]
    assert jobs[0]["slurm_job_id"] in launches["new_jobs"]
    assert [r["slurm_job_id"] for r in status.collect(out)] == [jobs[0]["slurm_job_id"]]  # not "no runs found"
    # what a relaunch plans with: the recorded job is alive, so it is not queued again
    assert status.alive_runs(out) in ({jobs[0]["run_dir"]: jobs[0]["slurm_job_id"]}, {}), "job already ended"


@pytest.mark.slurm
@needs_data
@_slurm()
def test_two_launches_of_one_sweep_at_once_queue_each_run_once(launches):
    out = launches["out"]["twin_a"]
    results = [launches["procs"][name] for name in ("twin_a", "twin_b")]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    jobs = _manifest_jobs(out)
    queued = [j for j in jobs if j["state"] == "queued"]
    assert len(queued) == 2 and len({j["run_dir"] for j in queued}) == 2, jobs
    assert sorted(j["state"] for j in jobs if j["state"] != "queued") in (
        ["active", "active"],
        ["skipped", "skipped"],
        ["active", "skipped"],
    )
    dirs = {json.loads(p.read_text())["sweep_dir"] for p in out.glob("sweeps/*/jobs.json")}
    assert len(dirs) == 2  # one sweep dir per launch, even in the same second


# --- deterministic baselines: one job per result ------------------------------------------


def _plan(*sweep: list[str]):
    from telepathy.cluster import sweep as sweep_mod

    jobs = [[*TINY, *overrides] for overrides in sweep]
    return sweep_mod.plan(lambda overrides: compose(*overrides), compose(*TINY), jobs, 0, {})


def test_deterministic_seeds_are_one_job_and_bridge_seeds_are_not(tmp_path, monkeypatch):
    from telepathy.cluster.sweep import describe

    monkeypatch.setenv("TELEPATHY_OUTPUTS", str(tmp_path))
    planned = _plan(*[[f"method={m}", f"seed={s}"] for m in ("zeroshot", "bridge") for s in (1, 2, 3)])
    assert [(j.state, j.seed) for j in planned] == [
        ("queue", 1),
        ("shared", 2),
        ("shared", 3),
        ("queue", 1),
        ("queue", 2),
        ("queue", 3),
    ]
    assert planned[1].shares == planned[2].shares == planned[0].run_dir
    assert "++run.reuse_seeds=[2,3]" in planned[0].job_overrides
    assert not any("reuse_seeds" in o for j in planned[3:] for o in j.job_overrides)
    hours = sum(j.resources.gpu_hours for j in planned if j.state == "queue")
    assert "4 to run in" in describe(planned, "") and "2 shared" in describe(planned, "")
    assert f"up to {hours:.1f} GPU-hours (GPUs" in describe(planned, "")


@needs_data
@pytest.mark.slow  # loads the two tiny models and evaluates (~15 s)
def test_the_one_deterministic_job_writes_every_seeds_record(tmp_path):
    from telepathy import lifecycle
    from telepathy.config import run_dir
    from telepathy.results import read_result

    args = [*TINY, "method=zeroshot", "task=sst2", f"paths.output_dir={tmp_path}"]
    lifecycle.main(compose(*args, "seed=1", "++run.reuse_seeds=[2,3]"))
    first = read_result(run_dir(compose(*args, "seed=1")))
    for seed in (2, 3):
        other = read_result(run_dir(compose(*args, f"seed={seed}")))
        assert other["status"] == "completed" and other["seed"] == seed
        assert other["reused_from"] == first["run_dir"] and other["metrics"] == first["metrics"]
        assert other["config_hash"] == run_dir(compose(*args, f"seed={seed}")).name.rsplit("-", 1)[1]
