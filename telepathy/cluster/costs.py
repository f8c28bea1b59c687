"""How long a run takes on a device, and how busy it keeps the GPU: a cost model of the work each
method declares, calibrated by measured runs.

Why a model and not the time limit: the dry run's GPU-hours are GPUs x time limit, an upper
bound that says nothing about whether a phase fits a 24-hour window. This module predicts
each run's duration per *stage* (``load``, ``features``, ``train``, ``eval``, ``decode``) from its
config alone, and how much of it the GPU is busy.

**What a run does** is the method's own declaration, ``method.work`` in ``conf/method/<name>.yaml``
(the latency benchmark's ``work`` in ``conf/latency.yaml``); this module never branches on a
method's name, and a method without a ``work`` block cannot be planned (one line says so). Each
*pass* names a stage, the model, what that model reads per item (``reads``: ``text`` = the task
prompt with the input, ``soft`` = primer + M soft tokens + answer prompt, ``text+soft``, ``demos`` =
k solved examples per class + the query, ``compressed`` = the text at LLMLingua's budget, ``prompt``
= the answer prompt alone; plus ``tokens`` more), which items (``train+test``, ``test``,
``test+probe``, ``steps`` = the training micro-batches of the batch plan, ``timed`` = the latency
benchmark's batches), and what more it does: ``backward: input`` (to the soft tokens, or LoRA's
adapters, through a frozen model), ``adapters`` (the projections LoRA wraps: their ops),
``answers`` (the task's answer: every label verbaliser scored in one pass, or generated text),
``generate: N`` greedy tokens, ``per_item`` (batch 1, chunks of at most 200 tokens, ``host_s`` of
Python per item: LLMLingua), ``when`` (a config key that turns it on).

**Seconds of one call** (a forward, a training micro-step, a decoding step) =
``max(GPU time, dispatch time) + host time``, where

* GPU time = ``max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency))``: 2·N FLOPs per
  token forward (N: ``resources.Shape.body_params``, no embeddings, no output head), + 2·V·d per row
  the head scores (one per item, one more per further label token or target token); forward +
  backward to the input is 2x that; every call reads every weight once (twice for a micro-step),
  a decoding step also the KV cache;
* dispatch time = the CPU's per-op cost of eager PyTorch / Hugging Face code: ``OPS_PER_LAYER`` ops
  per layer (53 top-level aten ops in a Llama/Mistral/Qwen forward, counted with the profiler;
  about 2.6x that forward + backward; Gemma 3 about 1.8x) x ``op_s`` per op + ``call_s`` per call
  (tokenising, embedding, padding); a decoding step adds ``decode_step_s`` (``generate``'s logits
  processing, stopping criteria, cache bookkeeping);
* on a GPU the CPU queues kernels while the GPU runs them, so the larger of the two counts; on the
  CPU they add up.

A job = SLURM dispatch (``cluster.dispatch_s``) + start-up (``STARTUP_S``) + load (``SETUP_S`` + weight
bytes / ``LOAD_BYTES_PER_S``) + its stages. Its **GPU-busy fraction** is GPU time / duration: what
``nvidia-smi``'s utilisation would show, the seed's "> 80 %" criterion. ``predict(..., scenario=)``
gives ``low`` / ``expected`` / ``high`` durations (``SCENARIOS``: efficiencies and per-op costs
off by the factors of their spread; a calibrated stage only +-15 %). ``lower_bound`` is the
physics alone: every call at the device's peak FLOP/s or bandwidth, nothing else.

Token counts are measured from the data (``token_stats``: the task's prompts and label verbalisers
tokenized with ``cluster.plan_tokenizer``, capped like the run caps them) and cached in
``$TELEPATHY_CACHE/plan/`` so that planning a phase is fast.

**Calibration** replaces defaults with measurements: every completed run's result.json
(``timing.train_s``, ``eval_s``, ``total_s``, ``telemetry.startup_s``; its device) gives a ratio
measured / default-predicted per (model, device, stage), and so does the table
``benchmarks/gpu_calibrate.py`` writes (``benchmarks/calibration.json``; an H200's table applies to
an H100 plan through ``TRANSFER``). The planner prefers a calibrated ratio over the default and says
which numbers are which (``Prediction.sources``).
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

# Published dense bf16 peak FLOP/s and memory bandwidth (bytes/s) per device kind; ``op_s``: seconds
# of CPU per eager PyTorch op (dispatch + kernel launch; measured by benchmarks/gpu_calibrate.py);
# ``call_s``: host seconds per call besides the ops (building the prompts, padding, the final sync);
# ``overlap``: the GPU runs while the CPU dispatches (a CPU "device" does both in turn). "cpu" is
# this project's 2-core test machine, order of magnitude (fp32); calibration corrects it.
DEVICES = {
    "h100": {"flops": 989e12, "bandwidth": 3.35e12, "mem_gb": 80, "op_s": 8e-6, "call_s": 2e-3, "overlap": True},
    "h200": {"flops": 989e12, "bandwidth": 4.8e12, "mem_gb": 141, "op_s": 8e-6, "call_s": 2e-3, "overlap": True},
    "a100": {"flops": 312e12, "bandwidth": 2.0e12, "mem_gb": 80, "op_s": 9e-6, "call_s": 2e-3, "overlap": True},
    "l40s": {"flops": 362e12, "bandwidth": 0.864e12, "mem_gb": 48, "op_s": 9e-6, "call_s": 2e-3, "overlap": True},
    "cpu": {"flops": 5e10, "bandwidth": 1e10, "mem_gb": 16, "op_s": 4e-6, "call_s": 2e-3, "overlap": False},
}
# How a measurement on one device kind stands in for another when that one has none: the ratio
# measured / default is a property of the code on that architecture (same Hopper SMs, same host
# code), and the default already carries each device's own peak FLOP/s and bandwidth. So an H200's
# ratios apply to an H100 plan as they are (its bandwidth is 1.43x the H100's: memory-bound stages are
# already predicted that much slower by the default), and each use says so ("calibrated on h200").
TRANSFER = {"h100": ("h200",), "h200": ("h100",)}
# fraction of the peak each kind of call reaches (MFU-style defaults; calibration replaces them)
EFFICIENCY = {"forward": 0.5, "train": 0.35, "decode": 0.6, "bandwidth": 0.7}  # decode: of the bandwidth
# top-level aten ops of one decoder layer (torch profiler, eager transformers 5: Llama/Mistral/Qwen
# forward 53, forward + backward to the input ~140, a decoding step ~60); Gemma 3 has more norms
OPS_PER_LAYER = {"forward": 53, "train": 140, "decode": 60}
FAMILY_OPS = {"gemma3": 1.8}
ADAPTER_OPS = 5  # a LoRA'd projection: dropout, A, B, scale, add (forward; x 2.6 with backward)
DECODE_STEP_S = 4e-4  # generate's per-step work besides the forward (logits processors, stopping, cache)
LOAD_BYTES_PER_S = 2e9  # weights from a parallel file system into the device
SETUP_S = 5.0  # per run: build the models, load tokenizers and data (tiny models: all of "load")
STARTUP_S = 30.0  # python + torch + data loading before a run's clock starts
STAGES = ("load", "features", "train", "eval", "decode")
PROMPT_OVERHEAD = 32  # primer / answer prompt / chat framing around the text or soft tokens
LLMLINGUA_CHUNK = 200  # llmlingua_compressor: at most this many tokens per forward
# (efficiency factor, per-op/per-call/fixed seconds factor) of each scenario; calibrated stages: CALIBRATED_SPREAD
SCENARIOS = {"low": (1.4, 0.6), "expected": (1.0, 1.0), "high": (0.6, 1.8)}
CALIBRATED_SPREAD = {"low": 0.85, "expected": 1.0, "high": 1.15}
READS = ("text", "soft", "text+soft", "demos", "compressed", "prompt")
ITEMS = ("train+test", "test", "test+probe", "steps", "timed")


# ------------------------------------------------------------------------------------ tokens
def _cache_dir() -> Path:
    return Path(os.environ.get("TELEPATHY_CACHE", "~/.cache/telepathy")).expanduser() / "plan"


def token_stats(cfg) -> dict:
    """Rows and prompt / target token counts of the task's train and test splits and the tokens of each
    label verbaliser, measured with the tokenizer of ``conf/model/<cluster.plan_tokenizer>`` (cached per
    task, data files, labels and tokenizer)."""
    from telepathy.data import _read_rows, data_root, format_prompt

    task = cfg.task
    root = data_root(cfg.data)
    if root is None:
        raise ConfigError(
            "data.root=None is not allowed for planning; allowed: a folder of <task>/<split>.jsonl "
            "(token counts are measured from the data; set TELEPATHY_DATA)"
        )
    tok_name = str(OmegaConf.select(cfg, "cluster.plan_tokenizer", default="smollm2_135m"))
    labels = [str(label) for label in (task.get("labels") or [])]
    files = [root / task.local_dir / f"{task.splits[s]}.jsonl" for s in ("train", "test")]
    stamp = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) if f.exists() else str(f) for f in files]
    key = hashlib.sha1(
        json.dumps(
            [task.name, task.prompt, task.get("target_column"), stamp, tok_name, labels, task.get("label_prefix")]
        ).encode()
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
    prefix = str(task.get("label_prefix") or "")
    summary["label_tokens"] = {
        label: len(tokenizer(prefix + label, add_special_tokens=False).input_ids) for label in labels
    }
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
class Calls:
    """``n`` identical calls of one model: FLOPs and bytes each, its depth and the kind of call."""

    n: float
    kind: str  # forward | train | decode
    flops: float
    bytes: float
    layers: int
    ops_factor: float = 1.0  # the family's ops per layer relative to Llama's (+ adapters)
    host_s: float = 0.0  # host seconds per call the GPU waits for (LLMLingua's Python per text)


@dataclass
class Work:
    """What one stage does: its calls (``groups``), and their totals: FLOPs, bytes, calls."""

    flops: float = 0.0
    bytes: float = 0.0
    calls: float = 0.0
    layers: int = 0
    model: str = ""
    groups: list = field(default_factory=list)

    def add(self, calls: Calls, model: str) -> None:
        self.groups.append(calls)
        self.flops += calls.n * calls.flops
        self.bytes += calls.n * calls.bytes
        self.calls += calls.n
        self.layers = max(self.layers, calls.layers)
        self.model = self.model or model


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


def _head_flops(model_cfg) -> float:
    """2·V·d: the output head applied to one row (a label or target token the loss or readout reads)."""
    from telepathy.resources import built_shape

    shape = built_shape(model_cfg)
    return 2.0 * shape.vocab_size * shape.hidden_size


def _layers(model_cfg) -> int:
    over = model_cfg.get("config_overrides") or {}
    return int(over.get("num_hidden_layers", model_cfg.num_layers))


def _kv_bytes_per_token(model_cfg) -> float:
    """KV-cache bytes of one token over all layers (keys and values, bf16)."""
    from telepathy.resources import built_shape

    shape = built_shape(model_cfg)
    heads = int(model_cfg.get("num_attention_heads") or 1)
    kv = int(model_cfg.get("num_key_value_heads") or heads)
    head_dim = int(model_cfg.get("head_dim") or shape.hidden_size // heads)
    return 2 * shape.num_layers * kv * head_dim * 2


def work_profile(cfg) -> list[dict]:
    """The passes the run's method (or the latency app) declares, with ``when`` applied; one line if none."""
    has_method = OmegaConf.select(cfg, "method.name") is not None
    key = "method.work" if has_method else "work"
    node = OmegaConf.select(cfg, key)
    if node is None or not node.get("passes"):
        name = OmegaConf.select(cfg, "method.name")
        where = f"method.name={name!r}; allowed: a work: block with its passes in conf/method/{name}.yaml"
        if not has_method:
            where = "this app; allowed: a work: block with its passes in its config"
        raise ConfigError(f'{key}=None is not allowed for {where} (docs/cluster.md, "Will my plan fit?")')
    passes = []
    for i, p in enumerate(OmegaConf.to_container(node.passes, resolve=True)):
        for field_name, allowed in (("stage", ("features", "train", "eval")), ("reads", READS), ("items", ITEMS)):
            if p.get(field_name) not in allowed:
                value = p.get(field_name)
                raise ConfigError(
                    f"{key}.passes[{i}].{field_name}={value!r} is not allowed; allowed: {', '.join(allowed)}"
                )
        if p.get("backward") not in (None, "input"):
            raise ConfigError(f"{key}.passes[{i}].backward={p['backward']!r} is not allowed; allowed: input (or none)")
        if p.get("when") is None or bool(OmegaConf.select(cfg, str(p["when"]), default=False)):
            passes.append(p)
    return passes


