"""Evaluation shared by all methods: one prompt builder in, metrics, per-example
predictions and the seconds it took out (``evaluate``, or ``evaluate_task`` with the task and
eval sections alone). ``READOUTS`` holds one readout per ``task.type``. The time is returned beside the
metrics, not inside them: it describes the run, not the model's answers.

A method hands ``evaluate`` a function that turns a batch of test
examples into prompt *sequences* for the model (see ``telepathy.prompting``); the
readout (label scoring or generation + strict parser) is the configured one, so
every method is scored the same way on the same items.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from telepathy.data import Example, batches, truncated_items
from telepathy.metrics import classification, rouge_scores, rouge_summary
from telepathy.progress import progress
from telepathy.prompting import PromptIO, label_token_ids, parse_label


def evaluate_task(
    io: PromptIO,
    examples: list[Example],
    build: Callable[[list[Example]], list[list]],
    task_cfg,
    eval_cfg,
    desc: str = "eval",
) -> tuple[dict, list[dict], float]:
    """Answer every one of ``examples`` with the readout of ``task_cfg.type`` (``READOUTS``)
    and score the answers; returns (metrics, prediction rows, seconds)."""
    answer, score = READOUTS[task_cfg.type](io, task_cfg, eval_cfg)
    rows = []
    t0 = time.time()
    with torch.no_grad(), progress(len(examples), desc, unit="ex") as bar:
        for chunk in batches(examples, eval_cfg.batch_size):
            rows += answer(chunk, build(chunk))
            bar.update(len(chunk))
    return score(rows), rows, time.time() - t0


def classification_readout(io: PromptIO, task_cfg, eval_cfg):
    """Label scoring (``eval.readout=score``: the most likely label wins) or generation read
    by a strict parser (``generate``); scored by accuracy and macro-F1."""
    labels = list(task_cfg.labels)
    label_ids = label_token_ids(io, labels, task_cfg.label_prefix)

    def answer(chunk: list[Example], seqs: list[list]) -> list[dict]:
        if eval_cfg.readout == "score":
            return score_rows(chunk, io.score_labels(seqs, label_ids))
        outputs = io.generate(seqs, max_new_tokens=eval_cfg.max_new_tokens)
        return [prediction_row(ex, parse_label(text, labels), output=text) for ex, text in zip(chunk, outputs)]

    def score(rows: list[dict]) -> dict:
        metrics = classification([r["label"] for r in rows], [r["pred"] for r in rows], len(labels))
        if eval_cfg.readout == "generate":
            metrics["unparseable"] = sum(r["pred"] == -1 for r in rows)
        return metrics

    return answer, score


def prediction_row(ex: Example, pred: int, **extra) -> dict:
    """One classification prediction as predictions.jsonl holds it (``extra``: scores, output, ...)."""
    return {"idx": ex.idx, "id": ex.id, "label": ex.label, "pred": pred, "correct": pred == ex.label, **extra}


def score_rows(examples: list[Example], scores: torch.Tensor) -> list[dict]:
    """Prediction rows of a score readout: ``scores`` [N, K] (one column per label id), argmax wins.

    Every classifier that scores labels (the receiver's log-likelihoods, a linear probe's
    log-probabilities) writes its predictions through here, so the rows look the same.
    """
    scores = scores.float().cpu()
    preds = scores.argmax(-1).tolist()
    return [
        prediction_row(ex, pred, scores=[round(v, 4) for v in s])
        for ex, pred, s in zip(examples, preds, scores.tolist())
    ]


def summary_text(output: str, first_line: bool = True) -> str:
    """The summary a generation is scored as: its first non-empty line when ``first_line``
    (a base model that has written its one sentence tends to go on with a new article)."""
    text = output.strip()
    return text.split("\n")[0].strip() if first_line else text


def generation_readout(io: PromptIO, task_cfg, eval_cfg):
    """Generate an output for each example and score it against ``example.target`` with
    ROUGE-1/2/L F1.

    Decoding follows ``eval_cfg.generation`` (greedy by default; ``max_new_tokens`` null
    means ``task_cfg.max_target_tokens``). Metrics: mean ROUGE with 95% bootstrap CIs over
    items, ``n_test``, output length in tokens (mean, median) and ``empty_outputs``.
    """
    gen = eval_cfg.generation
    max_new = gen.get("max_new_tokens") or task_cfg.max_target_tokens

    def answer(chunk: list[Example], seqs: list[list]) -> list[dict]:
        outputs = io.generate(
            seqs, max_new_tokens=max_new, num_beams=gen.num_beams, repetition_penalty=gen.repetition_penalty
        )
        rows = []
        for ex, raw in zip(chunk, outputs):
            text = summary_text(raw, gen.get("first_line", True))
            tokens = len(io.tok(text, add_special_tokens=False).input_ids)
            rows.append(
                {
                    "idx": ex.idx,
                    "id": ex.id,
                    "reference": ex.target,
                    "output": text,
                    "raw_output": raw,
                    "output_tokens": tokens,
                }
            )
        return rows

    def score(rows: list[dict]) -> dict:
        per_item = rouge_scores([r["reference"] for r in rows], [r["output"] for r in rows])
        for row, scores in zip(rows, per_item):
            row.update({k: round(v, 4) for k, v in scores.items()})
        lengths = [r["output_tokens"] for r in rows]
        metrics = rouge_summary(per_item)
        metrics.update(
            n_test=len(rows),
            mean_output_tokens=statistics.mean(lengths),
            median_output_tokens=statistics.median(lengths),
            empty_outputs=lengths.count(0),
        )
        return metrics

    return answer, score


READOUTS = {"classification": classification_readout, "generation": generation_readout}
"""``task.type`` -> readout: a function of (io, task_cfg, eval_cfg) that returns ``answer(chunk,
sequences) -> prediction rows`` and ``score(rows) -> metrics`` (it may add per-item scores to the rows)."""


def text_prompt(io: PromptIO, template: str) -> Callable[[list[Example]], list[list]]:
    """Builder for a model that reads the task text itself (zero-shot readers)."""
    from telepathy.data import format_prompt

    def build(chunk: list[Example]) -> list[list]:
        return [[io.frame(format_prompt(template, ex.text))[0]] for ex in chunk]

    return build


def evaluate(
    io: PromptIO, examples: list[Example], build: Callable[[list[Example]], list[list]], cfg, desc: str = "eval"
) -> tuple[dict, list[dict], float]:
    """The task type's evaluation: label accuracy, or generated text scored with ROUGE;
    returns (metrics, prediction rows, seconds)."""
    metrics, rows, seconds = evaluate_task(io, examples, build, cfg.task, cfg.eval, desc=desc)
    metrics["text_truncated_items"] = truncated_items(examples)
    return metrics, rows, seconds
