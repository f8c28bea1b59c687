"""method=bridge: train a latent bridge from a frozen sender to a frozen receiver, then evaluate.

    sender reads the task prompt  → hidden_states[sender.layer]      (frozen, computed once)
    bridge (Perceiver resampler) → M soft tokens in the receiver's embedding space (trained)
    receiver reads [primer] + [M soft tokens] + [answer prompt]      (frozen)
    readout: log-likelihood of each label verbaliser (or generation + strict parser)

Loss: receiver cross-entropy on the label tokens only + λ · batch-diversity loss.
"""

from __future__ import annotations

import logging

import torch

from telepathy.bridge import build_bridge, count_params, diversity_loss
from telepathy.config import num_latents, resolve_layer
from telepathy.data import load_task
from telepathy.evaluation import evaluate_classification, text_prompt
from telepathy.features import collate, sender_prompts
from telepathy.metrics import majority
from telepathy.models import embedding_rms_median
from telepathy.receiver import PromptIO, label_token_ids
from telepathy.training import fit

log = logging.getLogger(__name__)

DETERMINISTIC = False


def run(cfg, ctx) -> dict:
    train, test = load_task(cfg)
    sender, receiver = ctx.model("sender"), ctx.model("receiver")
    io = PromptIO(receiver)
    layer = resolve_layer(cfg.sender.layer, sender.num_layers)
    m = num_latents(cfg)

    # 1. the sender's hidden states, once per split (the sender never runs inside the loop)
    train_ids = sender_prompts(sender, train, cfg.task.prompt, cfg.task.max_input_tokens)
    test_ids = sender_prompts(sender, test, cfg.task.prompt, cfg.task.max_input_tokens)
    train_feats = ctx.sender_features(sender, train_ids, layer, split="train")
    test_feats = ctx.sender_features(sender, test_ids, layer, split="test")
    mean_tokens = sum(len(x) for x in test_ids) / len(test_ids)

    # 2. the bridge, initialised from the run's seed
    torch.manual_seed(cfg.seed)
    bridge = build_bridge(cfg, sender.hidden_size, receiver.hidden_size, m,
                          target_rms=embedding_rms_median(receiver.model)).to(receiver.device)
    template = io.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt, cfg.bridge.placement)
    label_ids = label_token_ids(io, list(cfg.task.labels), cfg.task.label_prefix)

    def soft_tokens(feats, indices):
        states, mask = collate([feats[i] for i in indices], receiver.device)
        return bridge(states, mask).to(receiver.dtype)

    def prompts(feats, indices):
        soft = soft_tokens(feats, indices)
        return [io.fill(template, soft[j]) for j in range(len(indices))], soft

    def loss_fn(indices):
        seqs, soft = prompts(train_feats, indices)
        ce = io.label_loss(seqs, [label_ids[train[i].label] for i in indices])
        div = diversity_loss(soft)
        loss = ce + cfg.trainer.diversity_weight * div
        return loss, {"loss": loss.item(), "ce": ce.item(), "diversity": div.item()}

    probe = test[: cfg.trainer.eval_samples]

    def eval_probe():
        metrics, _ = evaluate_classification(io, probe, lambda chunk: prompts(test_feats, [e.idx for e in chunk])[0],
                                             cfg.task, cfg.eval, desc="eval@step")
        return {"eval_accuracy": metrics["accuracy"], "eval_macro_f1": metrics["macro_f1"]}

    # 3. train
    result = fit(bridge, loss_fn, len(train), cfg.trainer, cfg.seed, ctx.run_dir, eval_fn=eval_probe,
                 device=receiver.device)

    # 4. evaluate on the test items; the receiver's own zero-shot on the same items
    metrics, predictions = evaluate_classification(
        io, test, lambda chunk: prompts(test_feats, [e.idx for e in chunk])[0], cfg.task, cfg.eval, desc="eval")
    metrics.update(majority([e.label for e in train], [e.label for e in test]))
    if cfg.eval.receiver_zeroshot:
        zs, _ = evaluate_classification(io, test, text_prompt(io, cfg.task.prompt), cfg.task, cfg.eval,
                                        desc="receiver zero-shot")
        metrics["receiver_zeroshot_accuracy"] = zs["accuracy"]
        metrics["receiver_zeroshot_macro_f1"] = zs["macro_f1"]
    eval_s = metrics.pop("eval_s")
    return {
        "metrics": metrics,
        "predictions": predictions,
        "bridge": {
            "num_latents": m,
            "compression_factor": cfg.compression,
            "sender_layer": layer,
            "mean_sender_tokens": mean_tokens,
            "compression_ratio": mean_tokens / m,
        },
        "params": {
            "bridge": count_params(bridge),
            "trainable": count_params(bridge, trainable_only=True),
            "sender": sender.num_params(),
            "receiver": receiver.num_params(),
        },
        "timing": {"train_s": result.train_s, "eval_s": eval_s},
        "training": {"steps": result.steps, "resumed_from": result.resumed_from,
                     "final_loss": result.final_loss, "examples_seen": result.examples_seen},
    }