def training_resident(cfg) -> list[str] | None:
    """The models the method keeps on the device while it trains (``method.work.train_resident``), or
    None when it declares none (it does not train, or keeps everything it loaded)."""
    listed = OmegaConf.select(cfg, "method.work.train_resident", default=None)
    return None if listed is None else [str(x) for x in listed]


def _label_tokens(cfg, stats: dict) -> list[int]:
    """Tokens of each label verbaliser (``task.label_prefix`` + label), as the plan tokenizer splits them."""
    counts = stats.get("label_tokens") or {}
    return [int(counts.get(str(label), 1)) for label in (cfg.task.get("labels") or [])]


def _answer(cfg, stats: dict, training: bool) -> dict:
    """What reading the task's answer adds per item: ``tokens`` more positions, ``rows`` the head
    scores, ``calls`` more forward calls per batch, ``decode`` greedy steps per batch."""
    task = cfg.task
    if task.type == "generation":
        if training:
            target = capped_mean(stats["train"].get("target_hist", []), task.get("max_target_tokens"))
            return {"tokens": target + 1, "rows": target + 1, "calls": 0, "decode": 0}
        gen = OmegaConf.select(cfg, "eval.generation.max_new_tokens", default=None) or task.get("max_target_tokens")
        return {"tokens": 0, "rows": 1, "calls": 0, "decode": int(gen or 0)}
    if str(OmegaConf.select(cfg, "eval.readout", default="score")) == "generate" and not training:
        return {"tokens": 0, "rows": 1, "calls": 0, "decode": int(OmegaConf.select(cfg, "eval.max_new_tokens") or 0)}
    # every label scored from one encoding of the prompt (prompting.PromptIO.label_scores): the first
    # token of each at the prompt's last position, the later ones in one continuation pass
    further = sum(n - 1 for n in _label_tokens(cfg, stats))
    return {"tokens": further, "rows": 1 + further, "calls": 1 if further else 0, "decode": 0}


