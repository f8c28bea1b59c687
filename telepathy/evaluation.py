"""Evaluation shared by all classification methods: one prompt builder in, metrics and
per-example predictions out.

A method hands ``evaluate_classification`` a function that turns a batch of test
examples into prompt *sequences* for the model (see ``telepathy.receiver``); the
readout (label scoring or generation + strict parser) is the configured one, so
every method is scored the same way on the same items.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from telepathy.data import Example, batches
from telepathy.metrics import classification
from telepathy.receiver import PromptIO, label_token_ids, parse_label


def evaluate_classification(
    io: PromptIO,
    examples: list[Example],
    build: Callable[[list[Example]], list[list]],
    task_cfg,
    eval_cfg,
    desc: str = "eval",
) -> tuple[dict, list[dict]]:
    """Score ``examples``; returns (metrics, prediction rows)."""
    labels = list(task_cfg.labels)
    label_ids = label_token_ids(io, labels, task_cfg.label_prefix)
    rows = []
    t0 = time.time()
    with torch.no_grad(), tqdm(total=len(examples), desc=desc, unit="ex", mininterval=5) as bar:
        for chunk in batches(examples, eval_cfg.batch_size):
            seqs = build(chunk)
            if eval_cfg.readout == "score":
                scores = io.score_labels(seqs, label_ids).float().cpu()
                preds = scores.argmax(-1).tolist()
                for ex, pred, s in zip(chunk, preds, scores.tolist()):
                    rows.append({"idx": ex.idx, "id": ex.id, "label": ex.label, "pred": pred,
                                 "correct": pred == ex.label, "scores": [round(v, 4) for v in s]})
            else:
                outputs = io.generate(seqs, max_new_tokens=eval_cfg.max_new_tokens)
                for ex, text in zip(chunk, outputs):
                    pred = parse_label(text, labels)
                    rows.append({"idx": ex.idx, "id": ex.id, "label": ex.label, "pred": pred,
                                 "correct": pred == ex.label, "output": text})
            bar.update(len(chunk))
    metrics = classification([r["label"] for r in rows], [r["pred"] for r in rows], len(labels))
    if eval_cfg.readout == "generate":
        metrics["unparseable"] = sum(r["pred"] == -1 for r in rows)
    metrics["eval_s"] = time.time() - t0
    return metrics, rows


def text_prompt(io: PromptIO, template: str) -> Callable[[list[Example]], list[list]]:
    """Builder for a model that reads the task text itself (zero-shot readers)."""
    from telepathy.data import format_prompt

    def build(chunk: list[Example]) -> list[list]:
        return [[io.frame(format_prompt(template, ex.text))[0]] for ex in chunk]

    return build
