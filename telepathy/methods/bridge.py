"""method=bridge: train a latent bridge from a frozen sender to a frozen receiver, then evaluate.

    sender reads the task prompt  → hidden_states[sender.layer]      (frozen, computed once)
    bridge (Perceiver resampler) → M soft tokens in the receiver's embedding space (trained)
    receiver reads [primer] + [M soft tokens] + [answer prompt]      (frozen)
    readout: log-likelihood of each label verbaliser (or generation + strict parser);
             task.type=generation (XSum): the receiver writes the output, scored with ROUGE

Loss: receiver cross-entropy on the target tokens only + λ · batch-diversity loss. The
target is the label verbaliser (classification) or the reference summary + EOS
(generation); prompt and soft tokens are never scored. Both task types share the data,
models and loop; only the targets and the evaluation differ.
"""

from __future__ import annotations

import logging

import torch

from telepathy.bridge import (
    INITS,
    build_bridge,
    collapse_diagnostics,
    count_params,
    diversity_loss,
    init_from_embeddings,
)
from telepathy.compression import measured_compression
from telepathy.config import ConfigError, check_choice, check_range, num_latents, resolve_layer
from telepathy.data import holdout, load_task
from telepathy.evaluation import evaluate, text_prompt
from telepathy.features import Rows, collate, sender_inputs, sender_prompts
from telepathy.methods import MethodOutput
from telepathy.methods.train_then_evaluate import Trainable, receiver_loss, train_then_evaluate
from telepathy.metrics import ROUGE_TYPES
from telepathy.models import embedding_rms_median, input_embedding_scale
from telepathy.prompting import PLACEMENTS, PromptIO

log = logging.getLogger(__name__)

DETERMINISTIC = False


def validate(cfg) -> None:
    """Keys only the bridge reads (the architecture's shape is checked for every run: it is in
    every run id and the memory plan)."""
    check_choice(cfg, "bridge.placement", list(PLACEMENTS))
    check_choice(cfg, "bridge.init", list(INITS))
    check_choice(cfg, "bridge.centre_grad", [True, False])
    if cfg.bridge.centre_grad:  # a micro-batch of one input has no part that differs: no gradient at all
        from telepathy import batching

        per_device = batching.plan(cfg)["per_device"]
        if per_device < 2:
            raise ConfigError(
                f"bridge.centre_grad=true needs micro-batches of >= 2 inputs; trainer.batch_size and "
                f"batch_by_size give {per_device}; allowed: a larger trainer.batch_size or bridge.centre_grad=false"
            )
    check_range(cfg, "trainer.diversity_weight", lo=0)


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    sender, receiver = ctx.model("sender"), ctx.model("receiver")
    io = PromptIO(receiver)
    layer = resolve_layer(cfg.sender.layer, sender.num_layers)
    m = num_latents(cfg)

    # 1. the sender's hidden states, once per split (the sender never runs inside the loop)
    train_ids = sender_prompts(sender, train, cfg.task.prompt, cfg.task.max_input_tokens)
    test_in = sender_inputs(sender, test, cfg.task.prompt, cfg.task.max_input_tokens)
    test_ids = test_in.ids
    train_feats = ctx.sender_features(sender, train_ids, layer, split="train")
    test_feats = ctx.sender_features(sender, test_ids, layer, split="test")
    mean_tokens = sum(len(x) for x in test_ids) / len(test_ids)

    # 2. the bridge, initialised from the run's seed
    torch.manual_seed(cfg.seed)
    bridge = build_bridge(
        cfg, sender.hidden_size, receiver.hidden_size, m, target_rms=embedding_rms_median(receiver.model)
    )
    if cfg.bridge.init == "embeddings":  # soft tokens start as typical receiver embeddings (bridge.py)
        emb = receiver.model.get_input_embeddings()
        init_from_embeddings(bridge, emb.weight.detach(), input_embedding_scale(receiver.model), cfg.seed)
    # input statistics of the items it trains on (train_then_evaluate holds out the same probe items)
    fit_items = holdout(train, cfg.trainer, cfg.data.sample_seed)[0]
    bridge.set_input_stats(Rows(train_feats, [e.idx for e in fit_items]))  # streamed from the cache
    bridge.to(receiver.device)
    template = io.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt, cfg.bridge.placement)

    def prompts(feats, chunk):
        states, mask = collate([feats[ex.idx] for ex in chunk], receiver.device)
        soft = bridge(states, mask).to(receiver.dtype)
        return [io.fill(template, soft[j]) for j in range(len(chunk))], soft

    ce_loss = receiver_loss(io, cfg)

    def loss(chunk, targets):
        seqs, soft = prompts(train_feats, chunk)
        ce = ce_loss(seqs, chunk, targets)
        div = diversity_loss(soft)
        total = ce + cfg.trainer.diversity_weight * div
        return total, {"loss": total.item(), "ce": ce.item(), "diversity": div.item()}

    # 3. train, then evaluate on the test items (the quick eval reads held-out training items)
    trainable = Trainable(
        io,
        bridge,
        lambda chunk: prompts(test_feats, chunk)[0],
        loss=loss,
        probe_prompts=lambda chunk: prompts(train_feats, chunk)[0],
        params={
            "bridge": count_params(bridge),
            "trainable": count_params(bridge, trainable_only=True),
            "sender": sender.num_params(),
            "receiver": receiver.num_params(),
        },
    )
    out = train_then_evaluate(
        cfg,
        ctx,
        train,
        test,
        trainable,
        bridge={
            "num_latents": m,
            "compression_factor": cfg.compression,
            "sender_layer": layer,
            "mean_sender_tokens": mean_tokens,
            "compression_ratio": mean_tokens / m,
            # measured: text tokens the sender read per soft token (the ratio above counts template tokens)
            **measured_compression(test_in.text_tokens, m),
            "truncated_test_items": sum(test_in.truncated),
        },
    )

    # 4. collapse: one constant prompt for every input must never pass silently into a table
    with torch.no_grad():
        probe_soft = prompts(test_feats, test[: cfg.trainer.eval_samples])[1]
    classification = cfg.task.type == "classification"
    diagnostics = collapse_diagnostics(probe_soft, [p["pred"] for p in out["predictions"]] if classification else None)
    out["details"]["bridge"]["diagnostics"] = diagnostics
    if diagnostics.get("single_class"):
        log.warning(
            "the bridge collapsed: the readout answers one class for all %d test items "
            "(soft-token cosine across inputs %.4f); this run's accuracy is the majority rate",
            len(out["predictions"]),
            diagnostics["soft_token_cosine_mean"],
        )

    # 5. the receiver's own zero-shot on the same items
    if cfg.eval.receiver_zeroshot:
        zs, _, _ = evaluate(io, test, text_prompt(io, cfg.task.prompt), cfg, desc="receiver zero-shot")
        keys = list(ROUGE_TYPES) if cfg.task.type == "generation" else ["accuracy", "macro_f1"]
        out["metrics"].update({f"receiver_zeroshot_{k}": zs[k] for k in keys})
    return out
