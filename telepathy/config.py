"""Configuration checks and the derived values every part of the code agrees on.

* ``validate(cfg)`` holds the checks every method shares; ``telepathy.methods.validate``
  runs them, then the method's own, before any model loads or any job is submitted. A
  bad value raises ``ConfigError`` naming the key and the allowed values. This module
  imports nothing else of telepathy (it is the leaf every other module may import).
* ``num_latents(cfg)`` is M, the number of soft tokens.
* ``run_dir(cfg)`` is the one place that says where a run's outputs live. It is a
  pure function of the resolved config, so a relaunched sweep finds its old runs.
* ``check_added_keys(cfg, overrides)``: a key added on the command line (``+key=value``) that
  no config or code reads is refused, naming the closest real key (Hydra itself suggests
  ``+trainer.lrr=1`` for a typo, and the run would take it as a no-op with a new run id).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and what is allowed."""


def group_options(group: str) -> list[str]:
    """The option names of a config group, read from ``conf/<group>/**/*.yaml``: a file in a subfolder is
    the option ``<subfolder>/<name>`` (``+phase=demo/p1_seeds``, a paper phase at the demo scale)."""
    folder = CONF_DIR / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def _fail(key: str, value, allowed) -> None:
    allowed_text = ", ".join(str(a) for a in allowed) if isinstance(allowed, (list, tuple)) else allowed
    raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed_text}")


def check_choice(cfg, key: str, allowed) -> None:
    """``cfg.<key>`` must be one of ``allowed``."""
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        _fail(key, value, allowed)


def check_range(cfg, key: str, lo=None, hi=None, integer=False) -> None:
    """``cfg.<key>`` must be a number (an integer with ``integer``) in [lo, hi] (None: unbounded)."""
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and lo is not None:
        ok = value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        _fail(key, value, kind + bounds)


# the former private names, for code written before they became public
_check_choice, _check_range = check_choice, check_range


def validate_latency(cfg) -> None:
    """The latency benchmark's own knobs (benchmarks/latency.py, conf/latency.yaml), checked
    before a job runs and, on a cluster, before anything is submitted (``sweep.plan_benchmark_job``)."""
    check_range(cfg, "iterations", lo=1, integer=True)
    check_range(cfg, "warmup_batches", lo=0, integer=True)
    check_range(cfg, "batch_size", lo=1, integer=True)
    if OmegaConf.select(cfg, "num_inputs") is not None:
        check_range(cfg, "num_inputs", lo=1, integer=True)


def resolve_layer(layer: int, num_layers: int, key: str = "sender.layer") -> int:
    """Map a Hugging Face ``hidden_states`` index (negatives allowed) to 0..num_layers.

    ``hidden_states`` has ``num_layers + 1`` entries: index 0 is the embedding
    output, index i the output of block i; -1 is the last entry.
    """
    if not isinstance(layer, int) or isinstance(layer, bool) or not -(num_layers + 1) <= layer <= num_layers:
        raise ConfigError(
            f"{key}={layer!r} is out of range for a {num_layers}-layer model; "
            f"allowed: integers in [{-(num_layers + 1)}, {num_layers}] (hidden_states indexing)"
        )
    return layer % (num_layers + 1)


def model_config(cfg, name: str) -> DictConfig:
    """The config of a role (``cfg.sender`` / ``cfg.receiver``) or of a model named by its config file.

    Single-model baselines may evaluate any model of ``conf/model/``, not only the two the
    run composes; its ``${paths.*}`` entries (cache folders) resolve against this run's paths.
    The resource estimate reads the same configs, so a named model is planned as it loads.
    """
    if name in ("sender", "receiver"):
        return cfg[name]
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(
            f"model {name!r} is not allowed; allowed: sender, receiver, {', '.join(group_options('model'))}"
        )
    paths = OmegaConf.to_container(cfg.paths, resolve=True) if "paths" in cfg else {}
    root = OmegaConf.create({"paths": paths, "model": OmegaConf.load(path)})
    return root.model


def num_latents(cfg) -> int:
    """M = ceil(max_input_tokens / compression factor), unless ``bridge.num_latents`` is set."""
    if cfg.bridge.get("num_latents"):
        return int(cfg.bridge.num_latents)
    return math.ceil(cfg.task.max_input_tokens / cfg.compression)


def models_used(cfg) -> list[str]:
    """What the method loads (``method.models``, default both roles): ``sender``, ``receiver``,
    or the name of a model config in ``conf/model/`` (single-model baselines, LLMLingua's scorer)."""
    listed = OmegaConf.select(cfg, "method.models", default=None)
    entries = [str(e) for e in (["sender", "receiver"] if listed is None else listed)]
    allowed = ["sender", "receiver", *group_options("model")]
    unknown = [e for e in entries if e not in allowed]
    if not entries or unknown:
        raise ConfigError(f"method.models={entries} is not allowed; allowed: a non-empty list of {', '.join(allowed)}")
    return entries


