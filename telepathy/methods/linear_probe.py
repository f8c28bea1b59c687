"""method=linear_probe: what one frozen model's hidden states already encode about the label.

    model (sender or receiver) reads cfg.task.prompt with the input text   (frozen, one pass)
    hidden_states at every requested layer → pooled vector per example     (last token | mean)
    per layer: standardise → logistic regression, C chosen on a held-out part of train
    reported: ``layer_<i>_accuracy`` for every layer; ``accuracy`` (and the predictions) of
              the layer with the best held-out accuracy, or of the bridge's layer

Layers (``method.layers``) are ``hidden_states`` indices (0 = embeddings, -1 = the last
block after the final norm), ``"N%"`` for that fraction of the model's real depth, or
``bridge`` for ``sender.layer`` (what the bridge reads; a receiver probe drops it). All
of them come from ONE forward pass per example through ``RunContext.sender_features``
(so the on-disk feature cache serves them), which stops after the highest layer.

Deterministic given its data: the held-out split has its own seed (``method.split_seed``,
not the run's seed), and lbfgs has no randomness, so one seed's result stands for all.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from telepathy.config import ConfigError, check_choice, resolve_layer
from telepathy.data import load_task, truncated_items
from telepathy.evaluation import score_rows
from telepathy.features import sender_inputs, sender_prompts
from telepathy.methods import MethodOutput, output
from telepathy.methods.baselines import check_classification
from telepathy.metrics import classification, majority

log = logging.getLogger(__name__)

DETERMINISTIC = True
ROLES = ("sender", "receiver")
FEATURE_CHUNK = 2048  # examples whose token-level hidden states are held at once (see pooled_features)


def resolve_layers(spec, num_layers: int, bridge_layer: int | None = None, key: str = "method.layers") -> list[int]:
    """``method.layers`` → sorted, distinct ``hidden_states`` indices in 0..num_layers.

    ``"N%"`` is round-half-up(N/100 · num_layers), so 25/50/75/100% of a 16-layer model are
    4/8/12/16 and of a 30-layer model 8/15/23/30. ``bridge`` is ``bridge_layer`` (None:
    dropped). An index outside the model is a ConfigError naming ``key`` and the range.
    """
    layers = set()
    for entry in spec:
        if entry == "bridge":
            if bridge_layer is not None:
                layers.add(bridge_layer)
        elif isinstance(entry, str) and entry.endswith("%"):
            try:
                percent = float(entry[:-1])
            except ValueError:
                percent = -1.0
            if not 0 <= percent <= 100:
                raise ConfigError(f"{key} entry {entry!r} is not allowed; allowed: 'N%' with N in [0, 100]")
            layers.add(int(percent / 100 * num_layers + 0.5))
        else:
            layers.add(resolve_layer(entry, num_layers, key=f"{key} entry"))
    if not layers:
        raise ConfigError(
            f"{key}={list(spec)} names no layer; allowed: a non-empty list of hidden_states indices, 'N%' or 'bridge'"
        )
    return sorted(layers)


def probe_layers(cfg, num_layers: int) -> list[int]:
    """The run's layers for a model with ``num_layers`` blocks (the bridge's layer for a sender probe)."""
    role = cfg.method.model
    bridge_layer = resolve_layer(cfg.sender.layer, num_layers) if role == "sender" else None
    return resolve_layers(list(cfg.method.layers), num_layers, bridge_layer)


def validate(cfg) -> None:
    """Fail before launch: unknown model role, a layer outside the model's published depth, bad knobs."""
    check_classification(cfg)
    m = cfg.method
    check_choice(cfg, "method.model", list(ROLES))
    layers = probe_layers(cfg, int(cfg[m.model].num_layers))
    check_choice(cfg, "method.report", ["validation", "bridge"])
    if m.report == "bridge" and m.model != "sender":
        raise ConfigError("method.report=bridge needs method.model=sender (the bridge reads the sender)")
    if m.report == "bridge" and resolve_layer(cfg.sender.layer, int(cfg.sender.num_layers)) not in layers:
        raise ConfigError("method.report=bridge needs 'bridge' (or sender.layer) in method.layers")
    check_choice(cfg, "method.pooling", ["last", "mean"])
    if not 0 < float(m.val_fraction) < 1:
        raise ConfigError(f"method.val_fraction={m.val_fraction!r} is not allowed; allowed: a number in (0, 1)")
    if not m.C_grid or any(float(c) <= 0 for c in m.C_grid):
        raise ConfigError(f"method.C_grid={list(m.C_grid)} is not allowed; allowed: a non-empty list of numbers > 0")


def pool(states: list[torch.Tensor], how: str) -> np.ndarray:
    """[T_i, d] per example → [N, d] float32: the last prompt token's state, or the mean over tokens."""
    rows = [s[-1] if how == "last" else s.float().mean(0) for s in states]
    return torch.stack(rows).float().numpy()


def pooled_features(
    ctx, lm, ids: list[list[int]], layers: list[int], pooling: str, split: str
) -> dict[int, np.ndarray]:
    """{layer: [N, d]} pooled features, FEATURE_CHUNK examples at a time.

    ``sender_features`` returns every token's state at every layer; pooling chunk by chunk
    keeps host memory bounded on full training sets (SST-2's 67k prompts x 5 layers of an
    8B model would be ~80 GB at once). Each chunk is one forward pass with its own cache files.
    """
    pooled = {layer: [] for layer in layers}
    for start in range(0, len(ids), FEATURE_CHUNK):
        feats = ctx.sender_features(lm, ids[start : start + FEATURE_CHUNK], layers, split=split)
        for layer in layers:
            pooled[layer].append(pool(feats[layer], pooling))
    return {layer: np.concatenate(chunks) for layer, chunks in pooled.items()}


