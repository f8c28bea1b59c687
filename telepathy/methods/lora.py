"""method=lora: the receiver fine-tuned with LoRA adapters, reading the full text prompt.

    receiver + LoRA (peft) reads cfg.task.prompt with the input text
    loss: cross-entropy on the label verbaliser tokens only; the prompt is never a target
    readout: the shared evaluation (label scoring by default), on the bridge's test items

An upper reference for what the receiver alone can learn from the same training items,
with the same loop (``telepathy.training.fit``: cfg.trainer, seeded shuffle, checkpoint /
resume). ``load_model`` returns the receiver frozen; ``get_peft_model`` injects the adapters
into it in place, so ``PromptIO`` keeps driving the same module and only the LoRA matrices
train. Checkpoints hold those LoRA weights only (``fit`` saves trainable parameters).
"""

from __future__ import annotations

import logging

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from telepathy.config import ConfigError, check_range
from telepathy.data import load_task
from telepathy.evaluation import text_prompt
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import check_classification, evaluate_counted
from telepathy.methods.train_then_evaluate import Trainable, train_then_evaluate, trained_params
from telepathy.models import LoadedModel
from telepathy.prompting import PromptIO

log = logging.getLogger(__name__)

DETERMINISTIC = False


def validate(cfg) -> None:
    check_classification(cfg)
    m = cfg.method
    check_range(cfg, "method.r", lo=1, integer=True)
    if not float(m.alpha) > 0:
        raise ConfigError(f"method.alpha={m.alpha!r} is not allowed; allowed: a number > 0")
    if not 0 <= float(m.dropout) < 1:
        raise ConfigError(f"method.dropout={m.dropout!r} is not allowed; allowed: a number in [0, 1)")
    if not m.target_modules:
        raise ConfigError(
            "method.target_modules is empty; allowed: a non-empty list of module names "
            "(e.g. [q_proj, k_proj, v_proj, o_proj])"
        )


def add_lora(lm: LoadedModel, method_cfg, seed: int) -> torch.nn.Module:
    """Inject LoRA adapters into ``lm.model`` in place; returns the module whose trainable
    parameters are exactly the adapters (the frozen base stays frozen).

    The adapters' A matrices are drawn from ``seed`` (B starts at zero, so the model starts
    as the frozen receiver).
    """
    config = LoraConfig(
        r=int(method_cfg.r),
        lora_alpha=float(method_cfg.alpha),
        lora_dropout=float(method_cfg.dropout),
        target_modules=list(OmegaConf.to_container(method_cfg.target_modules, resolve=True)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    get_peft_model(lm.model, config)  # wraps lm.model; the adapters live inside lm.model itself
    lm.model.eval()  # new adapter modules start in train mode (dropout on); fit switches modes itself
    trainable = [name for name, p in lm.model.named_parameters() if p.requires_grad]
    not_lora = [name for name in trainable if "lora_" not in name]
    if not trainable or not_lora:
        raise RuntimeError(
            f"LoRA setup: expected only adapter weights to train; trainable non-LoRA: {not_lora[:5]}, "
            f"{len(trainable)} trainable tensors (target_modules={list(config.target_modules)})"
        )
    return lm.model


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    receiver = ctx.model("receiver")
    module = add_lora(receiver, cfg.method, cfg.seed)
    io = PromptIO(receiver)
    prompts = text_prompt(io, cfg.task.prompt)
    trainable = Trainable(io, module, prompts, params=trained_params(module, receiver), evaluate_fn=evaluate_counted)
    details = {
        "r": cfg.method.r,
        "alpha": cfg.method.alpha,
        "dropout": cfg.method.dropout,
        "target_modules": list(cfg.method.target_modules),
    }
    return train_then_evaluate(cfg, ctx, train, test, trainable, lora=details)
