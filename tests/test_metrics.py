"""telepathy.metrics: accuracy and macro-F1 as scikit-learn computes them, without importing it per run."""

import random

import pytest
from sklearn.metrics import accuracy_score, f1_score

from telepathy.metrics import classification


def _cases():
    rng = random.Random(0)
    for _ in range(60):
        k = rng.randint(2, 6)
        n = rng.randint(1, 30)
        labels = [rng.randrange(k - 1) for _ in range(n)]  # the last class is never a true label
        preds = [rng.choice([*range(k), -1]) for _ in range(n)]  # -1: an unparseable answer
        yield labels, preds, k
    yield [0, 0, 1], [0, 0, 0], 2  # one class never predicted
    yield [0, 1], [1, 0], 4  # two classes neither present nor predicted
    yield [1, 1], [-1, -1], 2  # nothing parseable


@pytest.mark.parametrize("labels, preds, k", list(_cases()))
def test_accuracy_and_macro_f1_match_scikit_learn(labels, preds, k):
    got = classification(labels, preds, k)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    macro = f1_score(labels, preds, labels=list(range(k)), average="macro", zero_division=0)
    assert got["macro_f1"] == pytest.approx(macro)
    assert got["n_test"] == len(labels)


def test_no_items_is_an_error():
    with pytest.raises(ValueError, match="no test items"):
        classification([], [], 2)


def test_the_majority_floor_is_the_test_splits_majority_rate():
    """Issue 21: scoring the training split's majority label on the test items (0.46 on SST-2) is a lower
    bar than the best constant answer on them (0.54); the floor is the latter, the former kept beside it."""
    from telepathy.metrics import majority

    out = majority(train_labels=[1] * 6 + [0] * 4, test_labels=[0] * 54 + [1] * 46)
    assert (out["majority_label"], out["majority_accuracy"]) == (0, 0.54)
    assert (out["train_majority_label"], out["train_majority_accuracy"]) == (1, 0.46)