def make_probe(c: float, max_iter: int):
    """Standardise, then L2-regularised logistic regression (lbfgs: no randomness)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=0))


def fit_layer(x: np.ndarray, y: np.ndarray, fit_idx, val_idx, method_cfg) -> tuple[object, float, float]:
    """Pick C on the held-out part (ties → smaller C), then refit on all of train.

    Returns (probe, chosen C, held-out accuracy at that C).
    """
    best_c, best_acc = None, -1.0
    for c in sorted(float(c) for c in method_cfg.C_grid):
        probe = make_probe(c, method_cfg.max_iter).fit(x[fit_idx], y[fit_idx])
        acc = float((probe.predict(x[val_idx]) == y[val_idx]).mean())
        if acc > best_acc:
            best_c, best_acc = c, acc
    return make_probe(best_c, method_cfg.max_iter).fit(x, y), best_c, best_acc


def held_out_split(labels: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (seeded) split of the train indices, stratified when every class has 2+ examples."""
    index = np.arange(len(labels))
    stratify = labels if min(np.bincount(labels)[np.unique(labels)]) >= 2 else None
    fit_idx, val_idx = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    return fit_idx, val_idx


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    role = cfg.method.model
    lm = ctx.model(role)
    layers = probe_layers(cfg, lm.num_layers)
    bridge_layer = resolve_layer(cfg.sender.layer, lm.num_layers) if role == "sender" else None
    log.info("linear probe on %s (%d layers) at hidden_states %s", lm.name, lm.num_layers, layers)

    t0 = time.time()
    train_ids = sender_prompts(lm, train, cfg.task.prompt, cfg.task.max_input_tokens)
    train_x = pooled_features(ctx, lm, train_ids, layers, cfg.method.pooling, split="train")
    y = np.array([e.label for e in train])
    fit_idx, val_idx = held_out_split(y.tolist(), float(cfg.method.val_fraction), int(cfg.method.split_seed))
    probes = {}
    for layer in layers:
        probes[layer] = fit_layer(train_x[layer], y, fit_idx, val_idx, cfg.method)
        log.info("layer %d: C=%g, held-out accuracy %.3f", layer, probes[layer][1], probes[layer][2])
    train_s = time.time() - t0

    t0 = time.time()
    test_in = sender_inputs(lm, test, cfg.task.prompt, cfg.task.max_input_tokens)
    test_ids = test_in.ids
    test_x = pooled_features(ctx, lm, test_ids, layers, cfg.method.pooling, split="test")
    test_labels = [e.label for e in test]
    num_labels = len(cfg.task.labels)
    per_layer = {}
    for layer in layers:
        probe = probes[layer][0]
        # columns of predict_log_proba follow probe.classes_; scores keep one column per label id
        # (a label absent from train gets -1e9: JSON has no -inf)
        scores = np.full((len(test), num_labels), -1e9)
        scores[:, probe.classes_] = probe.predict_log_proba(test_x[layer])
        per_layer[layer] = score_rows(test, torch.from_numpy(scores).float())
    eval_s = time.time() - t0

    # the reported layer: chosen without looking at the test set (held-out accuracy, first on ties)
    if cfg.method.report == "bridge":
        reported = bridge_layer
    else:
        reported = max(layers, key=lambda layer: (probes[layer][2], -layers.index(layer)))
    rows = per_layer[reported]
    metrics = classification(test_labels, [r["pred"] for r in rows], num_labels)
    metrics.update(majority(y.tolist(), test_labels))
    metrics["reported_layer"] = reported
    metrics["text_truncated_items"] = truncated_items(test)
    for layer in layers:
        layer_metrics = classification(test_labels, [r["pred"] for r in per_layer[layer]], num_labels)
        metrics[f"layer_{layer}_accuracy"] = layer_metrics["accuracy"]
        metrics[f"layer_{layer}_macro_f1"] = layer_metrics["macro_f1"]
        metrics[f"layer_{layer}_val_accuracy"] = probes[layer][2]
        metrics[f"layer_{layer}_C"] = probes[layer][1]
    # no receiver reads anything in a sender probe; the probed model read the prompt
    tokens_read = float(np.mean([len(ids) for ids in test_ids]))
    metrics["model_tokens_mean"] = tokens_read
    metrics["receiver_tokens_mean"] = tokens_read if role == "receiver" else 0.0
    classifier = probes[reported][0][-1]
    return output(
        metrics,
        rows,
        {"trainable": int(classifier.coef_.size + classifier.intercept_.size), role: lm.num_params()},
        {"train_s": train_s, "eval_s": eval_s},
        probe={
            "model": lm.name,
            "role": role,
            "num_layers": lm.num_layers,
            "layers": layers,
            "reported_layer": reported,
            "report": cfg.method.report,
            "bridge_layer": bridge_layer,
            "pooling": cfg.method.pooling,
            # test texts the model's token cap (task.max_input_tokens) cut further, as bridge.truncated_test_items
            "truncated_test_items": sum(test_in.truncated),
            "n_fit": len(fit_idx),
            "n_val": len(val_idx),
            "method_layers": OmegaConf.to_container(cfg.method.layers, resolve=True),
        },
    )
