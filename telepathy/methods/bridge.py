"""method=bridge: train a latent bridge from a frozen sender to a frozen receiver, then evaluate.

    sender reads the task prompt  → hidden_states[sender.layer]      (frozen, computed once)
    bridge (Perceiver resampler) → M soft tokens in the receiver's embedding space (trained)
    receiver reads [primer] + [M soft tokens] + [answer prompt]      (frozen)
    readout: log-likelihood of each label verbaliser (or generation + strict parser);
             task.type=generation (XSum): the receiver writes the output, scored with ROUGE

Loss: the receiver's cross-entropy on the target (``trainer.loss``: over the label verbalisers by
default; the reference summary + EOS for generation; prompt and soft tokens are never scored),
plus λ x the diversity term (``trainer.diversity_weight``, 0 by default: each input's soft tokens'
mean cosine with the reference set's). Both are means of per-input terms, so an effective batch
gives the same update however it is split into micro-batches. Both task types share the data,
models and loop; only the targets and the evaluation differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from telepathy.bridge import (
    INITS,
    PerceiverBridge,
    build_bridge,
    collapse_diagnostics,
    count_params,
    diversity_loss,
    init_from_embeddings,
    init_from_text,
    reference_diversity,
)
from telepathy.compression import latents, measured_compression
from telepathy.config import ConfigError, check_choice, check_range, resolve_layer
from telepathy.data import holdout, load_task
from telepathy.evaluation import evaluate, text_prompt
from telepathy.features import Rows, collate, sender_inputs, sender_prompts
from telepathy.methods import MethodOutput
from telepathy.methods.train_then_evaluate import Trainable, receiver_loss, train_then_evaluate
from telepathy.metrics import ROUGE_TYPES
from telepathy.models import embedding_rms_median, input_embedding_scale
from telepathy.prompting import PLACEMENTS, PromptIO
from telepathy.results import FLAGS
from telepathy.stats import paired_bootstrap

log = logging.getLogger(__name__)

DETERMINISTIC = False


def validate(cfg) -> None:
    """Keys only the bridge reads (the architecture's shape is checked for every run: it is in
    every run id and the memory plan)."""
    check_choice(cfg, "bridge.placement", list(PLACEMENTS))
    check_choice(cfg, "bridge.init", list(INITS))
    check_choice(cfg, "bridge.centre_grad", [True, False])
    k = cfg.bridge.reference_items
    if isinstance(k, bool) or not isinstance(k, int) or k == 1 or k < 0:
        raise ConfigError(f"bridge.reference_items={k!r} is not allowed; allowed: 0 (off) or an integer >= 2")
    check_range(cfg, "trainer.diversity_weight", lo=0)
    if cfg.bridge.centre_grad:
        if k:
            raise ConfigError(
                "bridge.centre_grad=true is the previous bridge's ablation and replaces the reference set; "
                "allowed: bridge.centre_grad=true with bridge.reference_items=0, or bridge.centre_grad=false"
            )
        from telepathy.resources import batch_plan  # a micro-batch of one input has no part that differs

        per_device = batch_plan(cfg)["per_device"]
        if per_device < 2:
            raise ConfigError(
                f"bridge.centre_grad=true needs micro-batches of >= 2 inputs; trainer.batch_size and "
                f"batch_by_size give {per_device}; allowed: a larger trainer.batch_size or bridge.centre_grad=false"
            )


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    sender, receiver = ctx.model("sender"), ctx.model("receiver")
    io = PromptIO(receiver)
    layer = resolve_layer(cfg.sender.layer, sender.num_layers)
    m = latents(cfg)

    # 1. the sender's hidden states, once per split (the sender never runs inside the loop)
    train_ids = sender_prompts(sender, train, cfg.task.prompt, cfg.task.max_input_tokens)
    test_in = sender_inputs(sender, test, cfg.task.prompt, cfg.task.max_input_tokens)
    test_ids = test_in.ids
    train_feats = ctx.sender_features(sender, train_ids, layer, split="train")
    test_feats = ctx.sender_features(sender, test_ids, layer, split="test")
    mean_tokens = sum(len(x) for x in test_ids) / len(test_ids)
    sender_size, sender_params = sender.hidden_size, sender.num_params()
    del sender  # the features are all it gives: it leaves the device before training (method.work.train_resident)
    ctx.release("sender")

    # 2. the bridge, initialised from the run's seed
    torch.manual_seed(cfg.seed)
    bridge = build_bridge(cfg, sender_size, receiver.hidden_size, m, target_rms=embedding_rms_median(receiver.model))
    # input statistics of the items it trains on (train_then_evaluate holds out the same probe items)
    fit_items = holdout(train, cfg.trainer, cfg.data.sample_seed)[0]
    init_output(bridge, cfg, receiver, fit_items)
    bridge.set_input_stats(Rows(train_feats, [e.idx for e in fit_items]))  # streamed from the cache
    bridge.to(receiver.device)
    if cfg.bridge.reference_items:
        bridge.set_reference([train_feats[ex.idx] for ex in reference_set(fit_items, cfg)])
    template = io.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt, cfg.bridge.placement)
    soft = SoftPrompts(bridge, io, template, cfg)

    # 3. train, then evaluate on the test items (the quick eval reads held-out training items)
    trainable = Trainable(
        io,
        bridge,
        lambda chunk: soft.prompts(test_feats, chunk),
        loss=lambda chunk, targets: soft.loss(train_feats, chunk, targets),
        probe_prompts=lambda chunk: soft.prompts(train_feats, chunk),
        params={
            "bridge": count_params(bridge),
            "trainable": count_params(bridge, trainable_only=True),
            "sender": sender_params,
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

    # 4. the control: the same trained bridge, each test item reading another item's sender states
    if cfg.eval.shuffled_sender:
        shuffled_sender(cfg, io, soft, test, test_feats, out)

    # 5. collapse: one constant prompt for every input must never pass silently into a table
    with torch.no_grad():
        probe_soft = soft.encode(test_feats, test[: cfg.trainer.eval_samples])[0]
    classification = cfg.task.type == "classification"
    predicted = [p["pred"] for p in out["predictions"]] if classification else None
    diagnostics = collapse_diagnostics(probe_soft, predicted, bridge.shared_part())
    out["details"]["bridge"]["diagnostics"] = diagnostics
    out["details"]["bridge"]["flags"] = flags = run_flags(out["metrics"], diagnostics, out["details"]["bridge"])
    for flag in flags:
        log.warning("%s: %s", flag, FLAGS[flag])

    # 6. the receiver's own zero-shot on the same items
    if cfg.eval.receiver_zeroshot:
        zs, _, _ = evaluate(io, test, text_prompt(io, cfg.task.prompt), cfg, desc="receiver zero-shot")
        keys = list(ROUGE_TYPES) if cfg.task.type == "generation" else ["accuracy", "macro_f1"]
        out["metrics"].update({f"receiver_zeroshot_{k}": zs[k] for k in keys})
    return out


MAJORITY_MARGIN = 0.1  # the robustness table's rule (benchmarks/robustness.py)


def shuffled_sender(cfg, io: PromptIO, soft: SoftPrompts, test: list, feats, out: dict) -> None:
    """Score the trained bridge with the sender's features permuted across the test items (a
    derangement drawn from the run's seed: no item reads its own states), into ``out``: the
    metrics as ``<metric>_shuffled_sender``, the per-item values in each prediction row, and
    ``bridge.control`` with the paired difference (own - shuffled) and its 95% CI over items.

    What is left when the receiver cannot read the input: the soft prompt every input shares,
    the answer prompt and the label prior. A bridge that beats it reads the sender."""
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    partner = {test[i].idx: test[order[(k + 1) % len(order)]].idx for k, i in enumerate(order)}
    permuted = Rows(feats, [partner[i] for i in range(len(test))])  # read from the cache as needed; idx = position
    metrics, rows, _ = evaluate(io, test, lambda chunk: soft.prompts(permuted, chunk), cfg, desc="eval (shuffled)")
    generation = cfg.task.type == "generation"
    keys = list(ROUGE_TYPES) if generation else ["accuracy", "macro_f1"]
    out["metrics"].update({f"{k}_shuffled_sender": metrics[k] for k in keys})
    per_item = list(ROUGE_TYPES) if generation else ["correct", "pred"]
    for own, control in zip(out["predictions"], rows):
        own.update({f"{k}_shuffled_sender": control[k] for k in per_item})
    headline = HEADLINE[cfg.task.type]
    diffs = [float(r[headline]) - float(r[f"{headline}_shuffled_sender"]) for r in out["predictions"]]
    delta, lo, hi = paired_bootstrap([diffs], n_boot=2000, seed=cfg.seed)
    out["details"]["bridge"]["control"] = {
        "metric": "accuracy" if headline == "correct" else headline,
        "shuffled_sender": {k: metrics[k] for k in keys},
        "delta": delta,
        "delta_ci_low": lo,
        "delta_ci_high": hi,
        "permutation_seed": cfg.seed,
    }


HEADLINE = {"classification": "correct", "generation": "rougeL"}  # the per-item value the control compares


def run_flags(metrics: dict, diagnostics: dict, bridge: dict) -> list[str]:
    """The names of ``FLAGS`` this run carries."""
    flags = []
    if diagnostics.get("single_class"):  # at most one class: none at all is another failure
        flags.append("unparsed" if diagnostics.get("predicted_classes") == 0 else "single_class")
    if "majority_accuracy" in metrics and metrics["accuracy"] < metrics["majority_accuracy"] + MAJORITY_MARGIN:
        flags.append("below_majority")
    control = bridge.get("control")
    if control and control["delta_ci_low"] <= 0:
        flags.append("sender_unread")
    return flags


@dataclass
class SoftPrompts:
    """The bridge between features and the receiver: a chunk of examples' features → soft tokens →
    the receiver's prompts (``template`` with the soft tokens in place) → the training loss."""

    bridge: PerceiverBridge
    io: PromptIO
    template: list
    cfg: DictConfig

    def encode(self, feats, chunk) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.bridge.encode(*collate([feats[ex.idx] for ex in chunk], self.io.lm.device))

    def fill(self, soft: torch.Tensor) -> list[list]:
        return [self.io.fill(self.template, s) for s in soft.to(self.io.lm.dtype)]

    def prompts(self, feats, chunk) -> list[list]:
        return self.fill(self.encode(feats, chunk)[0])

    def loss(self, feats, chunk, targets) -> tuple[torch.Tensor, dict]:
        """The receiver's cross-entropy (``trainer.loss``) + λ x the diversity term. With a reference
        set both are means of per-input terms (each input against the fixed set), so the split of an
        effective batch into micro-batches does not change the update; without one (the previous
        bridges, ``bridge.reference_items=0``) the diversity term is the micro-batch's mean pairwise
        cosine, which does."""
        soft, reference = self.encode(feats, chunk)
        ce = receiver_loss(self.io, self.cfg)(self.fill(soft), chunk, targets)
        div = diversity_loss(soft) if reference is None else reference_diversity(soft, reference)
        weight = self.cfg.trainer.diversity_weight
        total = ce + weight * div if weight else ce
        stats = {"loss": total.detach(), "ce": ce.detach(), "diversity": div.detach()}
        return total, {**stats, **batch_similarity(soft.detach(), self.bridge.shared_part())}