def _read_tokens(cfg, p: dict, t_text: float) -> float:
    reads = p["reads"]
    m = num_latents(cfg)
    if reads == "text":
        base = t_text
    elif reads == "soft":
        base = m + PROMPT_OVERHEAD
    elif reads == "text+soft":
        base = t_text + m
    elif reads == "demos":
        shots = int(OmegaConf.select(cfg, "method.shots", default=1))
        base = t_text * (shots * max(1, len(cfg.task.get("labels") or [])) + 1)
    elif reads == "compressed":
        budget = str(OmegaConf.select(cfg, "method.budget", default="rate"))
        kept = m if budget == "match_bridge" else (t_text - PROMPT_OVERHEAD) * float(cfg.method.rate)
        base = kept + PROMPT_OVERHEAD
    else:  # prompt
        base = PROMPT_OVERHEAD
    return base + float(p.get("tokens") or 0)


def job_work(cfg, stats: dict | None = None) -> dict[str, Work]:
    """The work of each stage of the run ``cfg`` describes (train.py runs and latency benchmark jobs),
    from the passes its method declares (``work_profile``) and the batch plan it will run with."""
    from telepathy.config import model_config
    from telepathy.resources import batch_plan

    stats = stats or token_stats(cfg)
    task = cfg.task
    cap = int(task.max_input_tokens)
    t_test = capped_mean(stats["test"]["prompt_hist"], cap) + PROMPT_OVERHEAD
    t_train = capped_mean(stats["train"]["prompt_hist"], cap) + PROMPT_OVERHEAD
    n_train = min(stats["train"]["rows"], task.get("train_samples") or stats["train"]["rows"])
    n_test = min(stats["test"]["rows"], task.get("test_samples") or stats["test"]["rows"])
    timed = OmegaConf.select(cfg, "method.name") is None
    eval_batch = int(cfg.batch_size if timed else OmegaConf.select(cfg, "eval.batch_size", default=16))
    passes = work_profile(cfg)
    work = {s: Work() for s in STAGES}
    models = {}
    for p in passes:
        models.setdefault(str(p["model"]), model_config(cfg, str(p["model"])))
    for m in models.values():
        work["load"].add(Calls(0, "forward", 0, 0, 0), model_key(m))
        work["load"].bytes += _weight_bytes(m)
    trains = any(p["stage"] == "train" for p in passes)
    split = batch_plan(cfg) if trains else None
    for p in passes:
        m = models[str(p["model"])]
        if p["items"] == "steps":
            micro = int(cfg.trainer.max_steps) * int(split["grad_accum"])
            _train_pass(work["train"], cfg, p, m, stats, t_train, micro, int(split["per_device"]))
            continue
        if p["items"] == "timed":
            items, t_in = (int(cfg.iterations) + int(cfg.warmup_batches)) * eval_batch, t_test
        elif p["items"] == "train+test":
            items, t_in = n_train + n_test, (n_train * t_train + n_test * t_test) / max(1, n_train + n_test)
        else:
            items, t_in = n_test, t_test
            if p["items"] == "test+probe" and trains and cfg.trainer.eval_every:
                # the quick evals on held-out training items: scored as the test items are, or, for a
                # generation task, the summary's cross-entropy (a forward over the targets, no decoding)
                probe = int(cfg.trainer.max_steps) // int(cfg.trainer.eval_every) * int(cfg.trainer.eval_samples)
                _inference_pass(work, cfg, p, m, stats, _read_tokens(cfg, p, t_train), probe, eval_batch, probe=True)
        _inference_pass(work, cfg, p, m, stats, _read_tokens(cfg, p, t_in), items, eval_batch)
    return work


