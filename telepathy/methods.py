"""``method=<name>``: which module runs it.

Every method module exposes

    DETERMINISTIC: bool               # True: same result for every seed (reused across seeds)
    def run(cfg, ctx) -> dict         # returns the result fields (metrics, params, ...)
    def validate(cfg) -> None         # optional: method-specific config checks

The bridge recipe lives in ``telepathy/bridge_recipe.py``; baselines in ``baselines/``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY = {
    "bridge": "telepathy.bridge_recipe",
    "zeroshot": "baselines.zeroshot",
    "fewshot": "baselines.fewshot",
    "text_relay": "baselines.text_relay",
    "llmlingua": "baselines.llmlingua",
    "ensemble": "baselines.ensemble",
    "linear_probe": "baselines.linear_probe",
    "prompt_tuning": "baselines.prompt_tuning",
    "lora": "baselines.lora",
}


def get(name: str) -> ModuleType:
    if name not in REGISTRY:
        from telepathy.config import ConfigError

        raise ConfigError(f"method.name={name!r} is not allowed; allowed: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name])


def validator(name: str):
    return getattr(get(name), "validate", None)
