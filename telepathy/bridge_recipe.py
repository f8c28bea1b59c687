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

from telepathy.bridge import build_bridge, count_params, diversity_loss
from telepathy.config import num_latents, resolve_layer
from telepathy.data import holdout, load_task
from telepathy.evaluation import evaluate, evaluate_classification, text_prompt
from telepathy.compression import measured_compression
from telepathy.features import collate, sender_inputs, sender_prompts
from telepathy.metrics import ROUGE_TYPES, majority
from telepathy.models import embedding_rms_median
from telepathy.receiver import PromptIO, label_token_ids
from telepathy.training import fit

log = logging.getLogger(__name__)

DETERMINISTIC = False


def classification_targets(io: PromptIO, examples, task_cfg) -> list[list[int]]:
    """Each example's label verbaliser token ids: the loss scores the label only."""
    label_ids = label_token_ids(io, list(task_cfg.labels), task_cfg.label_prefix)
    return [label_ids[ex.label] for ex in examples]


def generation_targets(io: PromptIO, examples, task_cfg) -> list[list[int]]:
    """Each example's reference tokens (at most ``max_target_tokens`` with EOS) after the answer prompt.

    EOS ends every target so the receiver learns where to stop; the summary is tokenised
    with ``target_prefix`` as it follows the answer prompt.
    """
    keep = task_cfg.max_target_tokens - 1
    return [io.ids(task_cfg.target_prefix + ex.target)[:keep] + [io.tok.eos_token_id] for ex in examples]


def run(cfg, ctx) -> dict:
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
    bridge = build_bridge(cfg, sender.hidden_size, receiver.hidden_size, m,
                          target_rms=embedding_rms_median(receiver.model))
    fit_items, probe = holdout(train, cfg.trainer, cfg.data.sample_seed)  # quick eval: held-out train items
    bridge.set_input_stats([train_feats[e.idx] for e in fit_items])
    bridge.to(receiver.device)
    template = io.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt, cfg.bridge.placement)
    generation = cfg.task.type == "generation"
    targets = (generation_targets if generation else classification_targets)(io, train, cfg.task)

    def soft_tokens(feats, indices):
        states, mask = collate([feats[i] for i in indices], receiver.device)
        return bridge(states, mask).to(receiver.dtype)

    def prompts(feats, indices):
        soft = soft_tokens(feats, indices)
        return [io.fill(template, soft[j]) for j in range(len(indices))], soft

    def loss_fn(indices):
        indices = [fit_items[i].idx for i in indices]
        seqs, soft = prompts(train_feats, indices)
        ce = io.label_loss(seqs, [targets[i] for i in indices])
        div = diversity_loss(soft)
        loss = ce + cfg.trainer.diversity_weight * div
        return loss, {"loss": loss.item(), "ce": ce.item(), "diversity": div.item()}

    def test_prompts(chunk):
        return prompts(test_feats, [e.idx for e in chunk])[0]

    def probe_prompts(chunk):
        return prompts(train_feats, [e.idx for e in chunk])[0]

    def eval_probe():
        if generation:  # held-out summary cross-entropy: generating every few steps costs too much on CPU
            probe_targets = generation_targets(io, probe, cfg.task)
            with torch.no_grad():
                return {"eval_loss": io.label_loss(probe_prompts(probe), probe_targets).item()}
        metrics, _ = evaluate_classification(io, probe, probe_prompts, cfg.task, cfg.eval, desc="eval@step")
        return {"eval_accuracy": metrics["accuracy"], "eval_macro_f1": metrics["macro_f1"]}

    # 3. train
    result = fit(bridge, loss_fn, len(fit_items), cfg.trainer, cfg.seed, ctx.run_dir, eval_fn=eval_probe,
                 device=receiver.device)

    # 4. evaluate on the test items; the receiver's own zero-shot on the same items
    metrics, predictions = evaluate(io, test, test_prompts, cfg, desc="eval")
    if not generation:
        metrics.update(majority([e.label for e in train], [e.label for e in test]))
    if cfg.eval.receiver_zeroshot:
        zs, _ = evaluate(io, test, text_prompt(io, cfg.task.prompt), cfg, desc="receiver zero-shot")
        keys = list(ROUGE_TYPES) if generation else ["accuracy", "macro_f1"]
        metrics.update({f"receiver_zeroshot_{k}": zs[k] for k in keys})
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
            # measured: text tokens the sender read per soft token (the ratio above counts template tokens)
            **measured_compression(test_in.text_tokens, m),
            "truncated_test_items": sum(test_in.truncated),
        },
        "params": {
            "bridge": count_params(bridge),
            "trainable": count_params(bridge, trainable_only=True),
            "sender": sender.num_params(),
            "receiver": receiver.num_params(),
        },
        "timing": {"train_s": result.train_s, "eval_s": eval_s},
        "training": {"steps": result.steps, "resumed_from": result.resumed_from,
                     "final_loss": result.final_loss, "examples_seen": result.examples_seen,
                     "heldout_probe_items": len(probe)},
    }