def batch_similarity(soft: torch.Tensor, shared: torch.Tensor | None) -> dict:
    """What log.jsonl shows of a collapse as it happens (not in the loss): the micro-batch's mean
    pairwise cosine of its soft tokens (``batch_cosine``; 1 = one prompt for every input) and of their
    input-dependent part alone (``input_cosine``: soft tokens minus the learned shared part)."""
    out = {"batch_cosine": diversity_loss(soft)}
    if shared is not None:
        out["input_cosine"] = diversity_loss(soft - shared.detach())
    return out


TEXT_INIT_ITEMS = 4096  # training texts (a seeded subset of the fit items) whose receiver tokens bridge.init=text draws


def init_output(bridge, cfg, receiver, fit_items) -> None:
    """Point the bridge's output at the receiver's embeddings (``bridge.init``; ``random`` keeps PyTorch's init)."""
    if cfg.bridge.init == "random":
        return
    weight, scale = receiver.model.get_input_embeddings().weight.detach(), input_embedding_scale(receiver.model)
    if cfg.bridge.init == "embeddings":
        init_from_embeddings(bridge, weight, scale, cfg.seed)
        return
    texts = [ex.text for ex in _seeded(fit_items, TEXT_INIT_ITEMS, cfg.seed)]
    ids = [t for row in receiver.tokenizer(texts, add_special_tokens=False).input_ids for t in row]
    init_from_text(bridge, weight, scale, ids, cfg.seed)


def reference_set(fit_items, cfg) -> list:
    """The K training items of the reference set (``bridge.reference_items``; all of them when fewer), seeded."""
    return _seeded(fit_items, int(cfg.bridge.reference_items), cfg.seed)


def _seeded(items: list, k: int, seed: int) -> list:
    """At most ``k`` of ``items``, drawn without replacement by ``seed``, in the drawn order."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:k]
    return [items[i] for i in order.tolist()]
