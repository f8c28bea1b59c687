"""method=zeroshot: one frozen model reads the task prompt itself and answers.

    model reads cfg.task.prompt with the input text (the prompt lists the label set)
    readout: label scoring (eval.readout=score) or greedy text + strict parser
             (eval.readout=generate, reports the unparseable count);
             task.type=generation (XSum): the model writes the summary, scored with ROUGE

``method.model`` picks the reader: ``receiver`` (the default: what the receiver can do
without the sender), ``sender``, or any model config name such as ``llama32_1b``. No
randomness and no training, so one seed's result stands for every seed.

``method=zeroshot_calibrated`` (``method.calibration: content_free``) is contextual calibration
(Zhao et al., 2021): the reader's label prior, its label probabilities on content-free inputs
(``method.content_free``: "N/A", "" and "[MASK]" in the task prompt, averaged), is divided out of
every item's label probabilities before the argmax. A base model that answers "positive" for
nearly every review (Gemma-3-270M on SST-2: 198 of 200) is then scored on what its label
margin separates, not on its prior: the reference a bridge has to beat.
"""

from __future__ import annotations

import torch

from telepathy.config import ConfigError, check_choice
from telepathy.data import Example, load_task
from telepathy.evaluation import text_prompt
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import check_model_choice, evaluate_counted, inference_result
from telepathy.prompting import PromptIO, label_token_ids

DETERMINISTIC = True
CALIBRATIONS = ("none", "content_free")


def validate(cfg) -> None:
    check_model_choice(cfg, "method.model")
    check_choice(cfg, "method.calibration", list(CALIBRATIONS))
    if cfg.method.calibration != "none":
        if cfg.task.type != "classification" or cfg.eval.readout != "score":
            raise ConfigError(
                f"method.calibration={cfg.method.calibration} is not allowed with task.type={cfg.task.type} and "
                f"eval.readout={cfg.eval.readout}; allowed: a classification task read by label scoring "
                f"(eval.readout=score)"
            )
        if not list(cfg.method.content_free):
            raise ConfigError("method.content_free=[] is not allowed; allowed: a non-empty list of texts")


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    lm = ctx.model(cfg.method.model)
    io = PromptIO(lm)
    build = text_prompt(io, cfg.task.prompt)
    extra = {"model": lm.name}
    if cfg.method.calibration == "content_free":
        prior = content_free_prior(io, build, cfg)
        io = CalibratedIO(lm, prior)
        extra["content_free_prior"] = [round(float(p), 6) for p in prior]
    metrics, rows, eval_s = evaluate_counted(io, test, build, cfg, desc=f"{lm.name} zero-shot")
    return inference_result(cfg, metrics, rows, train, test, {cfg.method.model: lm}, eval_s, extra=extra)


def content_free_prior(io: PromptIO, build, cfg) -> torch.Tensor:
    """[K] the reader's mean label probabilities (softmax over the K verbalisers) on the content-free texts."""
    label_ids = label_token_ids(io, list(cfg.task.labels), cfg.task.label_prefix)
    texts = [Example(idx=-1 - i, text=str(t)) for i, t in enumerate(cfg.method.content_free)]
    return io.score_labels(build(texts), label_ids).float().softmax(-1).mean(0)


class CalibratedIO(PromptIO):
    """A reader whose label scores have the content-free prior divided out: log p(label | x) over the
    label set minus log prior(label). Everything else (prompts, generation) is the plain reader's."""

    def __init__(self, lm, prior: torch.Tensor):
        super().__init__(lm)
        self.log_prior = prior.float().log()

    def score_labels(self, prefixes: list[list], label_ids: list[list[int]]) -> torch.Tensor:
        return super().score_labels(prefixes, label_ids).float().log_softmax(-1) - self.log_prior
