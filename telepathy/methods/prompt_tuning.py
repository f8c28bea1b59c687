"""method=prompt_tuning: M trained soft-prompt vectors in the receiver's own text prompt, where the bridge's go.

    receiver reads, inside its user turn, cfg.task.prompt with the input text and M trained soft
    tokens where the bridge's go (``bridge.placement``; default: right after the primer)
    loss: cross-entropy on the label verbaliser tokens only (``PromptIO.label_loss``)
    readout: the shared evaluation (label scoring by default), on the bridge's test items

The fair counterpart of the bridge: as many soft tokens (M = ``compression.latents``, so the
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
from torch import nn

from telepathy.compression import latents
from telepathy.config import ConfigError, check_choice, check_range
from telepathy.data import format_prompt, load_task
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import check_classification, evaluate_counted
from telepathy.methods.train_then_evaluate import Trainable, train_then_evaluate, trained_params
from telepathy.models import embedding_rms_median
from telepathy.prompting import PLACEMENTS, PromptIO

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


def soft_prompt_sequences(io: PromptIO, cfg, soft: torch.Tensor, chunk) -> list[list]:
    """The receiver's sequences: the task prompt with the text, and the soft tokens where the
    bridge puts its own (``bridge.placement``, inside the user turn: after BOS and the chat
    template's header), the text right after the primer. The bridge reads ``primer [soft]
    answer prompt``; prompt tuning reads ``primer [soft] text answer prompt`` (default),
    ``[soft] primer text answer prompt`` or ``primer text answer prompt [soft]``, so a placement
    ablation moves both methods' soft tokens alike. In front of the whole sequence they would
    sit before the chat framing, a position the receiver never sees content in."""
    primer = cfg.task.receiver_primer
    sequences = []
    for ex in chunk:
        prompt = format_prompt(cfg.task.prompt, ex.text)  # starts with the primer (validate)
        template = io.soft_prompt(primer, prompt[len(primer) :], cfg.bridge.placement)
        sequences.append(io.fill(template, soft))
    return sequences


def validate(cfg) -> None:
    check_classification(cfg)
    check_choice(cfg, "bridge.placement", list(PLACEMENTS))  # its soft tokens go where the bridge's do
    if not cfg.task.prompt.startswith(cfg.task.receiver_primer):
        raise ConfigError(
            f"task.receiver_primer={cfg.task.receiver_primer!r} is not allowed with method=prompt_tuning; "
            f"allowed: a prefix of task.prompt={cfg.task.prompt!r} (the soft tokens follow the primer)"
        )
    check_choice(cfg, "method.init", list(INITS))
    check_range(cfg, "method.init_vocab_top", lo=1, integer=True)
    lr = cfg.method.get("lr")  # null: trainer.lr (train_then_evaluate.trainer_config)
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0):
        raise ConfigError(f"method.lr={lr!r} is not allowed; allowed: a number > 0 (or null: trainer.lr)")


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    receiver = ctx.model("receiver")
    io = PromptIO(receiver)
    m = latents(cfg)
    prompt = SoftPrompt(init_soft_prompt(io, m, cfg.method.init, int(cfg.method.init_vocab_top), cfg.seed))
    prompt.to(receiver.device)

    def build(chunk):
        return soft_prompt_sequences(io, cfg, prompt().to(receiver.dtype), chunk)

    trainable = Trainable(io, prompt, build, params=trained_params(prompt, receiver), evaluate_fn=evaluate_counted)
    details = {
        "num_virtual_tokens": m,
        "compression_factor": cfg.compression,
        "init": cfg.method.init,
        "placement": cfg.bridge.placement,
    }
    return train_then_evaluate(cfg, ctx, train, test, trainable, prompt_tuning=details)
