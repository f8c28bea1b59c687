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

from telepathy import batching, data, methods, runlock, telemetry
from telepathy import config as tconfig
from telepathy.methods import RunContext
from telepathy.models import placement
from telepathy.resources import batch_plan
from telepathy.results import (
    PREDICTIONS_FILE,
    RESULT_FILE,
    attempt,
    attempts_seconds,
    earlier_attempts,
    environment,
    gpus_held,
    measured,
    now,
    peak_memory,
    read_result,
    record,
    run_identity,
    write_json,
    write_jsonl,
)
from telepathy.shared_runs import share_result

log = logging.getLogger("telepathy")


def _output_dir(cfg) -> Path:
    """Hydra's output dir for this job (set from ``telepathy.run_dir``), or the same path computed directly."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return tconfig.run_dir(cfg)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """SIGTERM/SIGUSR2 anywhere in the run raise ``SystemExit``, which the lifecycle records as ``interrupted``.

    SIGTERM's default action ends the process without running any Python code, so a run
    stopped while loading models, extracting features or evaluating would keep saying
    ``running`` for ever. A handler installed before (submitit's requeue on SLURM) runs
    first; inside the training loop the preemption guard (telepathy/training.py) takes the
    signal, checkpoints after the step and then calls this handler.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {}

    def stop(signum, frame):
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")

    for sig in signals:
        previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(cfg: DictConfig) -> dict | None:
    methods.validate(cfg)
    run_dir = _output_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # one live job per run dir (a second one exits before writing) + heartbeat for `python -m telepathy status`
    with runlock.hold(run_dir, float(OmegaConf.select(cfg, "run.heartbeat_s", default=30))) as last_beat:
        return _run(cfg, run_dir, last_beat)


def _run(cfg: DictConfig, run_dir: Path, last_beat: dict | None = None) -> dict | None:
    existing = read_result(run_dir)
    rerun = cfg.get("rerun")
    if existing and existing.get("status") == "completed" and rerun != "all":
        log.info("skipped: %s already completed (+rerun=all to force)", run_dir)
        return existing.get("metrics")
    if rerun == "all":
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "log.jsonl").unlink(missing_ok=True)

    method = methods.get(cfg.method.name)
    devices = placement(cfg)
    base = {
        "run_id": run_dir.name,
        "run_dir": run_dir,
        "identity": run_identity(cfg),
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
            share_result(cfg, done)
            return done["metrics"]

    # every attempt of this run dir (preempted, killed, failed, resumed) counts for its cost; +rerun=all starts afresh
    prior = [] if rerun == "all" else earlier_attempts(existing, last_beat)
    gpus = gpus_held(base["resources"], base["env"])

    def attempts(status: str, seconds: float | None) -> list[dict]:
        return [*prior, attempt(status, started, seconds, gpus=gpus, job=runlock.job_id())]

    write_json(run_dir / RESULT_FILE, record("running", **base, attempts=attempts("running", None), started_at=started))
    sampler = telemetry.start(cfg, run_dir)  # GPU / host usage → telemetry.jsonl, summary in the record
    batching.apply(cfg, base["batch"])

    def ended(status: str, error: dict, **fields) -> None:
        """The record of an attempt that did not complete (its time still counts: ``attempts``)."""
        history = attempts(status, time.time() - t0)
        fields.update(started_at=started, finished_at=now(), telemetry=sampler.stop(), error=error)
        write_json(run_dir / RESULT_FILE, record(status, **base, attempts=history, **fields))

    try:
        with stop_on_signals():
            out = method.run(cfg, RunContext(cfg, run_dir, devices))
    except (SystemExit, KeyboardInterrupt) as stop:  # a signal (Ctrl-C, preemption): a requeued job resumes
        ended("interrupted", {"type": type(stop).__name__, "message": str(stop)})
        raise
    except BaseException as err:
        error = {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}
        ended("failed", {**error, "oom": _is_oom(err)}, memory=peak_memory())
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
    write_json(run_dir / RESULT_FILE, done)
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
        if d.get("single_class"):
            lines.append("  WARNING: collapsed bridge: one class predicted for every test item")
    log.info("final metrics: %s", "\n".join(lines))  # console, train.log and the SLURM log
