"""Measure the paper's code paths on the GPU at hand; write one JSON the planner reads as its calibration table.

    python -m benchmarks.gpu_calibrate --out /path/calibration.json                 # a GPU: the paper models, bf16
    python -m benchmarks.gpu_calibrate --smoke --out /tmp/cal.json                  # CPU smoke test (2-layer models)
    bash scripts/gpu_check.sh OUT_DIR                                               # every GPU-only check at once

Why: the planner's durations (telepathy/cluster/costs.py) rest on published peaks, default
efficiencies and a per-op dispatch cost until something measures them. This builds each paper
model's architecture (Llama-3.1-8B, Mistral-7B, Llama-3.2-1B, Qwen2.5-1.5B) from its config values
with random bf16 weights (nothing is downloaded: the machine may reach nothing), and times the
*real code paths* (``PromptIO``, ``features.hidden_states``, the Perceiver bridge, peft's LoRA,
``generate``, the LLMLingua compressor) at the per-device batches the runs use
(``resources.batch_plan`` of the phase's config):

* ``train``: a bridge micro-step (bridge -> soft tokens -> the receiver's class loss over the label
  verbalisers, one of them 4 pieces as Mistral splits " abbreviation", -> backward), bf16 autocast;
  a LoRA micro-step (P3); an XSum micro-step of the small receiver (P5, token loss);
* ``eval``: label scoring of bridge prompts and of text prompts at ``eval.batch_size``;
* ``features``: the sender's hidden states of a batch of prompts (P1 and P5 senders, P2 probes);
* ``decode``: ``generate`` from long prompts (XSum articles, 512 tokens) and the text relay's 48 tokens;
* ``llmlingua``: LLMLingua-1 compressing one text at a time (per-item seconds);
* ``load``: a model written to local disk and read back (bytes/s), and each build;
* ``dispatch``: a forward at batch 1, 4 tokens: the per-op cost of this host (``op_s``);
* ``packed``: 2 and 3 processes of the small receiver's scoring loop on one GPU, against one alone;
* ``memory``: the peak of each training micro-step against ``resources.training_gb`` for that config;
* ``checks``: the one-pass label scorer against the per-label path on this device (float32 and bf16).

Each timed path is also costed by ``costs`` for the same work (same calls, FLOPs, bytes, layers);
measured / default is the ratio the planner multiplies its default by, keyed (model, device kind,
stage). An H200's table applies to an H100 plan through ``costs.TRANSFER`` (same SMs and host code;
the default already carries the H100's lower bandwidth); the JSON says so. The whole run is
time-boxed (``--budget-s``, default 420 s): what does not fit is listed as skipped, never guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from telepathy import resources
from telepathy.cluster import costs
from telepathy.results import write_json

# architecture values not in conf/model (intermediate size, heads, KV heads, tied head), from the models' config.json
ARCH = {
    "llama31_8b": ("LlamaConfig", 14336, 32, 8, False),
    "mistral7b": ("MistralConfig", 14336, 32, 8, False),
    "llama32_1b": ("LlamaConfig", 8192, 32, 8, True),
    "qwen25_15b": ("Qwen2Config", 8960, 12, 2, True),
}
# TREC's labels as the paper receiver's SentencePiece splits them: " abbreviation" is 4 pieces
MULTI_LABEL_PIECES = [4, 2, 1, 1, 1, 1]
PHASES = {  # the run config whose batch plan and memory estimate each model's paths use
    "bridge": ["+phase=p1_seeds", "method=bridge", "task=trec"],
    "lora": ["+phase=p3_baselines", "method=lora", "task=trec"],
    "xsum": ["+phase=p5_xsum", "method=bridge"],
}


class Clock:
    """The run's time box: a step starts only if the budget has room for it."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s, self.skipped = time.time(), budget_s, []

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def allows(self, name: str, need_s: float) -> bool:
        if self.left() < need_s:
            self.skipped.append(f"{name} (needs ~{need_s:.0f} s, {self.left():.0f} s left)")
            return False
        return True


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from telepathy.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def facts_of(name: str, smoke: bool, vocab: int, dtype: torch.dtype):
    """``conf/model/<name>.yaml`` as the model is built here (smoke: 2 layers of width 64)."""
    from omegaconf import OmegaConf

    facts = OmegaConf.load(costs.REPO / "conf" / "model" / f"{name}.yaml")
    cls, inter, heads, kv, tied = ARCH[name]
    shape = {
        "hidden_size": int(facts.hidden_size),
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": int(facts.num_layers),
        "vocab_size": max(int(facts.vocab_size), vocab),  # the tokenizer's ids must fit (Mistral: 32768 < 49152)
        "tie_word_embeddings": tied,
    }
    if smoke:
        shape.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        shape["num_hidden_layers"] = 2
    facts.num_layers, facts.hidden_size, facts.vocab_size = shape["num_hidden_layers"], shape["hidden_size"], vocab
    facts.vocab_size = shape["vocab_size"]
    facts.num_attention_heads, facts.num_key_value_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    facts.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    facts.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    facts.tie_word_embeddings = tied
    return facts, cls, shape


