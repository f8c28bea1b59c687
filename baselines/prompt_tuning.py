"""method=prompt_tuning: M trained soft-prompt vectors before the receiver's own text prompt.

    receiver reads, inside its user turn, [M trained soft tokens] + cfg.task.prompt with the
    input text (frozen); the soft tokens sit where the bridge's do (after BOS / chat header)
    loss: cross-entropy on the label verbaliser tokens only (``PromptIO.label_loss``)
    readout: the shared evaluation (label scoring by default), on the bridge's test items

The fair counterpart of the bridge: as many soft tokens (M = ``config.num_latents``, so the
run id carries the compression factor), the same optimiser, schedule, steps and data order
(``cfg.trainer`` through ``telepathy.training.fit``, which also gives checkpoint/resume),
except the learning rate: ``method.lr`` (default 3e-3; recorded in ``training.lr``).
The difference is where the information comes from: the bridge's soft tokens are computed
from the sender's reading of the input, these are one fixed task prompt and the receiver
reads the input text itself.

Initialisation (``method.init``): ``vocab`` copies the receiver's embeddings of M tokens drawn
(seeded) from the first ``init_vocab_top`` ids, which are frequent tokens in BPE vocabularies
(Lester et al., 2021); ``random`` draws N(0, 1) rows scaled to the median RMS of the receiver's
embeddings (``models.embedding_rms_median``), as the model itself scales them.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import OmegaConf
from torch import nn

from baselines.common import check_classification, evaluate_counted
from telepathy.bridge_recipe import classification_targets
from telepathy.config import ConfigError, num_latents
from telepathy.data import format_prompt, holdout, load_task
from telepathy.evaluation import evaluate_classification
from telepathy.metrics import majority
from telepathy.models import embedding_rms_median
from telepathy.receiver import PromptIO
from telepathy.training import fit

log = logging.getLogger(__name__)

DETERMINISTIC = False
INITS = ("vocab", "random")


class SoftPrompt(nn.Module):
    """M trainable vectors in the receiver's (scaled) embedding space; the only trained weights."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embeds = nn.Parameter(init.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.embeds


def init_soft_prompt(io: PromptIO, m: int, how: str, vocab_top: int, seed: int) -> torch.Tensor:
    """[m, d] starting vectors (see the module docstring), seeded by the run's seed."""
    gen = torch.Generator().manual_seed(seed)
    if how == "vocab":
        top = min(vocab_top, io.embed_layer.weight.shape[0])
        ids = torch.randint(0, top, (m,), generator=gen)
        with torch.no_grad():  # through the embedding layer: Gemma's embed_scale applies
            return io.embed_layer(ids.to(io.embed_layer.weight.device)).float().cpu()
    d = io.embed_layer.weight.shape[1]
    return torch.randn(m, d, generator=gen) * embedding_rms_median(io.model)


def soft_prompt_sequences(io: PromptIO, template: str, soft: torch.Tensor, chunk) -> list[list]:
    """The receiver's sequences: the soft tokens where the bridge puts its own, inside the user
    turn (after BOS and the chat template's header), followed by the task prompt with the text.
    In front of the whole sequence they would sit before the chat framing, a position the
    receiver never sees content in, and the comparison with the bridge would not be like for like."""
    return [io.fill(io.soft_prompt("", format_prompt(template, ex.text), "primer_soft_prompt"), soft)
            for ex in chunk]


def trainer_config(cfg):
    """``cfg.trainer`` with the method's own learning rate (``method.lr``) when it sets one:
    a few vectors in embedding space train at ~1e-3 to 3e-2 (Lester et al., 2021), far above
    the bridge's rate."""
    lr = cfg.method.get("lr")
    return cfg.trainer if lr is None else OmegaConf.merge(cfg.trainer, {"lr": float(lr)})


def validate(cfg) -> None:
    check_classification(cfg)
    if cfg.method.init not in INITS:
        raise ConfigError(f"method.init={cfg.method.init!r} is not allowed; allowed: {', '.join(INITS)}")
    lr = cfg.method.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0):
        raise ConfigError(f"method.lr={lr!r} is not allowed; allowed: a number > 0 (or null: trainer.lr)")
    if int(cfg.method.init_vocab_top) < 1:
        raise ConfigError(f"method.init_vocab_top={cfg.method.init_vocab_top!r} is not allowed; allowed: an integer >= 1")


def train_and_evaluate(cfg, ctx, io: PromptIO, module: nn.Module, build, train, test) -> dict:
    """Train ``module``'s trainable weights on the label loss of ``build``'s prompts, then evaluate.

    Shared by the two baselines that train something on the receiver side (this one and
    ``baselines.lora``): ``build(examples)`` gives the receiver's prompt sequences, and the
    loss scores the label verbaliser tokens after them only. Training goes through ``fit``
    (cfg.trainer, seeded data order, checkpoint/resume), evaluation through the shared
    readout on all test items, with the receiver's tokens per example counted.
    """
    receiver = io.lm
    fit_items, probe = holdout(train, cfg.trainer, cfg.data.sample_seed)  # quick eval: held-out train items
    targets = classification_targets(io, fit_items, cfg.task)

    def loss_fn(indices):
        loss = io.label_loss(build([fit_items[i] for i in indices]), [targets[i] for i in indices])
        return loss, {"loss": loss.item()}

    def eval_probe():
        metrics, _ = evaluate_classification(io, probe, build, cfg.task, cfg.eval, desc="eval@step")
        return {"eval_accuracy": metrics["accuracy"], "eval_macro_f1": metrics["macro_f1"]}

    trainer = trainer_config(cfg)
    result = fit(module, loss_fn, len(fit_items), trainer, cfg.seed, ctx.run_dir, eval_fn=eval_probe,
                 device=receiver.device)
    metrics, rows = evaluate_counted(io, test, build, cfg, desc="eval")
    metrics.update(majority([e.label for e in train], [e.label for e in test]))
    eval_s = metrics.pop("eval_s")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "metrics": metrics,
        "predictions": rows,
        "params": {"trainable": trainable, "receiver": sum(p.numel() for p in receiver.model.parameters()
                                                           if not p.requires_grad)},
        "timing": {"train_s": result.train_s, "eval_s": eval_s},
        "training": {"steps": result.steps, "resumed_from": result.resumed_from,
                     "final_loss": result.final_loss, "examples_seen": result.examples_seen,
                     "heldout_probe_items": len(probe), "lr": float(trainer.lr)},
    }


def run(cfg, ctx) -> dict:
    train, test = load_task(cfg)
    receiver = ctx.model("receiver")
    io = PromptIO(receiver)
    m = num_latents(cfg)
    prompt = SoftPrompt(init_soft_prompt(io, m, cfg.method.init, int(cfg.method.init_vocab_top), cfg.seed))
    prompt.to(receiver.device)

    def build(chunk):
        return soft_prompt_sequences(io, cfg.task.prompt, prompt().to(receiver.dtype), chunk)

    out = train_and_evaluate(cfg, ctx, io, prompt, build, train, test)
    out["prompt_tuning"] = {"num_virtual_tokens": m, "compression_factor": cfg.compression, "init": cfg.method.init}
    return out