def _ops(model_cfg, p: dict) -> float:
    """Ops per layer relative to a Llama layer's: the family's, plus LoRA's on each adapted projection."""
    return (
        FAMILY_OPS.get(str(model_cfg.get("family")), 1.0)
        + len(p.get("adapters") or []) * ADAPTER_OPS / OPS_PER_LAYER["forward"]
    )


def _train_pass(w: Work, cfg, p: dict, m, stats: dict, t_in: float, micro: int, batch: int) -> None:
    """``micro`` micro-steps of ``batch`` items: forward + backward to the input (2 x 2·N per token);
    LoRA's adapter weight gradients are a small part (their FLOPs are left out, their ops are not)."""
    ans = _answer(cfg, stats, training=True)
    tokens = batch * (_read_tokens(cfg, p, t_in) + ans["tokens"])
    rows = batch * ans["rows"]
    flops = 2 * (_flops_per_token(m) * tokens + _head_flops(m) * rows)
    calls = Calls(micro, "train", flops, 2 * _weight_bytes(m), _layers(m), _ops(m, p) * (1 + ans["calls"]))
    w.add(calls, model_key(m))


def _inference_pass(
    work: dict, cfg, p: dict, m, stats: dict, t_in: float, items: float, batch: int, probe: bool = False
) -> None:
    stage = work[p["stage"]]
    per_item = bool(p.get("per_item"))
    nothing = {"tokens": 0, "rows": 0, "calls": 0, "decode": 0}
    ans = _answer(cfg, stats, training=probe) if p.get("answers") else nothing
    if per_item:  # one text at a time, in chunks (LLMLingua); each chunk also scores its tokens
        chunks = max(1, math.ceil((t_in - PROMPT_OVERHEAD) / LLMLINGUA_CHUNK))
        tokens = (t_in - PROMPT_OVERHEAD) / chunks
        flops = _flops_per_token(m) * tokens + _head_flops(m) * tokens
        call = Calls(items * chunks, "forward", flops, _weight_bytes(m), _layers(m), _ops(m, p))
        call.host_s = float(p.get("host_s") or 0) / chunks
        stage.add(call, model_key(m))
        return
    calls = math.ceil(items / batch)
    tokens = batch * (t_in + ans["tokens"])
    rows = batch * max(1, ans["rows"])
    flops = _flops_per_token(m) * tokens + _head_flops(m) * rows
    stage.add(
        Calls(
            calls, "forward", flops, _weight_bytes(m) * (1 + ans["calls"]), _layers(m), _ops(m, p) * (1 + ans["calls"])
        ),
        model_key(m),
    )
    steps = ans["decode"] + int(p.get("generate") or 0)
    if steps:  # greedy decoding: every step reads every weight and the batch's KV cache once
        context = t_in + steps / 2
        step = Calls(
            calls * steps,
            "decode",
            (_flops_per_token(m) + _head_flops(m)) * batch,
            _weight_bytes(m) + batch * context * _kv_bytes_per_token(m),
            _layers(m),
            _ops(m, p),
        )
        work["decode"].add(step, model_key(m))


