"""method=fewshot: the receiver reads k solved training examples per class, then the query.

    prompt = [demo 1: task prompt + its label] ... [demo K·k] + [task prompt of the query]
    readout: as zero-shot (label scoring or generation + strict parser)

Demonstrations are drawn for every query from the training split: ``method.shots``
per class (class-balanced, so the prompt favours no label), in a random order (so
the last demonstration, which small models copy most, is not always the same class).
The draw depends on the run's seed and the query only, so a run is reproducible and
each seed is a different sample of prompts; the result therefore varies with the
seed (not DETERMINISTIC). A pool example with the query's own text is never drawn:
the model must not be shown the answer to the question it is asked.
"""

from __future__ import annotations

import random
from collections import Counter

from telepathy.config import ConfigError, check_range
from telepathy.data import Example, format_prompt, load_task
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import check_classification, evaluate_counted, inference_result
from telepathy.prompting import PromptIO

DETERMINISTIC = False


class DemonstrationSampler:
    """Seeded, class-balanced draws of ``shots`` examples per class from a pool."""

    def __init__(self, pool: list[Example], num_labels: int, shots: int):
        self.shots = shots
        self.by_class = [[ex for ex in pool if ex.label == k] for k in range(num_labels)]
        self.text_counts = [Counter(ex.text for ex in members) for members in self.by_class]
        short = {k: len(m) for k, m in enumerate(self.by_class) if len(m) < shots}
        if short:
            raise ConfigError(
                f"method.shots={shots} needs {shots} training examples of every class; "
                f"classes with too few (class: count): {short} (raise task.train_samples)"
            )

    def draw(self, seed: int, query: Example) -> list[Example]:
        """``shots`` examples of every class, none with the query's text, in a random order."""
        rng = random.Random(f"{seed}:{query.idx}")
        demos = []
        for members, counts in zip(self.by_class, self.text_counts):
            # over-draw by the number of copies of the query in this class, then drop them
            n = min(len(members), self.shots + counts[query.text])
            picked = [ex for ex in rng.sample(members, n) if ex.text != query.text]
            if len(picked) < self.shots:
                raise ConfigError(
                    f"method.shots={self.shots}: too few training examples left once the query "
                    f"{query.id!r} is excluded (raise task.train_samples)"
                )
            demos += picked[: self.shots]
        rng.shuffle(demos)
        return demos


def demonstrations_text(demos: list[Example], task_cfg, separator: str) -> str:
    """Each demonstration as the task prompt followed by its answer, as the query will be answered."""
    labels = list(task_cfg.labels)
    return "".join(
        format_prompt(task_cfg.prompt, d.text) + task_cfg.label_prefix + labels[d.label] + separator for d in demos
    )


def validate(cfg) -> None:
    check_classification(cfg)
    check_range(cfg, "method.shots", lo=1, integer=True)


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    receiver = ctx.model("receiver")
    io = PromptIO(receiver)
    sampler = DemonstrationSampler(train, len(cfg.task.labels), cfg.method.shots)
    demos = {ex.idx: sampler.draw(cfg.seed, ex) for ex in test}

    def build(chunk):
        return [
            [
                io.frame(
                    demonstrations_text(demos[ex.idx], cfg.task, cfg.method.separator)
                    + format_prompt(cfg.task.prompt, ex.text)
                )[0]
            ]
            for ex in chunk
        ]

    metrics, rows, eval_s = evaluate_counted(io, test, build, cfg, desc=f"{cfg.method.shots}-shot")
    for row in rows:
        row["demonstrations"] = [d.id for d in demos[row["idx"]]]
    return inference_result(cfg, metrics, rows, train, test, {"receiver": receiver}, eval_s)
