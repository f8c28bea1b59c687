"""The run lifecycle behind ``python train.py``.

1. validate the config (nothing loads before it passes);
2. find the run's directory (a function of its config: reruns land in the same place);
3. skip it if it already completed (``+rerun=all`` forces); for a deterministic
   method, reuse a completed run of another seed with the same config (its whole record);
4. run ``method=<name>``; write ``result.json`` on every exit path: completed,
   failed (error type, traceback, out-of-memory flag) or interrupted (preempted:
   the requeued job resumes from the last checkpoint). ``attempts`` lists every attempt
   of the run dir (earlier ones carried from the record found there), so a resumed run's
   cost (``timing.all_attempts_s``) is the sum of them all, not only the last one.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from telepathy import batching, data, hydra_glue, methods, runlock, telemetry, tracking
from telepathy import config as tconfig
from telepathy.compression import latents
from telepathy.methods import RunContext
from telepathy.models import placement
from telepathy.resources import batch_plan
from telepathy.results import (
    FLAGS,
    HYDRA_DIR,
    LOG_FILE,
    PREDICTIONS_FILE,
    RESULT_FILE,
    attempt,
    attempts_seconds,
    earlier_attempts,
    environment,
    gpus_held,
    load_result,
    measured,
    now,
    peak_memory,
    read_result,
    record,
    redact,
    run_identity,
    secret_values,
    write_json,
    write_jsonl,
    write_text,
)
from telepathy.shared_runs import share_result
from telepathy.training import CHECKPOINT_DIR, Interrupted

log = logging.getLogger("telepathy")


def _output_dir(cfg) -> Path:
    """Hydra's output dir for this job (set from ``telepathy.run_dir``), or the same path computed directly."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return tconfig.run_dir(cfg)


# what torch and the OS say when host memory runs out (a CPU tensor too large to allocate)
HOST_OOM = ("can't allocate memory", "cannot allocate memory", "defaultcpuallocator")


def _oom_kind(err: BaseException) -> str | None:
    """``gpu`` / ``host`` when ``err`` is running out of device / host memory, else None."""
    text = str(err).lower()
    if isinstance(err, torch.cuda.OutOfMemoryError) or "cuda out of memory" in text:
        return "gpu"
    if isinstance(err, MemoryError) or any(marker in text for marker in HOST_OOM):
        return "host"
    return "gpu" if "out of memory" in text else None


def _is_oom(err: BaseException) -> bool:
    return _oom_kind(err) is not None


def _find_reusable(cfg, run_dir: Path) -> dict | None:
    """A completed run of a deterministic method with the same config except the seed."""
    key = tconfig.config_hash(cfg, exclude=("seed",))
    for other in sorted(run_dir.parent.glob("*")):
        if other == run_dir:
            continue
        found = read_result(other)
        if (
            found
            and found.get("status") == "completed"
            and found.get("seedless_hash") == key
            and not found.get("reused_from")
        ):
            return found
    return None


# --- every exit path ends with a final status ---------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """SIGTERM/SIGUSR2/SIGINT anywhere in the run raise ``SystemExit``, which the lifecycle records as ``interrupted``.

    SIGTERM's default action ends the process without running any Python code, so a run
    stopped while loading models, extracting features or evaluating would keep saying
    ``running`` for ever; Ctrl-C's ``KeyboardInterrupt`` would print a hundred lines of
    traceback. A handler installed before (submitit's requeue on SLURM) runs first; inside the
    training loop the preemption guard (telepathy/training.py) takes the signal, checkpoints
    after the step and then calls this handler. A SIGINT the process ignores stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {}

    def stop(signum, frame):
        handler = previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, frame)
        raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")

    for sig in signals:
        if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interruption(stop: BaseException) -> tuple[str, int]:
    """(the one line a stopped run leaves on the console and in train.log, the exit status)."""
    if isinstance(stop, Interrupted):
        line = f"interrupted at step {stop.step}; rerun the same command to resume"
        return line, 130 if stop.signal_name == "SIGINT" else 1
    why = str(stop) or type(stop).__name__
    sigint = isinstance(stop, KeyboardInterrupt) or why.endswith("SIGINT")
    code = stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 1
    return f"interrupted ({why}); rerun the same command to resume", 130 if sigint else code


def main(cfg: DictConfig) -> dict | None:
    methods.validate(cfg)
    run_dir = _output_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # one live job per run dir (a second one exits before writing) + heartbeat for `python -m telepathy status`
    with runlock.hold(run_dir, float(OmegaConf.select(cfg, "run.heartbeat_s", default=30))) as lease:
        _save_hydra_config(cfg, run_dir)
        return _run(cfg, run_dir, lease)


