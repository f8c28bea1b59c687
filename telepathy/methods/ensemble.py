"""method=ensemble: the sender and the receiver each answer zero-shot; their label
probabilities are averaged.

    each model reads cfg.task.prompt → log-likelihood of each label verbaliser
    p_model = softmax over the labels;  p = (p_sender + p_receiver) / 2;  pred = argmax p

What two models reach by pooling their own answers, with no channel between them: a
bridge that beats it passes more than either model's vote. Label scoring only (there
are no probabilities to average in generated text). Deterministic: one seed stands for all.
"""

from __future__ import annotations

import torch

from telepathy.config import ConfigError
from telepathy.data import load_task, truncated_items
from telepathy.evaluation import prediction_row, text_prompt
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import check_classification, evaluate_counted, inference_result
from telepathy.metrics import classification
from telepathy.prompting import PromptIO

DETERMINISTIC = True
MEMBERS = ("sender", "receiver")


def validate(cfg) -> None:
    check_classification(cfg)
    if cfg.eval.readout != "score":
        raise ConfigError(
            f"eval.readout={cfg.eval.readout!r} is not allowed with method=ensemble; allowed: score "
            f"(it averages label probabilities)"
        )


def average_probabilities(scores: list[torch.Tensor]) -> torch.Tensor:
    """Mean over models of the softmax of each model's [N, K] label log-likelihoods."""
    return torch.stack([s.float().softmax(-1) for s in scores]).mean(0)


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    models = {role: ctx.model(role) for role in MEMBERS}
    metrics, member_rows, eval_s = {}, {}, 0.0
    for role, lm in models.items():
        io = PromptIO(lm)
        m, rows, seconds = evaluate_counted(io, test, text_prompt(io, cfg.task.prompt), cfg, desc=f"{role} zero-shot")
        eval_s += seconds
        metrics.update({f"{role}_accuracy": m["accuracy"], f"{role}_macro_f1": m["macro_f1"]})
        member_rows[role] = {r["idx"]: r for r in rows}

    # the label scores stored in the rows are rounded to 1e-4: far below any margin that matters
    scores = [torch.tensor([member_rows[role][ex.idx]["scores"] for ex in test]) for role in MEMBERS]
    probs = average_probabilities(scores)
    preds = probs.argmax(-1).tolist()
    rows = [
        prediction_row(
            ex,
            pred,
            scores=[round(v, 4) for v in p],
            **{f"{role}_pred": member_rows[role][ex.idx]["pred"] for role in MEMBERS},
            sender_tokens=member_rows["sender"][ex.idx]["receiver_tokens"],
            receiver_tokens=member_rows["receiver"][ex.idx]["receiver_tokens"],
        )
        for ex, pred, p in zip(test, preds, probs.tolist())
    ]
    metrics.update(classification([r["label"] for r in rows], preds, len(cfg.task.labels)))
    metrics["receiver_tokens_mean"] = sum(r["receiver_tokens"] for r in rows) / len(rows)
    metrics["sender_tokens_mean"] = sum(r["sender_tokens"] for r in rows) / len(rows)
    metrics["text_truncated_items"] = truncated_items(test)  # both members read the same capped texts
    return inference_result(cfg, metrics, rows, train, test, models, eval_s)
