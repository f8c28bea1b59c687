"""Compression: how many soft tokens (M) a run gives the receiver, and how many tokens of input
text each one stands for.

``compression_basis`` says what the factor divides:
* ``cap`` (the default): M = ceil(task.max_input_tokens / compression), a nominal factor; the text
  actually read is usually far shorter than the cap (an SST-2 review is ~24 tokens, a TREC
  question ~10), so "8x" can be 1x or, at "4x" on TREC, an expansion;
* ``measured`` (the paper phases): M = ceil(mean text tokens the sender reads of the run's
  training items / compression), so "8x" means 8x measured on the training split.
``bridge.num_latents`` overrides both. Every bridge record has the measured ratio on its test
items next to the nominal one (``measured_compression``); tables mark a row whose M is at or
above the text's length (docs/results.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from telepathy.config import num_latents

BASES = ("cap", "measured")


def latents(cfg) -> int:
    """M of this run (``compression_basis``; ``config.num_latents`` is the cap-based M, an upper
    bound of the measured one, which the resource plan uses before any tokenizer is loaded)."""
    if cfg.bridge.get("num_latents") or cfg.get("compression_basis", "cap") == "cap":
        return num_latents(cfg)
    return max(1, math.ceil(train_text_tokens_mean(cfg) / cfg.compression))


def train_text_tokens_mean(cfg) -> float:
    """Mean tokens of text the sender reads per training item of this run (its tokenizer, the
    task's word cap, then ``task.max_input_tokens``), cached on disk under ``paths.cache_dir``
    keyed by everything it depends on: one tokenizer pass per task and sender, not one per job."""
    key = {
        "sender": {k: _plain(cfg.sender.get(k)) for k in ("name", "hub_id", "path", "stand_in", "revision")},
        "task": {k: _plain(cfg.task.get(k)) for k in ("name", "local_dir", "text_column", "max_text_words")},
        "max_input_tokens": int(cfg.task.max_input_tokens),
        "train_samples": _plain(cfg.task.get("train_samples")),
        "sample_seed": _plain(cfg.data.get("sample_seed")),
        "data_root": _plain(cfg.data.get("root")),
    }
    text = json.dumps(key, sort_keys=True)
    if text not in _MEASURED:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        stored = Path(str(cfg.paths.cache_dir)).expanduser() / "text_tokens" / f"{digest}.json"
        _MEASURED[text] = _measure(stored, text, cfg)
    return _MEASURED[text]


_MEASURED: dict[str, float] = {}  # this process's measurements, by key


def _measure(stored: Path, key_text: str, cfg) -> float:
    from telepathy.data import load_split
    from telepathy.fsutil import atomic_path
    from telepathy.models import load_tokenizer

    try:
        found = json.loads(stored.read_text())
        if found.get("key") == key_text:
            return float(found["mean"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: measure again
    train = load_split(cfg.task, cfg.data, "train", cfg.task.get("train_samples"), cfg.data.sample_seed)
    tok = load_tokenizer(cfg.sender)
    cap = int(cfg.task.max_input_tokens)
    counts = [min(len(ids), cap) for ids in tok([ex.text for ex in train], add_special_tokens=False).input_ids]
    mean = statistics.mean(counts)
    stored.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(stored) as tmp:
        Path(tmp).write_text(json.dumps({"key": key_text, "mean": mean, "items": len(counts)}))
    return mean


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def measured_compression(text_tokens: list[int], positions: int | float) -> dict:
    """Text tokens read per receiver position (text tokens / M), per test item summarised.

    ``text_tokens``: each item's text tokens that reached the reader (after any cap);
    ``positions``: receiver positions that carry them (M soft tokens).
    """
    if not text_tokens or positions <= 0:
        raise ValueError("measured compression needs test items and at least one position")
    ratios = sorted(t / positions for t in text_tokens)
    q = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else ratios * 9
    return {
        "text_tokens_mean": statistics.mean(text_tokens),
        "measured_compression_mean": statistics.mean(ratios),
        "measured_compression_median": statistics.median(ratios),
        "measured_compression_p10": q[0],
        "measured_compression_p90": q[-1],
    }
