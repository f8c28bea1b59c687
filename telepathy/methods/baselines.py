"""What the inference-only baselines share: which model a ``method.model`` names, how many
tokens the reading model saw, and the result they return.

The baselines build prompts for frozen models and hand them to the shared evaluation
(``telepathy.evaluation.evaluate``, which dispatches on the task type),
so they are scored like the bridge: same test items, same verbalisers, same readout.
"""

from __future__ import annotations

import statistics

import torch

from telepathy.config import ConfigError, check_choice, group_options
from telepathy.evaluation import evaluate
from telepathy.methods import MethodOutput, output
from telepathy.metrics import majority
from telepathy.models import LoadedModel
from telepathy.prompting import PromptIO

ROLES = ("sender", "receiver")


def check_model_choice(cfg, key: str) -> None:
    """``key`` must name a role of the run or a model config (``conf/model/<name>.yaml``)."""
    check_choice(cfg, key, [*ROLES, *group_options("model")])


def check_classification(cfg) -> None:
    """For baselines that only make sense with a label set."""
    if cfg.task.type != "classification":
        raise ConfigError(
            f"method={cfg.method.name} needs a classification task; "
            f"task={cfg.task.name} has task.type={cfg.task.type!r}"
        )


def prompt_tokens(io: PromptIO, sequence: list) -> int:
    """Positions the model reads for one prompt sequence, its BOS / chat framing included."""
    n = len(io.prefix_ids)
    for part in sequence:
        if isinstance(part, torch.Tensor):
            n += part.shape[0]
        else:
            n += len(io.ids(part) if isinstance(part, str) else part)
    return n


def evaluate_counted(io: PromptIO, examples, build, cfg, desc: str = "eval") -> tuple[dict, list[dict], float]:
    """The task's evaluation (label readout, or ROUGE for generation), plus what the model read:
    ``receiver_tokens`` on every prediction row and ``receiver_tokens_mean`` in the metrics.

    Counting inside the builder measures exactly the sequences that were scored.
    """
    counts = {}

    def counting_build(chunk):
        sequences = build(chunk)
        for ex, seq in zip(chunk, sequences):
            counts[ex.idx] = prompt_tokens(io, seq)
        return sequences

    metrics, rows, eval_s = evaluate(io, examples, counting_build, cfg, desc=desc)
    for row in rows:
        row["receiver_tokens"] = counts[row["idx"]]
    metrics["receiver_tokens_mean"] = statistics.mean(counts.values())
    return metrics, rows, eval_s


def inference_result(
    cfg, metrics: dict, rows: list[dict], train, test, models: dict[str, LoadedModel], eval_s: float, **details: dict
) -> MethodOutput:
    """A baseline's run output: nothing trained (0 parameters, 0 s), the majority baseline
    beside classification metrics, and the size of each model it read with."""
    if cfg.task.type == "classification":
        metrics.update(majority([e.label for e in train], [e.label for e in test]))
    params = {"trainable": 0, **{name: lm.num_params() for name, lm in models.items()}}
    return output(metrics, rows, params, {"train_s": 0.0, "eval_s": eval_s}, **details)