def uses_soft_tokens(cfg) -> bool:
    """Does the method give the receiver M soft tokens (``method.uses: [bridge]``)?

    Then ``compression`` / M are part of what the run is (its id carries ``c<factor>``,
    its record's identity has them, the memory estimate counts M receiver positions);
    for any other method they are defaults the config merely carries.
    """
    return "bridge" in list(OmegaConf.select(cfg, "method.uses", default=None) or [])


def validate(cfg: DictConfig) -> None:
    """The checks every method shares; raise ConfigError on the first bad value.

    Entry points call ``telepathy.methods.validate``, which adds the method's own checks.
    """
    check_choice(cfg, "method.name", group_options("method"))
    check_choice(cfg, "task.name", group_options("task"))
    check_choice(cfg, "task.type", ["classification", "generation"])
    for role in ("sender", "receiver"):
        check_choice(cfg, f"{role}.name", group_options("model"))
        check_choice(cfg, f"{role}.dtype", ["auto", "float32", "bfloat16", "float16"])
    check_range(cfg, "seed", lo=0, hi=2**32 - 1, integer=True)  # numpy's seed range
    check_range(cfg, "compression", lo=1, integer=True)
    check_choice(cfg, "compression_basis", ["cap", "measured"])
    resolve_layer(cfg.sender.layer, cfg.sender.num_layers)
    if cfg.bridge.get("num_latents") is not None:
        check_range(cfg, "bridge.num_latents", lo=1, integer=True)
    for key, lo in [("bridge.dim", 1), ("bridge.depth", 1), ("bridge.heads", 1)]:
        check_range(cfg, key, lo=lo, integer=True)
    if cfg.bridge.dim % cfg.bridge.heads:
        raise ConfigError(f"bridge.dim={cfg.bridge.dim} must be divisible by bridge.heads={cfg.bridge.heads}")
    check_range(cfg, "bridge.mlp_ratio", lo=0.25)
    check_range(cfg, "trainer.lr", lo=0)
    check_range(cfg, "trainer.batch_size", lo=1, integer=True)
    check_range(cfg, "trainer.grad_accum", lo=1, integer=True)
    check_range(cfg, "trainer.max_steps", lo=0, integer=True)
    check_choice(cfg, "trainer.schedule", ["cosine", "constant"])
    check_choice(cfg, "trainer.loss", ["auto", "classes", "tokens"])
    if cfg.trainer.loss == "classes" and cfg.task.type != "classification":
        raise ConfigError(
            f"trainer.loss='classes' is not allowed for task.type={cfg.task.type!r}; allowed: auto, tokens"
        )
    check_choice(cfg, "eval.readout", ["score", "generate"])
    check_range(cfg, "eval.batch_size", lo=1, integer=True)
    check_choice(cfg, "cache.mode", ["on", "off"])
    check_range(cfg, "run.heartbeat_s", lo=1)
    for key, lo, integer in (("cluster.telemetry_interval_s", 0, False), ("cluster.pack_max", 1, True)):
        if OmegaConf.select(cfg, key) is not None:  # telemetry sampling; runs per GPU when packing
            check_range(cfg, key, lo=lo, integer=integer)
    if cfg.task.type == "classification":
        labels = cfg.task.labels
        if not labels or len(set(labels)) != len(labels):
            raise ConfigError(f"task.labels must be a non-empty list of distinct verbalisers; got {labels}")
    for key in ("task.train_samples", "task.test_samples", "task.max_text_words"):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            check_range(cfg, key, lo=1, integer=True)
    overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)  # composed by Hydra: what was typed
    if overrides is not None:
        check_added_keys(cfg, overrides)


# --- keys added on the command line --------------------------------------------------

# keys the code reads that no config file sets: they are added with +key=value (or by the launcher)
ADDED_KEYS = ("rerun", "dry_run", "run.reuse_seeds", "sender.init_seed", "receiver.init_seed")
# dicts whose entries are handed on as they are (SLURM options, environment, model config fields,
# chat template arguments, the launcher's resource plan): any key is allowed under them
OPEN_DICTS = (
    "resources",
    "cluster.env",
    "cluster.additional_parameters",
    "sender.config_overrides",
    "receiver.config_overrides",
    "sender.chat_template_kwargs",
    "receiver.chat_template_kwargs",
)


def _dotted(node, prefix: str = "") -> set[str]:
    """Every key of a (nested) config as ``a.b.c``, the dicts themselves included."""
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out.add(key)
            out |= _dotted(v, key + ".")
    return out


