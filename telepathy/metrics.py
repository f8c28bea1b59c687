"""Metrics. Each takes plain lists so every method reports them the same way: accuracy and
macro-F1 for classification, ROUGE (mean + bootstrap CI over items) for generation."""

from __future__ import annotations

from collections import Counter


def classification(labels: list[int], preds: list[int], num_labels: int) -> dict:
    """Accuracy and macro-F1 over all ``num_labels`` classes; an unparseable prediction (-1) counts
    as wrong. A class F1 is 2·TP / (2·TP + FP + FN), 0 for a class neither present nor predicted
    (scikit-learn's ``f1_score(average="macro", labels=range(K), zero_division=0)``; the test
    compares the two). Written out because importing scikit-learn costs every run seconds."""
    if not labels:
        raise ValueError("no test items to score")
    pairs = list(zip(labels, preds))
    f1 = []
    for k in range(num_labels):
        tp = sum(y == k and p == k for y, p in pairs)
        wrong = sum((y == k) != (p == k) for y, p in pairs)  # FP + FN
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return {
        "accuracy": sum(y == p for y, p in pairs) / len(pairs),
        "macro_f1": sum(f1) / num_labels,
        "n_test": len(labels),
    }


def majority(train_labels: list[int], test_labels: list[int]) -> dict:
    """The floor a classifier must clear: ``majority_accuracy`` is the test split's majority rate (the
    best constant answer on these items), ``majority_label`` that label. ``train_majority_*``: the
    training split's most frequent label and its accuracy on the test items, a lower bar whenever
    the two splits' majorities differ (SST-2: 0.46 against 0.54)."""
    top, count = Counter(test_labels).most_common(1)[0]
    train_top = Counter(train_labels).most_common(1)[0][0]
    return {
        "majority_label": top,
        "majority_accuracy": count / len(test_labels),
        "train_majority_label": train_top,
        "train_majority_accuracy": sum(y == train_top for y in test_labels) / len(test_labels),
    }


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(references: list[str], outputs: list[str]) -> list[dict]:
    """Per-example ROUGE-1/2/L F1 (``rouge-score``, Porter stemming), as in the XSum papers.

    An empty output scores 0 against any reference; the scorer's tokenizer lowercases
    and drops punctuation, so casing and final full stops do not matter.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [{k: s.fmeasure for k, s in scorer.score(ref, out).items()} for ref, out in zip(references, outputs)]


def rouge_summary(per_item: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean ROUGE-1/2/L F1 over test items (rows of ``rouge_scores``) with a 95% percentile
    bootstrap CI over items.

    Keys: ``rouge1``, ``rouge1_ci_low``, ``rouge1_ci_high`` (and the same for rouge2, rougeL).
    The bootstrap is the one of ``telepathy.analysis`` (a single stratum of per-item scores).
    """
    from telepathy.stats import paired_bootstrap

    if not per_item:
        raise ValueError("no test items to score")
    out = {}
    for k in ROUGE_TYPES:
        mean, lo, hi = paired_bootstrap([[s[k] for s in per_item]], n_boot=n_boot, seed=seed)
        out.update({k: mean, f"{k}_ci_low": lo, f"{k}_ci_high": hi})
    return out
