"""``method=<name>``: every method, the contract each keeps, and which module runs which name.

    __init__             the contract (``Method``, ``MethodOutput``, ``output``), ``RunContext``,
                         ``REGISTRY``, ``validate(cfg)``
    train_then_evaluate  the shell of the methods that train: targets, loss, probe, ``fit``, evaluation
    bridge               method=bridge: sender states → Perceiver → soft tokens → receiver
    prompt_tuning, lora  the trained baselines
    zeroshot, fewshot, text_relay, llmlingua, ensemble, linear_probe   the inference-only baselines
    baselines            what the baselines share (model choice, counted evaluation, their output)
    llmlingua_compressor the real LLMLingua-1 compressor, offline under transformers 5

A method is a module of this package that satisfies ``Method``: a ``DETERMINISTIC`` flag,
``validate(cfg)`` for its own config keys and ``run(cfg, ctx) -> MethodOutput``; adding one is
its file, its ``conf/method/<name>.yaml`` and its line in ``REGISTRY``. The yaml also declares the
method's work (``work:``: its passes — which model reads what, on which items, with backward, label
scoring or generation — and ``train_resident``, what stays on the device while it trains): the planner
(``telepathy.cluster.costs``) costs that declaration and never the method's name, and the batch plan
(``resources.batch_plan``) sizes training from it. The run lifecycle
(``telepathy.lifecycle``) only talks to methods through this contract, so it can write, reuse
and report every method's record the same way. ``validate(cfg)`` here is the one entry for
config checks: the shared ones (``telepathy.config.validate``), then the method's own.
``config.py`` imports nothing from here, so the config module stays a leaf the methods may use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypedDict

import torch
from omegaconf import DictConfig

from telepathy import config as tconfig
from telepathy import features
from telepathy.models import LoadedModel, load_model

REGISTRY = {
    "bridge": "telepathy.methods.bridge",
    "zeroshot": "telepathy.methods.zeroshot",
    "zeroshot_calibrated": "telepathy.methods.zeroshot",
    "fewshot": "telepathy.methods.fewshot",
    "text_relay": "telepathy.methods.text_relay",
    "llmlingua": "telepathy.methods.llmlingua",
    "ensemble": "telepathy.methods.ensemble",
    "linear_probe": "telepathy.methods.linear_probe",
    "prompt_tuning": "telepathy.methods.prompt_tuning",
    "lora": "telepathy.methods.lora",
}


@dataclass
class RunContext:
    """What a method gets besides its config: the run's folder (checkpoints, step log), the
    devices ``models.placement`` chose, and models loaded once per run on their device."""

    cfg: DictConfig
    run_dir: Path
    devices: dict[str, torch.device]
    _models: dict = field(default_factory=dict)

    def model(self, role: str) -> LoadedModel:
        """``sender`` or ``receiver``, loaded once per run on its device; or any model named by its
        config (``conf/model/<name>.yaml``, e.g. ``method.model=llama32_1b``), on the receiver's device."""
        if role not in self._models:
            device = self.devices.get(role, self.devices["receiver"])
            self._models[role] = load_model(tconfig.model_config(self.cfg, role), device)
        return self._models[role]

    def release(self, role: str) -> None:
        """Drop a model the method no longer needs, so its device memory is free for what follows (the
        bridge trains with the receiver alone once the sender's features are computed)."""
        lm = self._models.pop(role, None)
        if lm is None:
            return
        device = lm.device
        del lm
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def sender_features(
        self, lm: LoadedModel, ids: list[list[int]], layer: int | list[int], split: str
    ) -> list[torch.Tensor] | dict[int, list[torch.Tensor]]:
        """The sender's ``hidden_states[layer]`` for each prompt (cached when ``cache.mode=on``).

        A list of layers returns {layer: features}, all computed in one forward pass.
        """
        layers = [layer] if isinstance(layer, int) else list(layer)
        out = features.cached_encode(
            lm,
            ids,
            layers,
            self.cfg.get("cache"),
            lm.config,
            batch_size=self.cfg.eval.batch_size,
            desc=f"sender features ({split})",
        )
        return out[layer] if isinstance(layer, int) else out


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