def build(name: str, smoke: bool, device: torch.device, dtype: torch.dtype, tokenizer):
    """(LoadedModel with random weights, its facts, seconds to build)."""
    import transformers

    from telepathy.models import LoadedModel

    facts, cls, shape = facts_of(name, smoke, len(tokenizer), dtype)
    t0 = time.perf_counter()
    config = getattr(transformers, cls)(**shape)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    _sync(device)
    seconds = time.perf_counter() - t0
    facts.num_params = sum(p.numel() for p in model.parameters())
    if smoke:
        facts.name = f"{name}[smoke]"
    lm = LoadedModel(str(facts.name), model, tokenizer, device, dtype, chat_template=False, config=facts)
    return lm, facts, seconds


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Seconds per call: one warm-up, then the mean of ``repeat`` calls."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def row(facts, kind: str, stage: str, what: str, secs: float, calls: costs.Calls, **extra) -> dict:
    """A measured path with what ``costs`` predicts for the same call: the calibration ratio."""
    work = costs.Work()
    work.add(calls, str(facts.name))
    default, busy = costs.stage_seconds(stage, work, kind)
    return {
        "model": str(facts.name),
        "device": kind,
        "stage": stage,
        "what": what,
        "measured_s": round(secs, 6),
        "default_s": round(default, 6),
        "default_busy_s": round(busy, 6),
        "ratio": round(secs / default, 4) if default else None,
        **extra,
    }


def _prompt_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(len(tokenizer), 30000), (n_tokens,), generator=g).tolist()


def _labels(pieces: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 30000, (n,), generator=g).tolist() for n in pieces]


def scoring_paths(lm, facts, kind, cfg, repeat) -> list[dict]:
    """Label scoring at the eval batch: bridge prompts (M soft tokens) and text prompts, one label piece each
    and TREC-on-Mistral pieces (one continuation pass), and the old per-label path beside it."""
    from telepathy.config import num_latents
    from telepathy.prompting import PromptIO

    io = PromptIO(lm)
    b, m = int(cfg.eval.batch_size), num_latents(cfg)
    soft = torch.randn(b, m, lm.hidden_size, device=lm.device, dtype=lm.dtype) * 0.02
    head, tail = _prompt_ids(lm.tokenizer, 4, 1), _prompt_ids(lm.tokenizer, 24, 2)
    bridge_prompts = [[head, s, tail] for s in soft]
    text_prompts = [[_prompt_ids(lm.tokenizer, 60, 10 + i)] for i in range(b)]
    single, multi = _labels([1] * 6, 3), _labels(MULTI_LABEL_PIECES, 4)
    rows = []
    for prompt_kind, prompts, t_in in (("bridge", bridge_prompts, m + 28), ("text", text_prompts, 60)):
        for label_kind, labels, scorer in (
            ("single", single, io.label_scores),
            ("multi", multi, io.label_scores),
            ("multi-per-label", multi, io.label_scores_per_label),
        ):
            with torch.no_grad():
                secs = timed(lambda f=scorer, x=prompts, y=labels: f(x, y), lm.device, repeat)
            further = sum(len(x) - 1 for x in labels)
            passes = len(labels) if scorer == io.label_scores_per_label else 1 + (1 if further else 0)
            tokens = b * (t_in + (further if passes <= 2 else sum(len(x) for x in labels)))
            flops = costs._flops_per_token(facts) * tokens + costs._head_flops(facts) * b * (1 + further)
            calls = costs.Calls(1, "forward", flops, passes * costs._weight_bytes(facts), int(facts.num_layers))
            calls.ops_factor = passes
            what = f"label scoring, {prompt_kind} prompts, {label_kind}"
            # the old path is timed beside the new one, not part of the calibration (no run takes it any more)
            rows.append(row(facts, kind, "eval", what, secs, calls, reference=label_kind == "multi-per-label"))
    return rows