def _save_hydra_config(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's ``.hydra/`` (config.yaml, hydra.yaml, overrides.yaml), secrets redacted, written once the
    run dir's lock is held: conf/train.yaml sets ``hydra.output_subdir: null`` because Hydra writes them
    before the task starts, so a second job on a live run rewrote the live run's copies."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # called without Hydra (tests, tools): there is nothing of Hydra's to save
        return
    task = OmegaConf.to_container(cfg, resolve=False)
    hydra = {"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)}
    overrides = list(hydra_cfg.overrides.task)
    secrets = secret_values(task, hydra, overrides)
    for name, value in (("config.yaml", task), ("hydra.yaml", hydra), ("overrides.yaml", overrides)):
        write_text(run_dir / HYDRA_DIR / name, OmegaConf.to_yaml(OmegaConf.create(redact(value, secrets))))


def _existing_record(run_dir: Path) -> dict | None:
    """The record this attempt finds in its run dir. One that is damaged on disk is moved aside
    (``result.json.damaged``) with a warning naming it and why: the run is redone from its
    checkpoints, and its earlier attempts come from the heartbeat (``results.earlier_attempts``)."""
    found = load_result(run_dir)
    if found.problem is not None:
        aside = found.path.with_name(f"{RESULT_FILE}.damaged")
        log.warning("%s; moved to %s, the run is redone from its last checkpoint", found.problem, aside.name)
        with contextlib.suppress(OSError):
            found.path.replace(aside)
    return found.record


def _run(cfg: DictConfig, run_dir: Path, lease: runlock.Lease | None = None) -> dict | None:
    existing = _existing_record(run_dir)
    rerun = cfg.get("rerun")
    if existing and existing.get("status") == "completed" and rerun != "all":
        log.info("skipped: %s already completed (+rerun=all to force)", run_dir)
        tracking.skipped(cfg, run_dir, existing)  # logger= added since: published from the run's files
        if lease is not None and existing.get("attempts"):  # this hold's heartbeat keeps their copy
            lease.note(attempts=existing["attempts"], ended=True)
        return existing.get("metrics")
    if rerun == "all":
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        (run_dir / LOG_FILE).unlink(missing_ok=True)

    method = methods.get(cfg.method.name)
    devices = placement(cfg)
    base = {
        "run_id": run_dir.name,
        "run_dir": run_dir,
        "identity": run_identity(cfg, latents(cfg) if tconfig.uses_soft_tokens(cfg) else None),
        "config_hash": tconfig.config_hash(cfg),
        "seedless_hash": tconfig.config_hash(cfg, exclude=("seed",)),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": _overrides(),
        "env": environment(device=str(devices["receiver"])),
        "resources": _resources(cfg),
        "batch": batch_plan(cfg),  # per-device batch, accumulation, effective batch, and why (resources.batch_plan)
        "reused_from": None,
    }
    started = now()
    t0 = time.time()

    if method.DETERMINISTIC:
        source = _find_reusable(cfg, run_dir)
        if source is not None:
            log.info("deterministic method: reusing %s for seed %s", source["run_dir"], cfg.seed)
            src_pred = Path(source["run_dir"]) / PREDICTIONS_FILE
            if src_pred.exists():
                shutil.copyfile(src_pred, run_dir / PREDICTIONS_FILE)
            done = record(
                "completed",
                **{**base, "reused_from": source["run_dir"]},
                **measured(source),
                started_at=started,
                finished_at=now(),
            )
            write_json(run_dir / RESULT_FILE, done)
            tracking.start(cfg, run_dir).finish(done)
            share_result(cfg, done)
            return done["metrics"]

    # every attempt of this run dir (preempted, killed, failed, resumed) counts for its cost; +rerun=all starts afresh
    prior = [] if rerun == "all" else earlier_attempts(existing, lease.previous if lease else None)
    gpus = gpus_held(base["resources"], base["env"])

    def attempts(status: str, seconds: float | None) -> list[dict]:
        return [*prior, attempt(status, started, seconds, gpus=gpus, job=runlock.job_id())]

    changes = hydra_glue.config_changes(cfg)
    if changes:
        log.info("%s", changes)  # the console and train.log: what this run changes, before it starts
    if lease is not None:  # the heartbeat keeps the attempts too: they survive a damaged result.json
        lease.note(attempts=prior, gpus=gpus)
    write_json(run_dir / RESULT_FILE, record("running", **base, attempts=attempts("running", None), started_at=started))
    sampler = telemetry.start(cfg, run_dir)  # GPU / host usage → telemetry.jsonl, summary in the record
    tracker = tracking.start(cfg, run_dir)  # logger=: the config now, log.jsonl rows as they come, the record last
    batching.apply(cfg, base["batch"])

    def closed(history: list[dict]) -> None:
        if lease is not None:
            lease.note(attempts=history, ended=True)

    def ended(status: str, error: dict, **fields) -> None:
        """The record of an attempt that did not complete (its time still counts: ``attempts``)."""
        history = attempts(status, time.time() - t0)
        fields.update(started_at=started, finished_at=now(), telemetry=sampler.stop(), error=error)
        closed(history)
        final = record(status, **base, attempts=history, **fields)
        try:
            write_json(run_dir / RESULT_FILE, final)
        except OSError as err:  # a full or read-only disk: the error that stopped the run is the one to report
            log.error("the %s record was not written: %s", status, err)
        tracker.finish(final)

    try:
        with stop_on_signals(), tracking.live(tracker):
            out = method.run(cfg, RunContext(cfg, run_dir, devices))
    except (SystemExit, KeyboardInterrupt) as stop:  # a signal (Ctrl-C, preemption): a requeued job resumes
        ended("interrupted", {"type": type(stop).__name__, "message": str(stop)})
        line, code = _interruption(stop)
        log.warning("%s", line)  # the console and train.log: every interruption, in one line
        raise SystemExit(code) from None
    except BaseException as err:
        error = {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}
        kind = _oom_kind(err)
        ended("failed", {**error, "oom": kind is not None, "oom_kind": kind}, memory=peak_memory())
        log.error("run failed (%s: %s); record in %s", type(err).__name__, err, run_dir / RESULT_FILE)
        raise
    if out["predictions"] is not None:
        write_jsonl(run_dir / PREDICTIONS_FILE, out["predictions"])
    total_s = time.time() - t0
    runs = attempts("completed", total_s)
    # total_s: this attempt (what the cost model calibrates on); all_attempts_s: what the run cost
    timing = {**out["timing"], "total_s": total_s, "all_attempts_s": attempts_seconds({"attempts": runs})}
    timing.update(started_at=started, finished_at=now())
    done = record(
        "completed",
        **base,
        attempts=runs,
        metrics=out["metrics"],
        params=out["params"],
        **out["details"],
        timing=timing,
        memory=peak_memory(),
        telemetry=sampler.stop(),
        data_shortfall=list(data.SHORTFALLS),
        started_at=started,
        finished_at=timing["finished_at"],
    )
    closed(runs)
    write_json(run_dir / RESULT_FILE, done)
    tracker.finish(done)
    share_result(cfg, done)  # deterministic: the same record for the seeds the sweep pointed here
    _log_summary(done)
    return done["metrics"]


def _resources(cfg) -> dict:
    """What the launcher chose (``resources.*``), plus the GPU-memory estimate for local runs."""
    from telepathy.resources import estimate

    out = OmegaConf.to_container(cfg.get("resources", {}), resolve=True)
    if "estimate_gb" not in out:
        out["estimate_gb"] = round(estimate(cfg).total_gb, 3)
    return out


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def _log_summary(record: dict) -> None:
    m = record["metrics"]
    rows = [(k, v) for k, v in m.items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{record['method']} on {record['task']} (seed {record['seed']}) → {record['run_dir']}"]
    lines += [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in rows]
    if "bridge" in record:
        b = record["bridge"]
        # measured: text tokens the sender read per soft token (bridge.compression_ratio counts
        # the instruction and template tokens around the text too, so it is not the compression)
        m_tokens = b["num_latents"]
        lines.append(
            f"  {'soft tokens (M)':<{width}}  {m_tokens} (compression {b['compression_factor']}x nominal, "
            f"{b['measured_compression_mean']:.1f}x measured = {b['text_tokens_mean']:.1f} text tokens / {m_tokens})"
        )
        if b.get("truncated_test_items"):
            lines.append(
                f"  WARNING: task.max_input_tokens cut {b['truncated_test_items']} test texts the sender read "
                f"(other methods read them whole, up to task.max_text_words)"
            )
        d = b.get("diagnostics") or {}
        if "soft_token_cosine_mean" in d:
            lines.append(f"  {'soft-token cosine':<{width}}  {d['soft_token_cosine_mean']:.4f} (across test inputs)")
        control = b.get("control")
        if control:
            lines.append(
                f"  {'own - shuffled sender':<{width}}  {control['delta']:+.4f} {control['metric']} "
                f"(95% CI {control['delta_ci_low']:+.4f} to {control['delta_ci_high']:+.4f}, over test items)"
            )
        for flag in b.get("flags", []):
            lines.append(f"  WARNING: {flag}: {FLAGS.get(flag, flag)}")
    log.info("final metrics: %s", "\n".join(lines))  # console, train.log and the SLURM log
