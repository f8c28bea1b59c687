"""Train, then evaluate: the shell of every method that trains weights in front of or inside
the frozen receiver (the bridge, prompt tuning, LoRA).

    targets  the label verbaliser (classification) or the reference + EOS (generation)
    loss     ``trainer.loss``: cross-entropy over the label verbalisers (``classes``, the default for
             classification scored by likelihood) or over the vocabulary on the target tokens
             (``tokens``: generation, the generate readout); a method may add a term
    probe    every ``trainer.eval_every`` steps on ``trainer.eval_samples`` training items held
             out from training (``data.holdout``; never test items, which would make the test
             set a model-selection set): accuracy / macro-F1, or the summary cross-entropy
    fit      ``telepathy.training.fit``: cfg.trainer, seeded data order, checkpoint / resume
    evaluate the shared readout on every test item; the majority class beside it

One shell keeps the comparison fair: the methods differ only in what they train and
how they build the receiver's prompt, never in the loop, the probe or the scoring.
A method hands over its trainable module and a prompt builder (and, the bridge, its
own loss); it keeps only what makes it different.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from telepathy.data import Example, holdout
from telepathy.evaluation import evaluate, evaluate_task
from telepathy.methods import MethodOutput, output
from telepathy.metrics import majority
from telepathy.prompting import PromptIO, generation_targets, label_token_ids, task_targets
from telepathy.training import fit

Prompts = Callable[[list[Example]], list[list]]
Loss = Callable[[list[Example], list[list[int]]], tuple[torch.Tensor, dict]]
Evaluate = Callable[..., tuple[dict, list[dict], float]]


@dataclass
class Trainable:
    """What a method hands the shell: what it trains and how the receiver reads it.

    ``prompts(examples)`` gives the receiver's prompt sequences of test items (and of training
    items, unless ``loss`` is given). ``loss(examples, targets) -> (loss, stats)`` replaces the
    default cross-entropy on the targets; its stats (floats) go to ``log.jsonl``.
    ``evaluate_fn`` is ``evaluation.evaluate`` or a wrapper with the same signature (the
    baselines count the tokens the receiver read). ``probe_prompts`` builds the held-out
    training items' prompts where ``prompts`` cannot (the bridge reads the train split's
    features for them); default ``prompts``. ``params`` goes to the output as it is.
    """

    io: PromptIO
    module: torch.nn.Module
    prompts: Prompts
    params: dict
    loss: Loss | None = None
    evaluate_fn: Evaluate = evaluate
    probe_prompts: Prompts | None = None


def loss_kind(cfg) -> str:
    """``trainer.loss`` resolved: ``auto`` is ``classes`` for classification read out by label
    likelihood (the loss then trains exactly the decision the readout makes), else ``tokens``."""
    kind = cfg.trainer.loss
    if kind == "auto":
        kind = "classes" if cfg.task.type == "classification" and cfg.eval.readout == "score" else "tokens"
    return kind


def receiver_loss(io: PromptIO, cfg) -> Callable[[list[list], list[Example], list[list[int]]], torch.Tensor]:
    """``(prompt sequences, examples, targets) -> loss``: the receiver's cross-entropy for ``trainer.loss``."""
    if loss_kind(cfg) == "classes":
        label_ids = label_token_ids(io, list(cfg.task.labels), cfg.task.label_prefix)
        return lambda seqs, examples, targets: io.class_loss(seqs, label_ids, [ex.label for ex in examples])
    return lambda seqs, examples, targets: io.label_loss(seqs, targets)


def trained_params(module: torch.nn.Module, receiver) -> dict:
    """A receiver-side method's ``params``: what it trains, and the frozen receiver it trains it for."""
    return {
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "receiver": sum(p.numel() for p in receiver.model.parameters() if not p.requires_grad),
    }


def trainer_config(cfg):
    """``cfg.trainer`` with the method's own learning rate (``method.lr``) when it sets one:
    a few vectors in embedding space (prompt tuning) train at ~1e-3 to 3e-2 (Lester et al.,
    2021), far above the bridge's rate."""
    lr = cfg.method.get("lr")
    return cfg.trainer if lr is None else OmegaConf.merge(cfg.trainer, {"lr": float(lr)})


def train_then_evaluate(
    cfg, ctx, train: list[Example], test: list[Example], trainable: Trainable, **details: dict
) -> MethodOutput:
    """Train ``trainable.module``'s trainable weights on ``train``, then evaluate its prompts on ``test``.

    ``details`` go to the output as they are, with ``details["training"]`` added.
    """
    io, prompts = trainable.io, trainable.prompts
    fit_items, probe = holdout(train, cfg.trainer, cfg.data.sample_seed)
    probe_prompts = trainable.probe_prompts or prompts
    targets = task_targets(io, fit_items, cfg.task)
    ce_loss = receiver_loss(io, cfg)

    def label_loss(chunk: list[Example], chunk_targets: list[list[int]]):
        ce = ce_loss(prompts(chunk), chunk, chunk_targets)
        return ce, {"loss": ce.detach()}

    loss = trainable.loss or label_loss

    def loss_fn(indices: list[int]):
        return loss([fit_items[i] for i in indices], [targets[i] for i in indices])

    def eval_probe() -> dict:
        # generation: held-out summary cross-entropy (generating every few steps costs too much on CPU)
        if cfg.task.type == "generation":
            with torch.no_grad():
                return {
                    "eval_loss": io.label_loss(probe_prompts(probe), generation_targets(io, probe, cfg.task)).item()
                }
        metrics, _, _ = evaluate_task(io, probe, probe_prompts, cfg.task, cfg.eval, desc="eval@step")
        return {"eval_accuracy": metrics["accuracy"], "eval_macro_f1": metrics["macro_f1"]}

    trainer = trainer_config(cfg)
    result = fit(
        trainable.module,
        loss_fn,
        len(fit_items),
        trainer,
        cfg.seed,
        ctx.run_dir,
        eval_fn=eval_probe,
        device=io.lm.device,
    )
    metrics, predictions, eval_s = trainable.evaluate_fn(io, test, prompts, cfg, desc="eval")
    if cfg.task.type == "classification":
        metrics.update(majority([e.label for e in train], [e.label for e in test]))
    return output(
        metrics,
        predictions,
        trainable.params,
        {"train_s": result.train_s, "eval_s": eval_s},
        **details,
        training={
            **result.as_record(),
            "loss": loss_kind(cfg),
            "lr": float(trainer.lr),
            "heldout_probe_items": len(probe),
        },
    )
