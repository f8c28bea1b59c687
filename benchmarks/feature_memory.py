"""Peak host memory of the sender-feature path: streamed through the cache vs held in RAM.

    python -m benchmarks.feature_memory --examples 2000 --tokens 64 --hidden 2048 [--mode stream|ram]

Builds a one-layer random model (``--hidden`` wide, tiny vocabulary: its weights are a few
MB), encodes ``--examples`` prompts of ``--tokens`` tokens at hidden_states[0], then does
what a bridge run does with them: the input statistics (``set_input_stats``) and one
epoch of collated batches. ``stream`` goes through the feature cache (``cache.mode=on``:
written batch by batch, read back on demand); ``ram`` is ``cache.mode=off`` (every
feature in memory, as the cache did before it streamed). Prints one JSON line: feature
set size, RSS before encoding and the peak RSS of the feature path, in MB. The peak is
reset just before encoding (Linux ``/proc/self/clear_refs``), so a transient peak of the
imports cannot hide the growth; where that reset is unavailable, each mode must run in
its own process (peak RSS only grows).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from telepathy.bridge import PerceiverBridge
from telepathy.features import cached_encode, collate
from telepathy.models import LoadedModel


def _status_mb(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    return None


def reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where Linux's clear_refs is unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mb() -> float:
    """Resident set size now (falls back to the peak where /proc is unavailable)."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def measure(mode: str, examples: int, tokens: int, hidden: int, batch: int, cache_dir: Path) -> dict:
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    lm = LoadedModel(
        name="memory_probe",
        model=model,
        tokenizer=SimpleNamespace(pad_token_id=0),
        device=torch.device("cpu"),
        dtype=torch.float32,
        chat_template=False,
    )
    ids = torch.randint(1, 128, (examples, tokens)).tolist()
    model_cfg = OmegaConf.create({"name": "memory_probe", "random_init": True, "config_overrides": {"hidden": hidden}})
    cache_cfg = OmegaConf.create({"mode": "on" if mode == "stream" else "off", "dir": str(cache_dir)})
    reset = reset_peak()
    before = rss_mb() if reset else peak_rss_mb()
    t0 = time.time()
    feats = cached_encode(lm, ids, [0], cache_cfg, model_cfg, batch_size=batch)[0]
    bridge = PerceiverBridge(hidden, 64, num_latents=4, dim=32, depth=1, heads=2)
    bridge.set_input_stats(feats)
    for start in range(0, len(feats), batch):  # one epoch of the batches training reads
        states, mask = collate([feats[i] for i in range(start, min(start + batch, len(feats)))], "cpu")
        del states, mask
    return {
        "mode": mode,
        "examples": examples,
        "tokens": tokens,
        "hidden": hidden,
        "feature_mb": round(examples * tokens * hidden * 4 / 2**20, 1),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "growth_mb": round(peak_rss_mb() - before, 1),
        "peak_reset": reset,
        "seconds": round(time.time() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["stream", "ram"], default="stream")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cache-dir", help="feature cache folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = measure(args.mode, args.examples, args.tokens, args.hidden, args.batch, Path(args.cache_dir or tmp))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
