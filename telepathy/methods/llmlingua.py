"""method=llmlingua: prompt compression in text, the bridge's compression rival.

    LLMLingua-1 (``llmlingua`` package, through ``telepathy.methods.llmlingua_compressor``) drops the
    input tokens a small causal LM (``method.compressor``) finds least surprising
    receiver reads the task prompt with the compressed text → label readout as zero-shot

``method.budget``: ``rate`` keeps ``method.rate`` of the input's tokens (0.125 by
default, the paper's 8x); ``match_bridge`` keeps M tokens, the number of soft tokens a
bridge with this config's ``compression`` gives the receiver (``method=llmlingua_matched``:
its ``uses: [bridge]`` puts the compression in the run id and identity, so matched runs of
two factors are two rows, each compared with the bridge at its own M). Token counts are the
compressor's. Compression is a deterministic function of the text, so the result is
the same for every seed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from telepathy.compression import latents
from telepathy.config import ConfigError, check_choice, model_config, uses_soft_tokens
from telepathy.data import load_task
from telepathy.evaluation import text_prompt
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import check_model_choice, evaluate_counted, inference_result
from telepathy.methods.llmlingua_compressor import compress, make_compressor
from telepathy.models import local_model_dir, stand_in_config
from telepathy.prompting import PromptIO

DETERMINISTIC = True


def validate(cfg) -> None:
    check_model_choice(cfg, "method.compressor")
    check_choice(cfg, "method.budget", ["rate", "match_bridge"])
    if cfg.method.budget == "match_bridge" and not uses_soft_tokens(cfg):
        # M is a function of compression: without it in the run's identity two factors would be one row
        raise ConfigError(
            f"method.budget=match_bridge needs method.uses: [bridge] (M comes from compression); "
            f"got method.uses={list(cfg.method.uses)}: use method=llmlingua_matched"
        )
    rate = cfg.method.rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 1:
        raise ConfigError(f"method.rate={rate!r} is not allowed; allowed: a number in (0, 1]")


def compression_target(cfg) -> dict:
    """``compress`` keyword: the kept fraction, or the bridge's M tokens."""
    if cfg.method.budget == "match_bridge":
        return {"target_token": latents(cfg)}
    return {"rate": float(cfg.method.rate)}


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    receiver = ctx.model("receiver")
    io = PromptIO(receiver)
    model_cfg = model_config(cfg, cfg.method.compressor)
    # a stand-in (budget=tiny, offline) lends its own weights folder: LLMLingua loads a folder, not a config
    folder = local_model_dir(stand_in_config(model_cfg) or model_cfg)
    device = ctx.devices.get(cfg.method.compressor, ctx.devices["sender"])
    compressor = make_compressor(
        str(folder) if folder else model_cfg.hub_id, device=str(device), dtype=model_cfg.get("dtype", "auto")
    )

    t0 = time.time()
    target = compression_target(cfg)
    compressed = {ex.idx: compress(compressor, ex.text, **target) for ex in test}
    compress_s = time.time() - t0
    short = [replace(ex, text=compressed[ex.idx].text) for ex in test]
    metrics, rows, eval_s = evaluate_counted(
        io, short, text_prompt(io, cfg.task.prompt), cfg, desc="receiver reads compressed text"
    )
    for row in rows:
        c = compressed[row["idx"]]
        row.update(compressed_text=c.text, origin_tokens=c.origin_tokens, compressed_tokens=c.compressed_tokens)
    origin = statistics.mean(c.origin_tokens for c in compressed.values())
    kept = statistics.mean(c.compressed_tokens for c in compressed.values())
    metrics.update(
        origin_tokens_mean=origin,
        compressed_tokens_mean=kept,
        compression_ratio=origin / kept if kept else float("inf"),
        compress_s=compress_s,
        **target,
    )
    return inference_result(
        cfg,
        metrics,
        rows,
        train,
        test,
        {"receiver": receiver},
        compress_s + eval_s,
        extra={"compressor": model_cfg.name},
    )