@functools.lru_cache(maxsize=1)
def defined_keys() -> frozenset[str]:
    """Every key some file of ``conf/`` defines, at the place it lands in the composed config.

    A file's package is its group (``conf/trainer/x.yaml`` → ``trainer.*``) unless its header says
    otherwise (``# @package _global_``: the root); a defaults entry ``/model/x@_here_`` (sender,
    receiver) brings that file's keys in at the same place. Hydra's own config is left out.
    """

    def package(path: Path) -> str:
        for line in path.read_text().splitlines()[:5]:
            if line.startswith("# @package"):
                name = line.split()[-1]
                return "" if name == "_global_" else name
        return ".".join(path.relative_to(CONF_DIR).parent.parts)

    def content(path: Path) -> dict:
        data = OmegaConf.to_container(OmegaConf.load(path)) or {}
        out = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
        for entry in data.get("defaults") or []:
            if isinstance(entry, str) and entry.startswith("/") and entry.endswith("@_here_"):
                out = {**content(CONF_DIR / f"{entry[1:].removesuffix('@_here_')}.yaml"), **out}
        return out

    keys = set()
    for path in CONF_DIR.rglob("*.yaml"):
        if path.relative_to(CONF_DIR).parts[0] == "hydra":
            continue
        prefix = package(path)
        keys |= _dotted(content(path), f"{prefix}." if prefix else "")
        keys |= {".".join(prefix.split(".")[: i + 1]) for i in range(len(prefix.split(".")))} if prefix else set()
    return frozenset(keys)


def _read_by_code(key: str) -> bool:
    return key in ADDED_KEYS or any(key.startswith(open_dict + ".") for open_dict in OPEN_DICTS)


def check_added_keys(cfg, overrides) -> None:
    """Refuse ``+key=value`` (and ``++key=value``) for a key that no config or code reads.

    ``+`` adds a key the composed config does not have, so it must be one the code reads
    without a config file setting it (``ADDED_KEYS``, or an entry of ``OPEN_DICTS``);
    ``++`` may also set a key some config file defines. Config groups (``+phase=p1_seeds``)
    and Hydra's own keys are Hydra's to check. The message names the closest real key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    for override in parsed:
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or "/" in key or key.split(".")[0] == "hydra":
            continue
        if (CONF_DIR / key).is_dir() or _read_by_code(key) or (override.is_force_add() and key in defined_keys()):
            continue
        present = {k for k in _dotted(OmegaConf.to_container(cfg, resolve=False)) if k.split(".")[0] != "hydra"}
        present -= {k for k in present if k == key or k.startswith(key + ".")}  # the key this override added
        close = difflib.get_close_matches(key, sorted(present | set(ADDED_KEYS)), n=1, cutoff=0.6)
        value = override.input_line.split("=", 1)[1] if "=" in override.input_line else ""
        if close:
            hint = f"did you mean {'' if close[0] in present else '+'}{close[0]}={value}?"
        else:
            hint = f"allowed: a key of the config, or +{', +'.join(ADDED_KEYS)}"
        raise ConfigError(f"{override.input_line} is not allowed: no config or code reads {key}; {hint}")


# --- run identity -------------------------------------------------------------------


def _drop(tree: dict, dotted: str) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


def identity(cfg) -> dict:
    """The part of the resolved config that defines a run's result.

    Keys listed in ``run.id_exclude`` (output/cache paths, cluster settings, rerun
    flags, ...) do not change what a run computes, so they do not change its id.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)  # resolving it would recurse into hydra.run.dir itself
    tree = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    for key in list(cfg.run.id_exclude):
        _drop(tree, key)
    return tree


def config_hash(cfg, exclude: tuple[str, ...] = ()) -> str:
    tree = identity(cfg)
    for key in exclude:
        _drop(tree, key)
    blob = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text))


def run_name(cfg) -> str:
    """``{task}-{method}-{models}-c{factor}-s{seed}-{hash8}``: readable, and unique per config."""
    models = cfg.method.get("models") or ["sender", "receiver"]
    # a role stands for its model; single-model baselines may list a model config name itself
    model_names = "_".join(_slug(cfg[role].name if role in ("sender", "receiver") else role) for role in models)
    parts = [cfg.task.name, cfg.method.name, model_names]
    if uses_soft_tokens(cfg):
        parts.append(f"c{cfg.compression}")
    parts += [f"s{cfg.seed}", config_hash(cfg)]
    return "-".join(_slug(p) for p in parts)


def run_dir(cfg) -> Path:
    return Path(cfg.paths.output_dir).expanduser().resolve() / "runs" / run_name(cfg)


def register_resolvers() -> None:
    """``${telepathy.run_dir:}`` lets Hydra put each job's output dir where ``run_dir`` says.

    train.py registers the checked variant first (``telepathy.hydra_glue.register_resolvers``).
    """
    if not OmegaConf.has_resolver("telepathy.run_dir"):
        OmegaConf.register_new_resolver("telepathy.run_dir", lambda *, _root_: str(run_dir(_root_)))