# ------------------------------------------------------------------------------------ seconds
def _call_seconds(c: Calls, spec: dict, scale: tuple = (1.0, 1.0)) -> tuple[float, float]:
    """(wall seconds, GPU-busy seconds) of one call on a device ``spec``; ``scale``: a scenario's
    (efficiency, per-op) factors."""
    eff, op = scale
    compute = c.flops / (spec["flops"] * min(1.0, EFFICIENCY[c.kind] * eff)) if c.flops else 0.0
    bw_eff = EFFICIENCY["decode" if c.kind == "decode" else "bandwidth"]
    memory = c.bytes / (spec["bandwidth"] * min(1.0, bw_eff * eff)) if c.bytes else 0.0
    gpu = max(compute, memory)
    if not c.layers:
        return 0.0, 0.0
    dispatch = op * (c.layers * OPS_PER_LAYER[c.kind] * c.ops_factor * spec["op_s"] + spec["call_s"])
    if c.kind == "decode":
        dispatch += op * DECODE_STEP_S
    wall = (max(gpu, dispatch) if spec["overlap"] else gpu + dispatch) + op * c.host_s
    return wall, gpu


def stage_seconds(stage: str, work: Work, device: str, scenario: str = "expected") -> tuple[float, float]:
    """(seconds, GPU-busy seconds) of one stage on ``device`` from the defaults (no calibration)."""
    spec = DEVICES[device]
    eff, op = SCENARIOS[scenario]
    if stage == "load":
        return op * SETUP_S + work.bytes / (LOAD_BYTES_PER_S * eff) if work.groups or work.bytes else 0.0, 0.0
    wall = busy = 0.0
    for c in work.groups:
        w, g = _call_seconds(c, spec, (eff, op))
        wall, busy = wall + c.n * w, busy + c.n * g
    return wall, busy


