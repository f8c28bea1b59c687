"""How long a run takes on a device: a FLOP/byte cost model, calibrated by measured runs.

Why a model and not the time limit: the dry run's GPU-hours are GPUs x time limit, an upper
bound that says nothing about whether a phase fits a 24-hour window. This module predicts
each run's duration per *stage* from its config alone:

* ``load``     ``SETUP_S`` per run (tokenizers, data, model construction) + weights bytes /
               ``LOAD_BYTES_PER_S`` (disk → device);
* ``features`` the frozen sender's forward over every train + test prompt (2·N FLOPs per token,
               N the parameters a token is multiplied by: ``resources.Shape.body_params``, no
               embeddings, no output head, which runs only where a label or output is read);
* ``train``    steps x batch x tokens the receiver reads, forward + backward to its input
               (4·N FLOPs per token: no weight gradients through a frozen model);
* ``eval``     the scoring / reading forwards on the test items (2·N per token);
* ``decode``   greedy generation (XSum, text relay): memory-bandwidth bound, one read of the
               weights per generated token per batch;
* start-up     ``STARTUP_S`` per job (python, imports, config) before the run's own clock starts.

Token counts are measured from the data (``token_stats``: the task's prompts tokenized with
``cluster.plan_tokenizer``, capped like the run caps them) and cached in
``$TELEPATHY_CACHE/plan/`` so that planning a phase is fast.

A stage's seconds = work / (device peak x efficiency of that kind of work), or a per-layer
launch floor for tiny batches, whichever is larger. Device peaks are published figures
(``DEVICES``); the efficiencies are defaults. **Calibration** replaces guesses with
measurements: every completed run's result.json (``timing.train_s``, ``eval_s``,
``total_s``, ``telemetry.startup_s``; its device) gives a ratio measured / default-predicted per (model, device,
stage), and so does the table ``benchmarks/gpu_calibrate.py`` writes
(``benchmarks/calibration.json``). The planner prefers a calibrated ratio over the default
and says which numbers are which (``Prediction.sources``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from telepathy.config import ConfigError, num_latents

REPO = Path(__file__).resolve().parents[2]
CALIBRATION_FILE = REPO / "benchmarks" / "calibration.json"

# Published dense bf16 peak FLOP/s and memory bandwidth (bytes/s) per device kind. "cpu" is this
# project's 2-core test machine order of magnitude (fp32); calibration corrects it. The floor of a
# stage for small models: per forward/backward call, a kernel launch per layer plus Python overhead.
DEVICES = {
    "h100": {"flops": 989e12, "bandwidth": 3.35e12, "mem_gb": 80, "layer_launch_s": 40e-6, "call_overhead_s": 5e-3},
    "h200": {"flops": 989e12, "bandwidth": 4.8e12, "mem_gb": 141, "layer_launch_s": 40e-6, "call_overhead_s": 5e-3},
    "a100": {"flops": 312e12, "bandwidth": 2.0e12, "mem_gb": 80, "layer_launch_s": 50e-6, "call_overhead_s": 5e-3},
    "l40s": {"flops": 362e12, "bandwidth": 0.864e12, "mem_gb": 48, "layer_launch_s": 50e-6, "call_overhead_s": 5e-3},
    "cpu": {"flops": 5e10, "bandwidth": 1e10, "mem_gb": 16, "layer_launch_s": 2e-4, "call_overhead_s": 2e-2},
}
# fraction of the peak each kind of work reaches (MFU-style defaults; calibration replaces them)
EFFICIENCY = {"features": 0.5, "train": 0.3, "eval": 0.5, "decode": 0.6}
LOAD_BYTES_PER_S = 2e9  # weights from a parallel file system into the device
SETUP_S = 5.0  # per run: build the models, load tokenizers and data (tiny models: all of "load")
STARTUP_S = 30.0  # python + torch + data loading before a run's clock starts
STAGES = ("load", "features", "train", "eval", "decode")
PROMPT_OVERHEAD = 32  # primer / answer prompt / label tokens around the text or soft tokens


# ------------------------------------------------------------------------------------ tokens
def _cache_dir() -> Path:
    return Path(os.environ.get("TELEPATHY_CACHE", "~/.cache/telepathy")).expanduser() / "plan"


def token_stats(cfg) -> dict:
    """Rows and mean prompt / target tokens of the task's train and test splits, measured with the
    tokenizer of ``conf/model/<cluster.plan_tokenizer>`` (cached per task, data files and tokenizer)."""
    from telepathy.data import _read_rows, data_root, format_prompt

    task = cfg.task
    root = data_root(cfg.data)
    if root is None:
        raise ConfigError(
            "data.root=None is not allowed for planning; allowed: a folder of <task>/<split>.jsonl "
            "(token counts are measured from the data; set TELEPATHY_DATA)"
        )
    tok_name = str(OmegaConf.select(cfg, "cluster.plan_tokenizer", default="smollm2_135m"))
    files = [root / task.local_dir / f"{task.splits[s]}.jsonl" for s in ("train", "test")]
    stamp = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) if f.exists() else str(f) for f in files]
    key = hashlib.sha1(
        json.dumps([task.name, task.prompt, task.get("target_column"), stamp, tok_name]).encode()
    ).hexdigest()[:12]
    path = _cache_dir() / f"tokens-{task.name}-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    from telepathy.config import model_config
    from telepathy.models import load_tokenizer
    from telepathy.results import write_json

    tokenizer = load_tokenizer(model_config(cfg, tok_name))
    out = {"tokenizer": tok_name}
    for split in ("train", "test"):
        rows, _ = _read_rows(task, cfg.data, task.splits[split])
        prompts = [format_prompt(task.prompt, str(r[task.text_column])) for r in rows]
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        entry = {"rows": len(rows), "prompt_tokens": lengths}
        if task.get("target_column"):
            targets = [" " + str(r[task.target_column]) for r in rows]
            entry["target_tokens"] = [len(ids) for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]
        out[split] = entry
    summary = {"tokenizer": tok_name, **{s: _summarise_lengths(out[s]) for s in ("train", "test")}}
    write_json(path, summary)
    return summary


def _summarise_lengths(entry: dict) -> dict:
    """Keep the lengths as a small histogram (mean under any cap is computed from it)."""

    def hist(values):
        counts: dict[int, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        return sorted(counts.items())

    out = {"rows": entry["rows"], "prompt_hist": hist(entry["prompt_tokens"])}
    if "target_tokens" in entry:
        out["target_hist"] = hist(entry["target_tokens"])
    return out


def capped_mean(hist, cap: int | None) -> float:
    total = sum(n for _, n in hist)
    if not total:
        return 0.0
    return sum(min(length, cap or length) * n for length, n in hist) / total


# ------------------------------------------------------------------------------------ work
@dataclass
class Work:
    """What one stage does: FLOPs (compute-bound), bytes read (bandwidth-bound), forward calls."""

    flops: float = 0.0
    bytes: float = 0.0
    calls: float = 0.0
    layers: int = 0
    model: str = ""


def _n(model_cfg) -> float:
    """Parameters of the model as built: budget=tiny's 2-layer stand-ins load megabytes, not the 16 GB
    of the 8B model whose family they borrow (``resources.built_shape``)."""
    from telepathy.resources import built_shape

    return float(built_shape(model_cfg).num_params)


def _weight_bytes(model_cfg) -> float:
    return _n(model_cfg) * (4 if str(model_cfg.get("dtype", "auto")) == "float32" else 2)


def model_key(model_cfg) -> str:
    """Calibration key of a model: its config name, plus its shape when random-init overrides shrink it."""
    over = model_cfg.get("config_overrides") or {}
    if model_cfg.get("random_init") and over:
        return f"{model_cfg.name}[{over.get('num_hidden_layers', '?')}x{over.get('hidden_size', '?')}]"
    return str(model_cfg.name)


def _flops_per_token(model_cfg) -> float:
    """2 FLOPs per parameter per token forward (C = 2N, with N the parameters a token is multiplied
    by: ``resources.Shape.body_params``, of the model as built)."""
    from telepathy.resources import built_shape

    return 2.0 * built_shape(model_cfg).body_params


def _layers(model_cfg) -> int:
    over = model_cfg.get("config_overrides") or {}
    return int(over.get("num_hidden_layers", model_cfg.num_layers))


def job_work(cfg, stats: dict | None = None) -> dict[str, Work]:
    """The work of each stage of the run ``cfg`` describes (train.py runs and latency benchmark jobs)."""
    from telepathy.config import model_config, models_used, uses_soft_tokens

    stats = stats or token_stats(cfg)
    task, method = cfg.task, str(OmegaConf.select(cfg, "method.name", default="latency"))
    cap = int(task.max_input_tokens)
    t_in = capped_mean(stats["test"]["prompt_hist"], cap) + PROMPT_OVERHEAD
    t_train_in = capped_mean(stats["train"]["prompt_hist"], cap) + PROMPT_OVERHEAD
    generation = task.type == "generation"
    gen_tokens = (
        int(OmegaConf.select(cfg, "eval.generation.max_new_tokens", default=None) or task.get("max_target_tokens") or 0)
        if generation
        else 0
    )
    target = capped_mean(stats["train"].get("target_hist", []), task.get("max_target_tokens")) if generation else 2
    n_train = min(stats["train"]["rows"], task.get("train_samples") or stats["train"]["rows"])
    n_test = min(stats["test"]["rows"], task.get("test_samples") or stats["test"]["rows"])
    eval_batch = int(OmegaConf.select(cfg, "eval.batch_size", default=16))
    work = {s: Work() for s in STAGES}

    if method == "latency":  # benchmarks/latency.py: three paths on iterations (+ warm-up) batches
        sender, receiver = cfg.sender, cfg.receiver
        items = (int(cfg.iterations) + int(cfg.warmup_batches)) * int(cfg.batch_size)
        _add(work["load"], bytes=_weight_bytes(sender) + _weight_bytes(receiver))
        _fwd(work["eval"], sender, items * t_in, items / int(cfg.batch_size))
        _fwd(
            work["eval"],
            receiver,
            items * (t_in + num_latents(cfg) + int(cfg.relay.max_new_tokens)),
            3 * items / int(cfg.batch_size),
        )
        _dec(work["decode"], sender, items / int(cfg.batch_size) * int(cfg.relay.max_new_tokens))
        return work

    roles = list(dict.fromkeys(models_used(cfg)))
    models = {r: model_config(cfg, r) for r in roles}
    for m in models.values():
        _add(work["load"], bytes=_weight_bytes(m))
    reader = models.get("receiver") or next(iter(models.values()))
    soft = uses_soft_tokens(cfg)
    steps = int(cfg.trainer.max_steps) if method in ("bridge", "prompt_tuning", "lora") else 0
    per_step = int(cfg.trainer.batch_size) * int(cfg.trainer.grad_accum)
    m_tokens = num_latents(cfg) if soft else 0

    if method == "bridge":
        _fwd(work["features"], models["sender"], (n_train + n_test) * t_train_in, (n_train + n_test) / eval_batch)
        read = m_tokens + PROMPT_OVERHEAD + target
        quick = (steps // max(1, int(cfg.trainer.eval_every or steps or 1))) * int(cfg.trainer.eval_samples)
        _fwd(work["eval"], reader, (n_test + quick) * read, (n_test + quick) / eval_batch)
        if bool(OmegaConf.select(cfg, "eval.receiver_zeroshot", default=True)):
            _fwd(work["eval"], reader, n_test * t_in, n_test / eval_batch)
            _dec(work["decode"], reader, n_test / eval_batch * gen_tokens)
    elif method in ("prompt_tuning", "lora"):
        read = t_train_in + m_tokens + target
        _fwd(work["eval"], reader, n_test * (t_in + m_tokens), n_test / eval_batch)
    elif method == "linear_probe":
        _fwd(work["features"], reader, (n_train + n_test) * t_train_in, (n_train + n_test) / eval_batch)
    elif method == "text_relay":
        relay = int(cfg.method.max_new_tokens)
        _fwd(work["eval"], models["sender"], n_test * t_in, n_test / eval_batch)
        _dec(work["decode"], models["sender"], n_test / eval_batch * relay)
        _fwd(work["eval"], reader, n_test * (relay + PROMPT_OVERHEAD), n_test / eval_batch)
    elif method == "llmlingua":
        scorer = models[str(cfg.method.compressor)] if str(cfg.method.compressor) in models else reader
        _fwd(work["features"], scorer, n_test * t_in, n_test / eval_batch)
        _fwd(work["eval"], reader, n_test * t_in * float(cfg.method.get("rate", 0.125)), n_test / eval_batch)
    elif method == "fewshot":
        shots = int(cfg.method.shots) * max(1, len(task.get("labels") or []))
        _fwd(work["eval"], reader, n_test * t_in * (shots + 1), n_test / eval_batch)
    else:  # zeroshot, ensemble and anything that reads the prompt once per model
        for m in models.values():
            _fwd(work["eval"], m, n_test * t_in, n_test / eval_batch)
    if steps:
        tokens = steps * per_step * read
        # forward + backward to the input of the frozen receiver: 2·N + 2·N per token
        _fwd(work["train"], reader, 2 * tokens, 3 * steps * int(cfg.trainer.grad_accum))
    if generation:  # the run's own output (bridge, baselines): up to gen_tokens greedy steps per batch
        _dec(work["decode"], reader, n_test / eval_batch * gen_tokens)
    return work


def _add(w: Work, flops=0.0, bytes=0.0, calls=0.0, model=None, layers=0) -> None:  # noqa: A002
    w.flops += flops
    w.bytes += bytes
    w.calls += calls
    w.layers = max(w.layers, layers)
    if model and not w.model:
        w.model = model


def _fwd(w: Work, model_cfg, tokens: float, calls: float) -> None:
    _add(
        w,
        flops=_flops_per_token(model_cfg) * tokens,
        calls=calls,
        model=model_key(model_cfg),
        layers=_layers(model_cfg),
    )


def _dec(w: Work, model_cfg, steps: float) -> None:
    """Each decoding step reads every weight once (batch-size independent while memory-bound)."""
    if steps <= 0:
        return
    _add(w, bytes=_weight_bytes(model_cfg) * steps, calls=steps, model=model_key(model_cfg), layers=_layers(model_cfg))


# ------------------------------------------------------------------------------------ calibration
def device_kind(record_env: dict) -> str:
    """``h100`` / ``a100`` / ... from a result.json ``env`` (its GPU names), else ``cpu``."""
    names = " ".join(record_env.get("gpu_names") or []).lower()
    for kind in DEVICES:
        if kind != "cpu" and kind in names:
            return kind
    return "cpu" if not names else names.split()[-1]


def default_seconds(stage: str, work: Work, device: str) -> float:
    spec = DEVICES[device]
    if stage == "load":
        return SETUP_S + work.bytes / LOAD_BYTES_PER_S
    if stage == "decode":
        compute = work.bytes / (spec["bandwidth"] * EFFICIENCY["decode"])
    else:
        compute = work.flops / (spec["flops"] * EFFICIENCY[stage])
    return max(compute, work.calls * (work.layers * spec["layer_launch_s"] + spec["call_overhead_s"]))


@dataclass
class Calibration:
    """Measured / default-predicted seconds per (model, device, stage); ratios from runs and tables."""

    ratios: dict = field(default_factory=dict)  # (model, device, stage) -> [ratio, ...]
    sources: dict = field(default_factory=dict)  # (model, device, stage) -> where from

    def add(self, key: tuple, ratio: float, source: str) -> None:
        if ratio > 0 and math.isfinite(ratio):
            self.ratios.setdefault(key, []).append(ratio)
            self.sources.setdefault(key, set()).add(source)

    def ratio(self, key: tuple) -> float | None:
        values = sorted(self.ratios.get(key, []))
        return values[len(values) // 2] if values else None  # median: robust to one odd run

    def merge(self, other: Calibration) -> None:
        for key, values in other.ratios.items():
            for v in values:
                self.add(key, v, ",".join(sorted(other.sources.get(key, ["?"]))))

    def to_table(self) -> list[dict]:
        return [
            {
                "model": k[0],
                "device": k[1],
                "stage": k[2],
                "ratio": round(self.ratio(k), 4),
                "n": len(v),
                "sources": sorted(self.sources.get(k, [])),
            }
            for k, v in sorted(self.ratios.items())
        ]


def load_calibration(runs_dir: Path | None, table: Path | None = CALIBRATION_FILE) -> Calibration:
    """Ratios from a committed table (``benchmarks/gpu_calibrate.py``) and from every completed run."""
    cal = Calibration()
    if table is not None and Path(table).exists():
        for row in json.loads(Path(table).read_text()).get("entries", []):
            cal.add((row["model"], row["device"], row["stage"]), float(row["ratio"]), f"table:{Path(table).name}")
    if runs_dir is None or not Path(runs_dir).is_dir():
        return cal
    for path in sorted(Path(runs_dir).glob("*/result.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("status") == "completed" and not record.get("reused_from"):
            calibrate_from_record(cal, record)
    return cal


def calibrate_from_record(cal: Calibration, record: dict) -> None:
    """Add one completed run: ``train_s`` → train, ``eval_s`` → eval + decode, the rest → load + features.

    A run resumed from a checkpoint (``training.resumed_from``) timed only the steps of its last
    attempt (``train_s`` of a run resumed at its final step is near 0) and may have read the
    features an earlier attempt cached: only its evaluation, which the last attempt ran whole,
    calibrates (and its memory peak and start-up)."""
    timing, cfg = record.get("timing") or {}, OmegaConf.create(record.get("config") or {})
    resumed = (record.get("training") or {}).get("resumed_from") is not None
    device = device_kind(record.get("env") or {})
    if device not in DEVICES or "total_s" not in timing:
        return
    try:
        work = job_work(cfg)
    except Exception:  # noqa: BLE001 - an old or foreign record: it just does not calibrate
        return
    pred = {s: default_seconds(s, w, device) for s, w in work.items()}
    peak_mb = (record.get("memory") or {}).get("peak_gpu_mb")
    estimate_gb = (record.get("resources") or {}).get("estimate_gb")
    if peak_mb and estimate_gb:  # measured peak / estimate: the GPU-memory estimator's calibration
        cal.add(
            (_main_model(cfg), device, "memory"),
            peak_mb / 1024 / float(estimate_gb),
            f"run:{record.get('run_id', '?')}",
        )
    startup = (record.get("telemetry") or {}).get("startup_s")
    if startup:  # process start → method start, from the run's telemetry
        cal.add(("*", device, "startup"), float(startup) / STARTUP_S, f"run:{record.get('run_id', '?')}")
    measured = {"train": float(timing.get("train_s") or 0), "eval": float(timing.get("eval_s") or 0)}
    measured["prep"] = max(0.0, float(timing["total_s"]) - measured["train"] - measured["eval"])
    groups = {"train": ["train"], "eval": ["eval", "decode"], "prep": ["load", "features"]}
    if resumed:  # the last attempt's train and prep stages are not the run's
        groups = {"eval": groups["eval"]}
    for name, stages in groups.items():
        predicted = sum(pred[s] for s in stages)
        if predicted <= 0 or measured[name] <= 0:
            continue
        for s in stages:
            if pred[s] > 0:
                cal.add(
                    (work[s].model or _main_model(cfg), device, s),
                    measured[name] / predicted,
                    f"run:{record.get('run_id', '?')}",
                )


def _main_model(cfg) -> str:
    return model_key(cfg.receiver) if "receiver" in cfg else "?"


@dataclass
class Prediction:
    seconds: dict  # stage -> seconds
    sources: dict  # stage -> "default" | "calibrated (n)"
    startup_s: float = STARTUP_S

    @property
    def total_s(self) -> float:
        return self.startup_s + sum(self.seconds.values())

    @property
    def calibrated(self) -> bool:
        return any(v.startswith("calibrated") for v in self.sources.values())


def predict(cfg, device: str, cal: Calibration | None = None, stats: dict | None = None) -> Prediction:
    """Seconds per stage of the run ``cfg`` on ``device`` (calibrated where a ratio is known)."""
    if device not in DEVICES:
        raise ConfigError(f"cluster.device={device!r} is not allowed; allowed: {', '.join(DEVICES)}")
    cal = cal or Calibration()
    seconds, sources = {}, {}
    for stage, work in job_work(cfg, stats).items():
        base = default_seconds(stage, work, device)
        if base <= 0:
            continue
        key = (work.model or _main_model(cfg), device, stage)  # the same key calibrate_from_record uses
        ratio = cal.ratio(key)
        seconds[stage] = base * (ratio or 1.0)
        sources[stage] = f"calibrated ({len(cal.ratios[key])})" if ratio else "default"
    startup = cal.ratio(("*", device, "startup"))
    return Prediction(seconds, sources, STARTUP_S * (startup or 1.0))
