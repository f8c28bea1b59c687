"""Task data: one code path for the hub and for a local folder of JSON Lines files.

With ``data.root`` (or the ``TELEPATHY_DATA`` environment variable) set, split ``s``
of a task is read from ``<root>/<task.local_dir>/<s>.jsonl``, whose columns are the
hub data set's. Otherwise ``datasets.load_dataset(task.hub_id, task.hub_config)``
is used. Either way a missing split, column or label id is a clear error.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from telepathy.fsutil import read_jsonl

log = logging.getLogger(__name__)

# Splits of this process that had fewer rows than task.train_samples/test_samples asked for
# (the local XSum copy has 500 training articles where the plan asks 1000): load_task resets
# it, lifecycle.main copies it into result.json (``data_shortfall``), so it is never silent.
SHORTFALLS: list[dict] = []


class DataError(ValueError):
    """The configured data cannot be read as the task config describes it."""


@dataclass
class Example:
    idx: int  # position in the (capped) split, stable across runs with the same config
    text: str  # the raw input text (sentence, article, question)
    label: int | None = None  # class id for classification tasks
    target: str | None = None  # reference output for generation tasks
    id: str | None = None  # the data set's own id, when it has one
    extra: dict = field(default_factory=dict)


def data_root(data_cfg) -> Path | None:
    root = data_cfg.get("root") or os.environ.get("TELEPATHY_DATA")
    return Path(root).expanduser() if root else None


def local_split(task_cfg, data_cfg, split_name: str) -> Path | None:
    """``<root>/<task.local_dir>/<split_name>.jsonl`` when a data root is set (DataError if absent), else None."""
    root = data_root(data_cfg)
    if root is None:
        return None
    folder = root / task_cfg.local_dir
    path = folder / f"{split_name}.jsonl"
    if not path.exists():
        found = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.exists() else []
        raise DataError(
            f"task {task_cfg.name!r}: split {split_name!r} not found at {path} "
            f"(splits there: {found or 'none'}; data root from data.root / TELEPATHY_DATA = {root})"
        )
    return path


def _read_rows(task_cfg, data_cfg, split_name: str) -> tuple[list[dict], str]:
    path = local_split(task_cfg, data_cfg, split_name)
    if path is not None:
        return read_jsonl(path, error=DataError), str(path)
    import datasets

    try:
        ds = datasets.load_dataset(
            task_cfg.hub_id, task_cfg.get("hub_config"), split=split_name, cache_dir=data_cfg.get("hf_cache_dir")
        )
    except Exception as err:  # the hub raises many types; the user needs one message
        raise DataError(
            f"task {task_cfg.name!r}: cannot load split {split_name!r} of {task_cfg.hub_id!r} from the hub "
            f"({type(err).__name__}: {err}). Offline? Set data.root=/folder (or TELEPATHY_DATA) to a folder "
            f"with {task_cfg.local_dir}/{split_name}.jsonl, or run `python -m telepathy.prepare` where the "
            f"hub is reachable."
        ) from err
    return [dict(r) for r in ds], f"hub:{task_cfg.hub_id}/{split_name}"


def cap_words(text: str, max_words: int | None) -> tuple[str, bool]:
    """The text up to its ``max_words``-th word (whitespace-separated, formatting kept), and
    whether it was cut. ``None`` keeps the text whole (the uncapped reference)."""
    if max_words is None:
        return text, False
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_words:
        return text, False
    return text[: words[max_words - 1].end()], True


def truncated_items(examples: list[Example]) -> int:
    """How many of ``examples`` ``task.max_text_words`` cut (``cap_words``): every method records
    it as ``metrics.text_truncated_items``, so a table can say how much text its rows lost."""
    return sum(bool(ex.extra.get("text_truncated")) for ex in examples)


def load_split(task_cfg, data_cfg, split: str, cap: int | None = None, seed: int = 0) -> list[Example]:
    """Load ``split`` ("train" or "test", mapped through ``task.splits``) as Examples.

    ``cap`` keeps a seeded random subset of that many rows (the same rows for every
    run with the same data seed, so methods are compared on the same test items).
    Each text is cut at ``task.max_text_words`` words, here, once, so every method gets
    the same text: the bridge's sender, zero-shot, relay, LLMLingua, few-shot, LoRA and
    prompt tuning alike (``extra["text_truncated"]`` marks a cut text; null: uncapped).
    A sender may cut it further at ``task.max_input_tokens`` of its own tokens; that is
    recorded per run (``bridge.truncated_test_items``) and noted under the tables.
    """
    split_name = task_cfg.splits[split]
    rows, source = _read_rows(task_cfg, data_cfg, split_name)
    text_col = task_cfg.text_column
    target_col = task_cfg.get("target_column")
    label_col = task_cfg.get("label_column")
    needed = [c for c in (text_col, target_col, label_col) if c]
    if rows:
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise DataError(f"{source}: missing column(s) {missing}; columns present: {sorted(rows[0])}")
    order = list(range(len(rows)))
    if cap is not None and cap > len(rows):
        log.warning(
            "%s: asked for %d rows (task.%s_samples), it has %d: using all %d", source, cap, split, len(rows), len(rows)
        )
        SHORTFALLS.append({"split": split, "requested": int(cap), "used": len(rows), "source": str(source)})
    if cap is not None and cap < len(rows):
        random.Random(seed).shuffle(order)
        order = sorted(order[:cap])
    examples = []
    n_labels = len(task_cfg.labels) if task_cfg.type == "classification" else 0
    for i, row_idx in enumerate(order):
        row = rows[row_idx]
        label = None
        if task_cfg.type == "classification":
            label = row[label_col]
            if not isinstance(label, int) or not 0 <= label < n_labels:
                raise DataError(
                    f"{source} row {row_idx}: {label_col}={label!r} is not a label id in 0..{n_labels - 1} "
                    f"(task.labels={list(task_cfg.labels)})"
                )
        text, cut = cap_words(str(row[text_col]), task_cfg.get("max_text_words"))
        examples.append(
            Example(
                idx=i,
                text=text,
                label=label,
                target=str(row[target_col]) if target_col else None,
                id=str(row["id"]) if "id" in row else str(row_idx),
                extra={"text_truncated": True} if cut else {},
            )
        )
    if not examples:
        raise DataError(f"{source}: no rows")
    return examples


def load_task(cfg) -> tuple[list[Example], list[Example]]:
    """Train and test examples of ``cfg.task`` with the configured caps."""
    SHORTFALLS.clear()
    train = load_split(cfg.task, cfg.data, "train", cfg.task.get("train_samples"), seed=cfg.data.sample_seed)
    test = load_split(cfg.task, cfg.data, "test", cfg.task.get("test_samples"), seed=cfg.data.sample_seed)
    return train, test


def holdout(train: list[Example], trainer_cfg, seed: int) -> tuple[list[Example], list[Example]]:
    """(examples to train on, held-out probe) for the quick eval during training.

    The probe is ``trainer.eval_samples`` training items drawn with the data seed (the same
    for every run seed) and removed from training: the training curve's eval accuracy is
    then neither on test items (which would make the test set a model-selection set) nor on
    items being fitted. Without quick evals (``trainer.eval_every`` 0) nothing is held out.
    """
    n = int(trainer_cfg.eval_samples) if trainer_cfg.eval_every else 0
    if n <= 0:
        return list(train), []
    if n >= len(train):
        raise DataError(
            f"trainer.eval_samples={n} holds out every one of the {len(train)} training items; "
            f"allowed: fewer than the training items"
        )
    held = set(random.Random(seed).sample(range(len(train)), n))
    return [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]


def format_prompt(template: str, text: str) -> str:
    return template.replace("{text}", text)


def batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