def default_seconds(stage: str, work: Work, device: str) -> float:
    """Expected seconds of one stage on ``device`` from the defaults (the base a calibration ratio scales)."""
    return stage_seconds(stage, work, device)[0]


def lower_bound(cfg, device: str, stats: dict | None = None) -> dict:
    """Seconds per stage if every call ran at the device's published peak FLOP/s or bandwidth (the
    larger), with no dispatch, start-up or host time: what no code can beat."""
    spec = DEVICES[device]
    out = {}
    for stage, work in job_work(cfg, stats).items():
        if stage == "load":
            continue
        total = sum(c.n * max(c.flops / spec["flops"], c.bytes / spec["bandwidth"]) for c in work.groups)
        if total:
            out[stage] = total
    return out


# ------------------------------------------------------------------------------------ calibration
def device_kind(record_env: dict) -> str:
    """``h100`` / ``a100`` / ... from a result.json ``env`` (its GPU names), else ``cpu``."""
    names = " ".join(record_env.get("gpu_names") or []).lower()
    for kind in DEVICES:
        if kind != "cpu" and kind in names:
            return kind
    return "cpu" if not names else names.split()[-1]


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
    sources: dict  # stage -> "default" | "calibrated (n)" | "calibrated on h200 (n)"
    startup_s: float = STARTUP_S
    busy: dict = field(default_factory=dict)  # stage -> GPU-busy seconds
    dispatch_s: float = 0.0  # SLURM: the job's submission to its start on a free GPU (cluster.dispatch_s)

    @property
    def total_s(self) -> float:
        return self.dispatch_s + self.startup_s + sum(self.seconds.values())

    @property
    def busy_s(self) -> float:
        return sum(self.busy.values())

    @property
    def busy_fraction(self) -> float:
        """GPU-busy seconds / the job's duration on its GPU (start-up and loading included)."""
        return self.busy_s / self.total_s if self.total_s else 0.0

    @property
    def calibrated(self) -> bool:
        return any(v.startswith("calibrated") for v in self.sources.values())


