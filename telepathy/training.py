"""The one training loop: bridge, prompt tuning and LoRA all train through ``fit``.

Everything that decides the result is seeded or saved, so an interrupted run that
resumes from its last checkpoint ends with the same weights as one that never
stopped (on CPU): the data order is a function of (seed, epoch); the checkpoint
holds the trainable weights (safetensors), optimizer, scheduler, every RNG state
and the data position.

Preemption and Ctrl-C: SLURM sends SIGUSR2 (submitit) or SIGTERM before it stops a job;
a user presses Ctrl-C (SIGINT). ``fit`` notes the signal, finishes the current step, writes
a checkpoint and then hands the signal to the handler that was installed before it
(submitit's, which requeues the job) and stops with ``Interrupted`` ("interrupted at step
N"). The requeued job, or the same command run again, finds the checkpoint and resumes. A
second Ctrl-C stops at once (``KeyboardInterrupt``), without waiting for the step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from telepathy import checkpoint as ckpt
from telepathy import tracking
from telepathy.data import epoch_order
from telepathy.fsutil import iter_jsonl, writing
from telepathy.progress import progress
from telepathy.results import LOG_FILE, append_jsonl, write_jsonl

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TMP_PREFIX = ".tmp_step_"  # checkpoints/.tmp_step_<step>_<pid>: a checkpoint being written


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DataStream:
    """Batches of example indices in a seeded order, resumable from ``position``."""

    n: int
    batch_size: int
    seed: int
    position: int = 0

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(self.position, self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out += epoch_order(self.n, self.seed, epoch)[offset : offset + take]
            self.position += take
        return out


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and the persistent buffers: what a checkpoint must hold to give
    back the function that was trained (the bridge's input standardisation ``in_mean``/``in_std``
    is set from data, not from the initialisation; Hugging Face models keep no persistent buffers)."""
    persistent = module.state_dict(keep_vars=True)
    state = {k: p for k, p in module.named_parameters() if p.requires_grad}
    state.update((k, b) for k, b in module.named_buffers() if k in persistent)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(run_dir: Path, module, optimizer, scheduler, stream: DataStream, step: int) -> Path:
    """Write ``checkpoints/step_N`` via a temp folder + rename; keep the newest two."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f"{TMP_PREFIX}{step:08d}_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with writing(tmp):
            save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
            torch.save(
                {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": ckpt.rng_state(),
                    "data_position": stream.position,
                },
                tmp / ckpt.STATE,
            )
            ckpt.write_manifest(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: no half checkpoint left behind
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step_*"))
    return found[-1] if found else None


def remove_stray_writes(run_dir: Path) -> None:
    """Delete the temporary folders of checkpoint writes that never finished (a job killed, a
    full disk): this job owns the run dir (``runlock``), so no other writer is using them."""
    for stray in sorted((Path(run_dir) / CHECKPOINT_DIR).glob(f"{TMP_PREFIX}*")):
        log.info("removing %s, a checkpoint write that never finished", stray)
        shutil.rmtree(stray, ignore_errors=True)


def resume_point(run_dir: Path, module: torch.nn.Module) -> tuple[Path | None, dict | None]:
    """The newest intact checkpoint's folder and state, its weights loaded into ``module``
    (``telepathy.checkpoint``: verified, ``weights_only``, damaged ones moved aside); stray
    temporary folders of unfinished writes are removed first."""
    remove_stray_writes(run_dir)

    def load(folder: Path) -> dict:
        state = ckpt.load_state(folder)
        load_trainable(module, folder)
        return state

    return ckpt.newest_intact(sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step_*")), load)


def truncate_log(log_path: Path, step: int) -> None:
    """Drop the log rows after ``step`` (written after the checkpoint a resume starts from),
    so a resumed run's curves have each step once. A line that cannot be read (the half line
    a full disk or a kill leaves, bytes that are not UTF-8) is dropped too, with a warning
    naming the file and line: the log is redone from the checkpoint, it must never block it."""
    if not log_path.exists():
        return
    kept, later, damaged = [], 0, 0
    for _, row, why in iter_jsonl(log_path):
        if why is not None or not isinstance(row, dict):
            log.warning("%s; dropped (training resumes from its checkpoint)", why or f"{log_path}: not a row")
            damaged += 1
        elif row.get("step", 0) <= step:
            kept.append(row)
        else:
            later += 1
    if later:
        log.info("%s: dropped %d rows after step %d (they are redone)", LOG_FILE, later, step)
    with open(log_path, "rb") as f:  # a last row without its newline: the next append would join it
        unterminated = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
    if later or damaged or unterminated:
        write_jsonl(log_path, kept)


def load_trainable(module: torch.nn.Module, checkpoint: Path) -> None:
    """Load exactly ``trainable_state``'s keys: a missing one (e.g. a buffer an older checkpoint
    lacks) would silently keep its initial value, an unknown one means another module."""
    weights = load_file(str(Path(checkpoint) / "trainable.safetensors"))
    want = set(trainable_state(module))
    missing, unknown = sorted(want - set(weights)), sorted(set(weights) - want)
    if missing or unknown:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not match the module: missing {missing[:5]}, unknown {unknown[:5]}"
        )
    module.load_state_dict(weights, strict=False)  # frozen parameters are not in the checkpoint


class Interrupted(SystemExit):
    """A stop signal taken between two steps: the checkpoint of ``step`` is written, so rerunning
    the same command (or the requeued job) resumes from it."""

    def __init__(self, signum: int, step: int):
        self.signal_name, self.step = signal.Signals(signum).name, step
        super().__init__(f"interrupted at step {step} ({self.signal_name})")


class _PreemptionGuard:
    """Remember SIGUSR2/SIGTERM/SIGINT; after the step, checkpoint and pass it on.

    A second SIGINT (Ctrl-C twice) does not wait for the step: it raises ``KeyboardInterrupt``.
    A SIGINT that the process ignores (started with ``nohup`` or in a non-interactive shell's
    background) stays ignored.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, _frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt("a second Ctrl-C: stopped at once, without checkpointing this step")
        name = signal.Signals(signum).name
        again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
        log.warning("received %s: will checkpoint after this step%s", name, again)
        self.received = signum

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        self._restore()

    def pass_on(self, step: int) -> None:
        """Hand the signal to the handler installed before ours (submitit's requeues the job), then
        stop with ``Interrupted``: the checkpoint of ``step`` is written."""
        signum = self.received
        handler = self.previous.get(signum)
        self._restore()
        try:
            if callable(handler) and handler is not signal.default_int_handler:
                handler(signum, None)
        except SystemExit:
            pass  # the run's own stop (telepathy.lifecycle) or submitit's exit after requeueing: ours says the step
        raise Interrupted(signum, step)