def train_paths(lm, facts, kind, cfg, repeat, memory: list, smoke: bool, loss: str = "classes") -> list[dict]:
    """A bridge micro-step at the run's per-device batch: Perceiver -> soft tokens -> class loss over the
    labels (a 4-piece one among them) -> backward, bf16 autocast on CUDA; its peak memory vs the estimate."""
    from telepathy.bridge import build_bridge
    from telepathy.config import num_latents
    from telepathy.models import embedding_rms_median
    from telepathy.prompting import PromptIO

    io = PromptIO(lm)
    split = resources.batch_plan(cfg)
    b, m = split["per_device"], num_latents(cfg)
    sender_dim = 64 if smoke else int(compose_model_hidden(cfg.sender))
    bridge = build_bridge(cfg, sender_dim, lm.hidden_size, m, target_rms=embedding_rms_median(lm.model)).to(lm.device)
    if cfg.bridge.reference_items:  # as the run does: the reference set from training features
        bridge.set_reference([torch.randn(60, sender_dim) for _ in range(int(cfg.bridge.reference_items))])
    feats = torch.randn(b, 60, sender_dim, device=lm.device)
    mask = torch.ones(b, 60, dtype=torch.long, device=lm.device)
    head, tail = _prompt_ids(lm.tokenizer, 4, 1), _prompt_ids(lm.tokenizer, 24, 2)
    labels = _labels(MULTI_LABEL_PIECES, 4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if lm.device.type == "cuda" else torch.autocast("cpu")

    targets = [_prompt_ids(lm.tokenizer, int(cfg.task.get("max_target_tokens") or 1), 90 + i) for i in range(b)]

    def step():
        with autocast:
            soft, _ = bridge.encode(feats, mask)
            prompts = [[head, s.to(lm.dtype), tail] for s in soft]
            if loss == "tokens":  # generation (XSum): the reference summary's tokens against the vocabulary
                value = io.label_loss(prompts, targets)
            else:
                value = io.class_loss(prompts, labels, [i % len(labels) for i in range(b)])
        value.backward()

    if lm.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    secs = timed(step, lm.device, repeat)
    further = sum(len(x) - 1 for x in labels) if loss == "classes" else len(targets[0])
    tokens = b * (m + 28 + further)
    flops = 2 * (costs._flops_per_token(facts) * tokens + costs._head_flops(facts) * b * (1 + further))
    passes = 2.0 if loss == "classes" else 1.0
    calls = costs.Calls(1, "train", flops, 2 * costs._weight_bytes(facts), int(facts.num_layers), passes)
    what = f"bridge micro-step, batch {b}, M={m}, " + (
        "TREC-on-Mistral labels" if loss == "classes" else f"{further} target tokens"
    )
    out = [row(facts, kind, "train", what, secs, calls)]
    if lm.device.type == "cuda":
        predicted = resources.training_gb(cfg, b, split.get("resident") or ["receiver"]) / resources._margin(cfg)
        memory.append(
            {
                "model": str(facts.name),
                "path": f"bridge micro-step ({loss} loss)",
                "per_device_batch": b,
                "measured_peak_gb": round(torch.cuda.max_memory_allocated() / resources.GB, 3),
                "training_gb_before_margin": round(predicted, 3),
                "estimate_total_gb_with_margin": round(resources.estimate(cfg).total_gb, 3),
            }
        )
    return out


def compose_model_hidden(model_cfg) -> int:
    return int(model_cfg.hidden_size)


def lora_path(lm, facts, kind, cfg, repeat) -> list[dict]:
    """A LoRA micro-step (peft on the receiver, P3) at its per-device batch, text prompts, class loss."""
    from omegaconf import OmegaConf

    from telepathy.methods.lora import add_lora
    from telepathy.prompting import PromptIO

    add_lora(lm, cfg.method, 0)
    io = PromptIO(lm)
    b = resources.batch_plan(cfg)["per_device"]
    prompts = [[_prompt_ids(lm.tokenizer, 60, 20 + i)] for i in range(b)]
    labels = _labels(MULTI_LABEL_PIECES, 4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if lm.device.type == "cuda" else torch.autocast("cpu")

    def step():
        with autocast:
            loss = io.class_loss(prompts, labels, [i % len(labels) for i in range(b)])
        loss.backward()

    lm.model.train()
    secs = timed(step, lm.device, repeat)
    lm.model.eval()
    further = sum(len(x) - 1 for x in labels)
    flops = 2 * (costs._flops_per_token(facts) * b * (60 + further) + costs._head_flops(facts) * b * (1 + further))
    adapters = len(OmegaConf.to_container(cfg.method.target_modules))
    factor = 2.0 * (1 + adapters * costs.ADAPTER_OPS / costs.OPS_PER_LAYER["forward"])
    calls = costs.Calls(1, "train", flops, 2 * costs._weight_bytes(facts), int(facts.num_layers), factor)
    return [row(facts, kind, "train", f"LoRA micro-step, batch {b}", secs, calls)]


def features_path(lm, facts, kind, batch: int, repeat) -> list[dict]:
    """The sender's hidden states of a batch of 96-token prompts (the features pass, probes)."""
    from telepathy.features import hidden_states

    ids = [_prompt_ids(lm.tokenizer, 96, 30 + i) for i in range(batch)]
    layer = max(1, int(facts.num_layers) - 1)
    secs = timed(lambda: hidden_states(lm, ids, [layer]), lm.device, repeat)
    calls = costs.Calls(
        1, "forward", costs._flops_per_token(facts) * batch * 96, costs._weight_bytes(facts), int(facts.num_layers)
    )
    return [row(facts, kind, "features", f"hidden states, batch {batch} x 96 tokens", secs, calls)]


def generate_path(lm, facts, kind, batch: int, prompt_tokens: int, new_tokens: int, repeat) -> list[dict]:
    """``PromptIO.generate`` (greedy, KV cache) from ``prompt_tokens``-token prompts: prefill + decode steps."""
    from telepathy.prompting import PromptIO

    io = PromptIO(lm)
    prompts = [[_prompt_ids(lm.tokenizer, prompt_tokens, 40 + i)] for i in range(batch)]
    gen = lm.model.generation_config
    gen.min_new_tokens, gen.eos_token_id = new_tokens, None  # every step runs: a random model may say EOS early
    secs = timed(lambda: io.generate(prompts, max_new_tokens=new_tokens), lm.device, repeat)
    prefill = costs.Calls(
        1,
        "forward",
        costs._flops_per_token(facts) * batch * prompt_tokens,
        costs._weight_bytes(facts),
        int(facts.num_layers),
    )
    step = costs.Calls(
        new_tokens,
        "decode",
        (costs._flops_per_token(facts) + costs._head_flops(facts)) * batch,
        costs._weight_bytes(facts) + batch * (prompt_tokens + new_tokens / 2) * costs._kv_bytes_per_token(facts),
        int(facts.num_layers),
    )
    work = costs.Work()
    work.add(prefill, str(facts.name))
    work.add(step, str(facts.name))
    default, busy = costs.stage_seconds("decode", work, kind)
    return [
        {
            "model": str(facts.name),
            "device": kind,
            "stage": "decode",
            "what": f"generate, batch {batch}, {prompt_tokens}-token prompts, {new_tokens} new tokens",
            "measured_s": round(secs, 6),
            "default_s": round(default, 6),
            "default_busy_s": round(busy, 6),
            "ratio": round(secs / default, 4),
            "per_step_s": round(secs / new_tokens, 6),
        }
    ]


def dispatch_path(lm, facts, kind, repeat) -> dict:
    """A forward at batch 1 x 4 tokens: next to no GPU work, so its time is the host's per-op cost."""
    ids = torch.tensor([_prompt_ids(lm.tokenizer, 4, 50)], device=lm.device)
    with torch.no_grad():
        secs = timed(lambda: lm.model.get_decoder()(input_ids=ids, use_cache=False), lm.device, repeat * 4)
    ops = int(facts.num_layers) * costs.OPS_PER_LAYER["forward"]
    return {"model": str(facts.name), "forward_b1_s": round(secs, 6), "ops": ops, "op_s": round(secs / ops, 9)}


def load_path(lm, facts, kind, device) -> dict:
    """Write the model to local disk and read it back to the device: the load stage's bytes/s."""
    import transformers

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        t0 = time.perf_counter()
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=lm.dtype, device_map=str(device))
        _sync(device)
        read_s = time.perf_counter() - t0
        del back
    size = costs._weight_bytes(facts)
    return {
        "model": str(facts.name),
        "bytes": size,
        "write_s": round(write_s, 3),
        "read_s": round(read_s, 3),
        "read_bytes_per_s": round(size / read_s),
    }


def llmlingua_path(lm, facts, kind, n_items: int) -> dict:
    """LLMLingua-1 (the real library, through llmlingua_compressor) compressing one text at a time."""
    from telepathy.methods.llmlingua_compressor import compress, make_compressor

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        compressor = make_compressor(tmp, device=str(lm.device), dtype=str(facts.dtype))
        words = "the of and a to in is was for on that with as by at from his her an be".split()
        g = torch.Generator().manual_seed(0)
        texts = [
            " ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist())
            for _ in range(n_items + 1)
        ]
        compress(compressor, texts[0], rate=0.125)  # warm-up
        _sync(lm.device)
        t0 = time.perf_counter()
        kept = [compress(compressor, t, rate=0.125).compressed_tokens for t in texts[1:]]
        _sync(lm.device)
        per_item = (time.perf_counter() - t0) / n_items
        del compressor
    return {
        "model": str(facts.name),
        "items": n_items,
        "per_item_s": round(per_item, 5),
        "kept_tokens_mean": sum(kept) / len(kept),
    }


def onepass_checks(lm, facts) -> dict:
    """The one-pass scorer against one pass per label on this device: scores and soft-token gradients."""
    from telepathy.prompting import PromptIO

    io = PromptIO(lm)
    torch.manual_seed(0)
    init = torch.randn(4, 8, lm.hidden_size, device=lm.device) * 0.02
    labels = _labels(MULTI_LABEL_PIECES, 4)
    out = {}
    for scorer in ("label_scores", "label_scores_per_label"):
        soft = init.clone().to(lm.dtype).requires_grad_()
        prompts = [
            [_prompt_ids(lm.tokenizer, 4 + 3 * i, 60 + i), soft[i], _prompt_ids(lm.tokenizer, 20, 70)] for i in range(4)
        ]
        scores = getattr(io, scorer)(prompts, labels)
        torch.nn.functional.cross_entropy(scores.float(), torch.tensor([0, 1, 2, 3], device=lm.device)).backward()
        out[scorer] = (scores.detach().float(), soft.grad.float())
    (s1, g1), (s2, g2) = out["label_scores"], out["label_scores_per_label"]
    return {
        "model": str(facts.name),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "max_abs_score_diff": float((s1 - s2).abs().max()),
        "max_abs_grad_diff": float((g1 - g2).abs().max()),
        "max_abs_grad": float(g2.abs().max()),
        "same_argmax": bool((s1.argmax(-1) == s2.argmax(-1)).all()),
    }


def packed_worker(name: str, smoke: bool, tokenizer_dir: str | None, seconds: float, start_at: float) -> None:
    """One member of a pack: the small receiver scoring batches from ``start_at`` (the same moment in every
    member, after each has built its model) for ``seconds``; prints batches/s."""
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    lm, facts, _ = build(name, smoke, device, dtype, load_tok(tokenizer_dir))
    from telepathy.prompting import PromptIO

    io = PromptIO(lm)
    prompts = [[_prompt_ids(lm.tokenizer, 60, 80 + i)] for i in range(16)]
    labels = _labels([1] * 6, 3)
    with torch.no_grad():
        io.label_scores(prompts, labels)
        _sync(device)
        time.sleep(max(0.0, start_at - time.time()))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            io.label_scores(prompts, labels).cpu()
            n += 1
    print(json.dumps({"batches_per_s": n / (time.perf_counter() - t0)}), flush=True)


def packed_path(name: str, smoke: bool, tokenizer_dir: str | None, seconds: float) -> dict:
    """1, 2 and 3 processes of the scoring loop on one GPU at once: each one's rate against one alone."""
    out = {"model": name, "seconds": seconds}
    for k in (1, 2, 3):
        start_at = time.time() + (15 if smoke else 40)  # every member builds its model first, then all start at once
        cmd = [sys.executable, "-m", "benchmarks.gpu_calibrate", "--packed-worker", name, "--seconds", str(seconds)]
        cmd += ["--start-at", str(start_at)]
        cmd += ["--smoke"] if smoke else []
        cmd += ["--tokenizer", tokenizer_dir] if tokenizer_dir else []
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=costs.REPO) for _ in range(k)]
        rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["batches_per_s"] for p in procs]
        out[f"{k}_processes_batches_per_s"] = [round(r, 2) for r in rates]
    alone = out["1_processes_batches_per_s"][0]
    for k in (2, 3):
        out[f"slowdown_{k}"] = round(alone / (sum(out[f"{k}_processes_batches_per_s"]) / k), 3)
    return out