def _ratio(cal: Calibration, model: str, device: str, stage: str) -> tuple[float | None, str]:
    """The calibrated ratio of (model, device, stage), else of a device it transfers from (``TRANSFER``)."""
    for kind in (device, *TRANSFER.get(device, ())):
        ratio = cal.ratio((model, kind, stage))
        if ratio:
            n = len(cal.ratios[(model, kind, stage)])
            return ratio, f"calibrated ({n})" if kind == device else f"calibrated on {kind} ({n})"
    return None, "default"


def predict(
    cfg, device: str, cal: Calibration | None = None, stats: dict | None = None, scenario: str = "expected"
) -> Prediction:
    """Seconds (and GPU-busy seconds) per stage of the run ``cfg`` on ``device``, calibrated where a
    ratio is known; ``scenario``: ``low`` / ``expected`` / ``high`` (``SCENARIOS``)."""
    if device not in DEVICES:
        raise ConfigError(f"cluster.device={device!r} is not allowed; allowed: {', '.join(DEVICES)}")
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario={scenario!r}; allowed: {', '.join(SCENARIOS)}")
    cal = cal or Calibration()
    seconds, busy, sources = {}, {}, {}
    for stage, work in job_work(cfg, stats).items():
        base, gpu = stage_seconds(stage, work, device, scenario)
        if base <= 0:
            continue
        # the same key calibrate_from_record uses
        ratio, source = _ratio(cal, work.model or _main_model(cfg), device, stage)
        if ratio:  # a measured ratio scales the expected seconds; the spread around it is narrow
            base = stage_seconds(stage, work, device)[0] * ratio * CALIBRATED_SPREAD[scenario]
            gpu = min(gpu * ratio, base)
        seconds[stage], busy[stage], sources[stage] = base, gpu, source
    startup, _ = _ratio(cal, "*", device, "startup")
    factor = SCENARIOS[scenario][1]
    dispatch = float(OmegaConf.select(cfg, "cluster.dispatch_s", default=0) or 0) * factor
    return Prediction(seconds, sources, STARTUP_S * (startup or factor), busy, dispatch)
