"""Data loading from the local JSON Lines folder (the hub's column names)."""

import json

import pytest
from omegaconf import OmegaConf

from helpers import compose, needs_data
from telepathy.data import DataError, epoch_order, load_split


@needs_data
@pytest.mark.parametrize("task,n_labels", [("sst2", 2), ("agnews", 4), ("trec", 6)])
def test_tasks_load_with_valid_labels(task, n_labels):
    cfg = compose(f"task={task}")
    test = load_split(cfg.task, cfg.data, "test")
    assert len(test) > 100
    assert {ex.label for ex in test} == set(range(n_labels))
    assert all(ex.text for ex in test)


@needs_data
def test_sst2_test_split_is_glue_validation():
    cfg = compose("task=sst2")
    assert len(load_split(cfg.task, cfg.data, "test")) == 872


@needs_data
def test_caps_are_seeded_and_stable():
    cfg = compose("task=trec")
    a = load_split(cfg.task, cfg.data, "train", cap=50, seed=0)
    b = load_split(cfg.task, cfg.data, "train", cap=50, seed=0)
    c = load_split(cfg.task, cfg.data, "train", cap=50, seed=1)
    assert [e.text for e in a] == [e.text for e in b] != [e.text for e in c]
    assert [e.idx for e in a] == list(range(50))


def _task(tmp_path, rows, **task):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(
        name="t",
        type="classification",
        local_dir="t",
        splits={"train": "train", "test": "test"},
        text_column="sentence",
        label_column="label",
        labels=["a", "b"],
    )
    base.update(task)
    return OmegaConf.create(base), OmegaConf.create({"root": str(tmp_path)})


def test_missing_split_is_a_clear_error(tmp_path):
    task, data = _task(tmp_path, [{"sentence": "x", "label": 0}])
    with pytest.raises(DataError, match=r"split 'test' not found .*splits there: \['train'\]"):
        load_split(task, data, "test")


def test_missing_column_is_a_clear_error(tmp_path):
    task, data = _task(tmp_path, [{"text": "x", "label": 0}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentence'\]"):
        load_split(task, data, "train")


def test_label_out_of_range_is_a_clear_error(tmp_path):
    task, data = _task(tmp_path, [{"sentence": "x", "label": 0}, {"sentence": "y", "label": 5}])
    with pytest.raises(DataError, match=r"label=5 is not a label id in 0..1"):
        load_split(task, data, "train")


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 3, 2)) == list(range(10))