def load_tok(tokenizer_dir: str | None):
    """The tokenizer the prompts are made of: a folder (the GPU machine has no demo package), else SmolLM2's."""
    from transformers import AutoTokenizer

    if tokenizer_dir:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        from telepathy.config import model_config
        from telepathy.models import load_tokenizer

        tok = load_tokenizer(model_config(compose([]), "smollm2_135m"))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def host() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        )
    except (OSError, StopIteration):
        pass
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg": os.getloadavg(),
    }


TRANSFER_NOTE = (
    "Ratios are measured / default for the same work on this device kind; the planner applies an H200's "
    "ratios to an H100 plan (costs.TRANSFER): both are Hopper GPUs of the same SM count class, run the same "
    "host code (the per-op dispatch cost is the host CPU's, recorded here), and the default already divides "
    "by each device's own peak FLOP/s (989 TFLOP/s dense bf16 both) and bandwidth (H200 4.8 TB/s, H100 3.35 "
    "TB/s): memory-bound stages (decode) are predicted 1.43x slower on the H100 before the ratio applies. "
    "Memory peaks carry over as they are (the code allocates the same)."
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the JSON file to write (everything measured)")
    parser.add_argument("--models", default=",".join(ARCH), help="comma list of conf/model names")
    parser.add_argument("--smoke", action="store_true", help="2-layer models on the CPU (a plumbing check)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new steps after this many seconds")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: SmolLM2's from the demo package)")
    parser.add_argument("--packed-worker", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=8.0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.packed_worker:
        packed_worker(args.packed_worker, args.smoke, args.tokenizer, args.seconds, args.start_at)
        return 0
    if args.out is None:
        parser.error("--out is required")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no GPU: run with --smoke for the CPU smoke test", file=sys.stderr)
        return 2
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    kind = costs.device_kind({"gpu_names": [torch.cuda.get_device_name(0)]}) if device.type == "cuda" else "cpu"
    if kind not in costs.DEVICES:
        print(f"device {kind!r} has no peak figures in telepathy/cluster/costs.py DEVICES; add them", file=sys.stderr)
        return 2
    clock = Clock(args.budget_s)
    tok = load_tok(args.tokenizer)
    configs = {k: compose(v) for k, v in PHASES.items()}
    result = {"device": kind, "host": host(), "transfer": TRANSFER_NOTE, "dtype": str(dtype).replace("torch.", "")}
    names = args.models.split(",")
    repeat = 1 if args.smoke else args.repeat

    def log(rows):
        for r in rows:
            times = f"{r['measured_s']:.4f}s (default {r['default_s']:.4f}s, ratio {r['ratio']})"
            print(f"{r['model']:<20} {r['stage']:<8} {r['what']:<62} {times}", flush=True)
        entries.extend(r for r in rows if not r.get("reference"))
        reference.extend(r for r in rows if r.get("reference"))

    result["skipped"] = clock.skipped
    sections = ("entries", "reference", "memory", "builds", "dispatch", "loads", "llmlingua", "checks", "packed")
    result.update({key: [] for key in (*sections, "errors")})
    entries, reference, memory, builds, dispatch, loads, lingua, checks, packed = (result[k] for k in sections)

    def step(title: str, need_s: float, fn) -> None:
        """Run one measurement if the time box has room; a failure is recorded, and the rest still runs."""
        if not clock.allows(title, need_s):
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - one broken path must not lose every other measurement
            import traceback

            result["errors"].append({"step": title, "error": f"{type(err).__name__}: {err}"[:2000]})
            print(f"{title}: FAILED {type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}", flush=True)
        result["seconds"] = round(time.time() - clock.t0, 1)
        write_json(args.out, result)  # after every step: a run stopped by its time limit keeps what it measured

    def both_dtypes(lm, facts):
        checks.append(onepass_checks(lm, facts))
        if device.type == "cuda":  # float32 as well: the path's own error, not bf16's
            lm.model.float()
            lm.dtype = torch.float32
            checks.append(onepass_checks(lm, facts))

    bridge, xsum, lora = configs["bridge"], configs["xsum"], configs["lora"]
    half, items = max(1, repeat // 2), 4 if args.smoke else 20

    def measure(name: str, lm, facts) -> None:
        """Every path this model takes in the plan (its role in P1-P6)."""
        if name in ("mistral7b", "qwen25_15b"):
            step(f"{name}: label scoring", 20, lambda: log(scoring_paths(lm, facts, kind, bridge, repeat)))
        if name == "mistral7b":
            step("bridge micro-step", 30, lambda: log(train_paths(lm, facts, kind, bridge, repeat, memory, args.smoke)))
        if name == "qwen25_15b":
            step(
                "XSum bridge micro-step",
                20,
                lambda: log(train_paths(lm, facts, kind, xsum, repeat, memory, args.smoke, loss="tokens")),
            )
        if name in ("llama31_8b", "llama32_1b"):
            step(f"{name}: features", 20, lambda: log(features_path(lm, facts, kind, 16, repeat)))
        if name == "llama31_8b":
            step("text relay generate", 40, lambda: log(generate_path(lm, facts, kind, 16, 96, 48, half)))
        if name == "qwen25_15b":
            step("XSum generate", 40, lambda: log(generate_path(lm, facts, kind, 16, 512, 64, half)))
        if name == "llama32_1b":
            step("load from disk", 40, lambda: loads.append(load_path(lm, facts, kind, device)))
            step("LLMLingua per item", 40, lambda: lingua.append(llmlingua_path(lm, facts, kind, items)))
            step("one-pass scorer checks (bf16 + float32)", 20, lambda: both_dtypes(lm, facts))
        if name == "mistral7b":
            step("one-pass scorer check (mistral7b)", 20, lambda: checks.append(onepass_checks(lm, facts)))
            step("LoRA micro-step", 30, lambda: log(lora_path(lm, facts, kind, lora, repeat)))

    def make(name: str, built: dict) -> None:
        lm, facts, build_s = build(name, args.smoke, device, dtype, tok)
        built.update(lm=lm, facts=facts)
        builds.append({"model": str(facts.name), "build_s": round(build_s, 3), "vocab": int(facts.vocab_size)})
        dispatch.append(dispatch_path(lm, facts, kind, repeat))

    for name in names:
        built: dict = {}
        step(f"{name}: build + per-op cost", 30, lambda n=name, b=built: make(n, b))
        if "lm" in built:
            measure(name, built.pop("lm"), built["facts"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "qwen25_15b" in names:
        seconds = 2.0 if args.smoke else 10.0
        need = 60 if args.smoke else 160
        step(
            "packed processes",
            need,
            lambda: packed.append(packed_path("qwen25_15b", args.smoke, args.tokenizer, seconds)),
        )
    result["seconds"] = round(time.time() - clock.t0, 1)
    write_json(args.out, result)
    print(
        json.dumps(
            {k: result[k] for k in ("dispatch", "memory", "checks", "llmlingua", "packed", "loads", "skipped")},
            indent=1,
        )
    )
    print(f"wrote {args.out} ({len(entries)} calibration entries, {result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
