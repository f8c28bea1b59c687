"""Measure the paper models on the GPU at hand; write the planner's calibration table.

    python -m benchmarks.gpu_calibrate                         # on a GPU: every paper model, bf16, random weights
    python -m benchmarks.gpu_calibrate --smoke --out /tmp/cal  # CPU smoke test: 2-layer versions, seconds

Why: the planner's durations (telepathy/cluster/costs.py) rest on published peaks x default
efficiencies until something measures them. This builds each paper model's real
architecture from its config values with random bf16 weights (no hub needed), then times,
at the plan's batch sizes and token counts:

* ``features`` / ``eval``: forward passes over a batch of prompts (2·N FLOPs per token);
* ``train``: forward + backward to ``inputs_embeds`` of the frozen model (the bridge's
  receiver pass: soft tokens + prompt, ``budget=paper`` batch 16);
* ``decode``: greedy decoding steps with a KV cache (memory-bandwidth bound).

Each measured time is divided by what ``costs.default_seconds`` predicts for the same work on
this device kind, giving the ratio the planner multiplies its default by; ``--out`` gets
``calibration.json`` (``{"entries": [{model, device, stage, ratio, measured_s, ...}]}``, the
format ``costs.load_calibration`` reads; commit it as benchmarks/calibration.json) and
``memory.json``: the measured peak of the train stage next to ``resources.py``'s estimate of
the same thing (weights + activations kept for backward, before the margin).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from telepathy import resources
from telepathy.cluster import costs
from telepathy.results import write_json

# architecture values not in conf/model (intermediate size, heads, KV heads), from the models' config.json
ARCH = {
    "llama32_1b": ("LlamaConfig", 8192, 32, 8, True),
    "qwen25_15b": ("Qwen2Config", 8960, 12, 2, True),
    "mistral7b": ("MistralConfig", 14336, 32, 8, False),
    "llama31_8b": ("LlamaConfig", 14336, 32, 8, False),
}
STAGES = {"eval": (16, 96), "train": (16, 48), "decode": (16, 64)}  # (batch, tokens or decode steps)


def build(name: str, smoke: bool, device: torch.device, dtype: torch.dtype):
    import transformers
    from omegaconf import OmegaConf

    facts = OmegaConf.load(costs.REPO / "conf" / "model" / f"{name}.yaml")
    cls, inter, heads, kv, tied = ARCH[name]
    hidden, layers, vocab = int(facts.hidden_size), int(facts.num_layers), int(facts.vocab_size)
    if smoke:
        hidden, inter, heads, kv, layers, vocab = 64, 128, 4, 2, 2, 1024
    config = getattr(transformers, cls)(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=layers,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    facts.num_layers, facts.hidden_size, facts.vocab_size = layers, hidden, vocab
    facts.num_params = sum(p.numel() for p in model.parameters())
    facts.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    if smoke:
        facts.name = f"{name}[smoke]"
    return model, facts


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeat: int) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def measure(model, facts, device, repeat: int) -> tuple[list[dict], dict]:
    vocab = int(facts.vocab_size)
    kind = costs.device_kind({"gpu_names": [torch.cuda.get_device_name(0)]}) if device.type == "cuda" else "cpu"
    if kind not in costs.DEVICES:
        raise SystemExit(f"device {kind!r} has no peak figures in telepathy/cluster/costs.py DEVICES; add them")
    rows, memory = [], {}
    b, t = STAGES["eval"]
    ids = torch.randint(0, vocab, (b, t), device=device)
    with torch.no_grad():
        secs = _timed(lambda: model(input_ids=ids), device, repeat)
    work = costs.Work(flops=2.0 * float(facts.num_params) * b * t, calls=1, layers=int(facts.num_layers))
    rows += [_row(facts, kind, stage, secs, work) for stage in ("eval", "features")]

    b, t = STAGES["train"]
    embeds = torch.randn(b, t, int(facts.hidden_size), device=device, dtype=next(model.parameters()).dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        x = embeds.clone().requires_grad_(True)
        model(inputs_embeds=x).logits.float().mean().backward()

    secs = _timed(train_step, device, repeat)
    work = costs.Work(flops=4.0 * float(facts.num_params) * b * t, calls=3, layers=int(facts.num_layers))
    rows.append(_row(facts, kind, "train", secs, work))
    if device.type == "cuda":
        weights = costs._weight_bytes(facts) / resources.GB
        estimate = weights + resources._backward_activations_gb(facts, b, t)
        memory = {
            "model": str(facts.name),
            "batch": b,
            "tokens": t,
            "measured_peak_gb": round(torch.cuda.max_memory_allocated() / resources.GB, 3),
            "estimate_gb_before_margin": round(estimate, 3),
        }

    b, steps = STAGES["decode"]
    prompt = torch.randint(0, vocab, (b, 8), device=device)
    with torch.no_grad():
        secs = _timed(
            lambda: model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0),
            device,
            max(1, repeat // 2),
        )
    work = costs.Work(bytes=costs._weight_bytes(facts) * steps, calls=steps, layers=int(facts.num_layers))
    rows.append(_row(facts, kind, "decode", secs, work))
    return rows, memory


def _row(facts, kind, stage, secs, work) -> dict:
    predicted = costs.default_seconds(stage, work, kind)
    return {
        "model": str(facts.name),
        "device": kind,
        "stage": stage,
        "ratio": round(secs / predicted, 4),
        "measured_s": round(secs, 5),
        "default_s": round(predicted, 5),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(ARCH), help="comma list of conf/model names")
    parser.add_argument(
        "--out",
        type=Path,
        default=costs.REPO / "benchmarks",
        help="folder for calibration.json and memory.json (default: benchmarks/)",
    )
    parser.add_argument("--smoke", action="store_true", help="2-layer models on the CPU (a plumbing check)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no GPU: run with --smoke for the CPU smoke test", file=sys.stderr)
        return 2
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    entries, memory = [], []
    for name in args.models.split(","):
        model, facts = build(name, args.smoke, device, dtype)
        rows, mem = measure(model, facts, device, args.repeat)
        entries += rows
        if mem:
            memory.append(mem)
        for r in rows:
            print(
                f"{r['model']:<20} {r['device']:<5} {r['stage']:<8} measured {r['measured_s']:.4f}s "
                f"default {r['default_s']:.4f}s ratio {r['ratio']:.3f}",
                flush=True,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(
        args.out / "calibration.json",
        {"device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "entries": entries},
    )
    write_json(args.out / "memory.json", {"rows": memory})
    print(f"wrote {args.out / 'calibration.json'} and {args.out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