def accumulate_gradients(
    loss_fn: Callable[[list[int]], tuple[torch.Tensor, dict]], micro_batches: list[list[int]], autocast=None
) -> dict[str, float]:
    """Backward every micro-batch of one optimiser step; return the step's mean stats.

    Each micro-batch's loss is a mean over its items, and the micro-batches of a step are equal
    (``batching.plan`` splits the effective batch by a divisor), so the summed gradients are the
    gradient of the mean over the whole effective batch: 1 x 16, 2 x 8 and 8 x 2 give one update.
    Stats stay on the device until the step ends, then cross to the host at once (one sync per
    optimiser step, not several per micro-step).
    """
    n = len(micro_batches)
    sums: dict[str, torch.Tensor | float] = {}
    for indices in micro_batches:
        with autocast or contextlib.nullcontext():
            loss, stats = loss_fn(indices)
        (loss / n).backward()
        for k, v in stats.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            sums[k] = sums.get(k, 0.0) + v / n
    if not sums:
        return {}
    keys = list(sums)
    device = next((v.device for v in sums.values() if torch.is_tensor(v)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in keys])
    return dict(zip(keys, values.tolist()))


@dataclass
class FitResult:
    steps: int
    resumed_from: int | None
    train_s: float
    final_loss: float | None
    examples_seen: int

    def as_record(self) -> dict:
        """The record's ``training`` section (``train_s`` goes to ``timing``)."""
        return {
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "final_loss": self.final_loss,
            "examples_seen": self.examples_seen,
        }


def fit(
    module: torch.nn.Module,
    loss_fn: Callable[[list[int]], tuple[torch.Tensor, dict]],
    n_examples: int,
    trainer_cfg,
    seed: int,
    run_dir: Path,
    eval_fn: Callable[[], dict] | None = None,
    device: torch.device | None = None,
) -> FitResult:
    """Train ``module``'s trainable parameters on ``loss_fn(batch_indices)``.

    ``loss_fn`` returns (loss, stats); stats (floats) go to ``log.jsonl`` with the
    step, learning rate, grad norm and examples/s. ``eval_fn`` runs every
    ``trainer.eval_every`` steps and its dict goes to the same log.
    """
    t = trainer_cfg
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
    warmup = int(t.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, warmup, t.max_steps))
    stream = DataStream(n_examples, t.batch_size, seed)
    seed_everything(seed)
    start, resumed_from = 0, None
    checkpoint, state = resume_point(run_dir, module)
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        stream.position = state["data_position"]
        start = resumed_from = state["step"]
        log.info("resumed from %s (step %d)", checkpoint, start)
    log_path = Path(run_dir) / LOG_FILE
    truncate_log(log_path, start)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device is not None and device.type == "cuda"
        else contextlib.nullcontext()
    )
    t0 = time.time()
    last_loss = None
    module.train()
    with _PreemptionGuard() as guard, progress(t.max_steps, "train", unit="step", initial=start) as bar:
        for step in range(start + 1, t.max_steps + 1):
            step_t0 = time.time()
            optimizer.zero_grad(set_to_none=True)
            stats_sum = accumulate_gradients(loss_fn, [stream.next() for _ in range(t.grad_accum)], autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            scheduler.step()
            last_loss = stats_sum.get("loss")
            row = {
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "examples_per_s": t.batch_size * t.grad_accum / max(time.time() - step_t0, 1e-9),
                **stats_sum,
            }
            append_jsonl(log_path, row)
            tracking.log_row(row)  # logger=: the same row, at the same step, as it happens
            bar.set_postfix(loss=f"{last_loss:.4f}" if last_loss is not None else "-", refresh=False)
            bar.update(1)
            if step % max(1, t.log_every) == 0:
                log.info("step %d/%d loss %.4f lr %.2e", step, t.max_steps, last_loss or float("nan"), row["lr"])
            if eval_fn is not None and t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                module.eval()
                evaluated = {"step": step, **eval_fn()}
                append_jsonl(log_path, evaluated)
                tracking.log_row(evaluated)
                log.info("eval at step %d: %s", step, json.dumps(evaluated))
                module.train()
            if step % max(1, t.checkpoint_every) == 0 or step == t.max_steps or guard.received:
                save_checkpoint(run_dir, module, optimizer, scheduler, stream, step)
            if guard.received:
                guard.pass_on(step)
    module.eval()
    return FitResult(
        steps=t.max_steps,
        resumed_from=resumed_from,
        train_s=time.time() - t0,
        final_loss=last_loss,
        examples_seen=stream.position,
    )
