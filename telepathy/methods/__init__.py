"""``method=<name>``: the contract every method module keeps, and which module runs which name.

A method is a module (``telepathy/bridge_recipe.py``, ``baselines/<name>.py``) that
satisfies ``Method``: a ``DETERMINISTIC`` flag, ``validate(cfg)`` for its own config keys
and ``run(cfg, ctx) -> MethodOutput``. The run lifecycle (``telepathy.app``) only talks
to methods through this contract, so it can write, reuse and report every method's
record the same way. ``validate(cfg)`` here is the one entry for config checks: the
shared ones (``telepathy.config.validate``), then the method's own. ``config.py``
imports nothing from here, so the config module stays a leaf and the recipes may use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, TypedDict

from telepathy import config as tconfig

if TYPE_CHECKING:
    from telepathy.app import RunContext

REGISTRY = {
    "bridge": "telepathy.methods.bridge",
    "zeroshot": "telepathy.methods.zeroshot",
    "fewshot": "telepathy.methods.fewshot",
    "text_relay": "telepathy.methods.text_relay",
    "llmlingua": "telepathy.methods.llmlingua",
    "ensemble": "telepathy.methods.ensemble",
    "linear_probe": "telepathy.methods.linear_probe",
    "prompt_tuning": "telepathy.methods.prompt_tuning",
    "lora": "telepathy.methods.lora",
}


class MethodOutput(TypedDict):
    """What ``run`` returns; ``telepathy.results.record`` turns it into ``result.json``.

    ``metrics``: numbers over the test items (``accuracy``, ``rouge1``, ...).
    ``predictions``: one row per test item (``predictions.jsonl``), or None.
    ``params``: parameter counts (``trainable`` and each model read).
    ``timing``: seconds the method itself measured (``train_s``, ``eval_s``, ...).
    ``details``: the method's own sections, each written as a top-level object of the
    record under its name (``bridge``, ``training``, ``probe``, ``lora``, ...): whatever
    a reader needs to know how this run differs from another method's.
    """

    metrics: dict
    predictions: list[dict] | None
    params: dict
    timing: dict
    details: dict[str, dict]


class Method(Protocol):
    """A method module. ``DETERMINISTIC``: the result is the same for every seed, so a
    completed run of another seed with the same config is reused (its whole record)."""

    DETERMINISTIC: bool

    def validate(self, cfg) -> None:
        """Raise ``ConfigError`` (key, value, allowed) for a bad ``method.*`` or other key it reads."""

    def run(self, cfg, ctx: RunContext) -> MethodOutput:
        """Load what it needs through ``ctx``, train and/or evaluate, and return its output."""


def output(metrics: dict, predictions: list[dict] | None, params: dict, timing: dict, **details: dict) -> MethodOutput:
    """A ``MethodOutput``; keyword arguments become ``details`` sections (``bridge={...}``)."""
    return MethodOutput(metrics=metrics, predictions=predictions, params=params, timing=timing, details=details)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise tconfig.ConfigError(f"method.name={name!r} is not allowed; allowed: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name])


def validate(cfg) -> None:
    """Every check a run needs before anything loads: the shared ones, the batch plan, then the method's own."""
    from telepathy import batching  # batching reads the resource plan's model facts

    tconfig.validate(cfg)
    batching.validate(cfg)
    get(cfg.method.name).validate(cfg)
