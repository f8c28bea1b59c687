"""method=zeroshot: one frozen model reads the task prompt itself and answers.

    model reads cfg.task.prompt with the input text (the prompt lists the label set)
    readout: label scoring (eval.readout=score) or greedy text + strict parser
             (eval.readout=generate, reports the unparseable count);
             task.type=generation (XSum): the model writes the summary, scored with ROUGE

``method.model`` picks the reader: ``receiver`` (the default: what the receiver can do
without the sender), ``sender``, or any model config name such as ``llama32_1b``. No
randomness and no training, so one seed's result stands for every seed.
"""

from __future__ import annotations

from telepathy.data import load_task
from telepathy.evaluation import text_prompt
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import check_model_choice, evaluate_counted, inference_result
from telepathy.prompting import PromptIO

DETERMINISTIC = True


def validate(cfg) -> None:
    check_model_choice(cfg, "method.model")


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    lm = ctx.model(cfg.method.model)
    io = PromptIO(lm)
    metrics, rows, eval_s = evaluate_counted(
        io, test, text_prompt(io, cfg.task.prompt), cfg, desc=f"{lm.name} zero-shot"
    )
    return inference_result(cfg, metrics, rows, train, test, {cfg.method.model: lm}, eval_s, extra={"model": lm.name})
