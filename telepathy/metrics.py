"""Metrics. Each takes plain lists so every method reports them the same way."""

from __future__ import annotations

from collections import Counter

from sklearn.metrics import accuracy_score, f1_score


def classification(labels: list[int], preds: list[int], num_labels: int) -> dict:
    """Accuracy and macro-F1 over all classes; an unparseable prediction (-1) counts as wrong."""
    if not labels:
        raise ValueError("no test items to score")
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)),
        "n_test": len(labels),
    }


def majority(train_labels: list[int], test_labels: list[int]) -> dict:
    """Accuracy of always predicting the most frequent training label."""
    top = Counter(train_labels).most_common(1)[0][0]
    return {"majority_label": top, "majority_accuracy": sum(y == top for y in test_labels) / len(test_labels)}
