"""How much GPU memory a run needs, and which resources to ask SLURM for.

``estimate(cfg)`` adds up, in GB, from the config alone (nothing is loaded):

* the frozen weights of each model the method uses (``num_params`` x bytes of
  ``dtype``; ``auto`` is bfloat16 on a GPU), of the model as built: ``random_init`` models
  with ``config_overrides`` (``budget=tiny``) count their overridden shape (``built_shape``);
* what training adds: the trainable parameters (the Perceiver bridge, LoRA
  adapters, ...) with their gradients and AdamW state in float32, and the
  activations kept for backward through the receiver;
* forward activations of the models: the sender's hidden states of every layer,
  the logits over the vocabulary, one layer's transient buffers.

Sequence lengths come from ``task.max_input_tokens`` plus a fixed prompt
overhead (``resources.prompt_tokens``); the receiver of a bridge reads
``num_latents(cfg)`` soft tokens instead of the text. The sum is multiplied by
``resources.margin``. These are deliberately simple upper-bound style formulas
(see ``tests/test_resources.py`` for the numbers they give); the margin absorbs
allocator fragmentation and CUDA context.

``plan(cfg)`` turns the estimate into a SLURM request: 1 GPU when everything fits
on one ``cluster.gpu_mem_gb`` GPU, 2 GPUs (sender on ``cuda:0``, receiver and
bridge on ``cuda:1``) when only the split fits, ``ConfigError`` naming the
estimate when even that does not fit. ``method.models`` says what a method loads:
roles (``sender``, ``receiver``) or model configs named by file (``llama32_1b``),
which live on the receiver's device as in ``telepathy.methods.RunContext``. What a method adds
(back-propagation through the receiver, demonstrations in the prompt, every layer's
hidden states kept) is its config's ``memory:`` block (``conf/method/*.yaml``). Methods that load a
single model always get one GPU and the smaller ``cluster.single_model`` request.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from omegaconf import OmegaConf

from telepathy import batching
from telepathy.config import ConfigError, check_range, model_config, models_used, num_latents, uses_soft_tokens

GB = 1024**3
BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
# float32 master weight + gradient + two AdamW moments
TRAINABLE_BYTES_PER_PARAM = 16
# activation bytes kept for backward per token, per hidden unit, per layer with
# bf16 mixed precision and no recomputation (Korthikanti et al., 2022)
BACKWARD_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
# transient buffers of one forward layer (attention + MLP intermediates), per token and hidden unit
FORWARD_BYTES_PER_TOKEN_HIDDEN = 16


def _get(cfg, key: str, default=None):
    value = OmegaConf.select(cfg, key, default=default) if OmegaConf.is_config(cfg) else default
    return default if value is None else value


@dataclass(frozen=True)
class Shape:
    """What a model config builds: parameters, width, depth, vocabulary and whether the output
    head shares the input embeddings."""

    num_params: float
    hidden_size: int
    num_layers: int
    vocab_size: int
    tied: bool = False

    @property
    def body_params(self) -> float:
        """Parameters a token's forward pass multiplies by: all but the input embeddings (a lookup)
        and the output head (this code applies it only at the positions it scores or generates)."""
        return self.num_params - self.vocab_size * self.hidden_size * (1 if self.tied else 2)


def built_shape(model_cfg) -> Shape:
    """The model ``telepathy.models.load_model`` builds from ``model_cfg``, from the config alone.

    The published facts of ``conf/model`` (``num_params``, ``hidden_size``, ...), unless the model
    is built with ``random_init`` and ``config_overrides``: then its architecture is the facts with
    the overrides applied, on the stand-in tokenizer's vocabulary when there is one, and its
    parameters are counted from that shape. Why: ``budget=tiny`` builds 2 layers of width 64 of the
    paper's families, and planning those as the 8B models they borrow the family of asked SLURM
    for tens of GB of host RAM and GPU memory per rehearsal job.
    """
    over = dict(_get(model_cfg, "config_overrides", {}) or {}) if _get(model_cfg, "random_init", False) else {}
    facts = {
        "hidden_size": int(model_cfg.hidden_size),
        "num_hidden_layers": int(model_cfg.num_layers),
        "vocab_size": int(_get(model_cfg, "vocab_size", 0)),
    }
    tied = bool(over.get("tie_word_embeddings", _get(model_cfg, "tie_word_embeddings", False)))
    if not over:
        return Shape(float(model_cfg.num_params), *facts.values(), tied)
    from telepathy.models import stand_in_config

    stand_in = stand_in_config(model_cfg)
    if stand_in is not None:  # the family is built on the stand-in's tokenizer (telepathy.models._family_config)
        facts["vocab_size"] = int(stand_in.vocab_size)
    facts.update({k: int(over[k]) for k in facts if k in over})
    h, layers, vocab = facts.values()
    heads = int(over.get("num_attention_heads", _get(model_cfg, "num_attention_heads", 1)))
    kv_heads = int(over.get("num_key_value_heads", _get(model_cfg, "num_key_value_heads", heads)))
    head_dim = int(over.get("head_dim", _get(model_cfg, "head_dim", None) or h // heads))
    inter = int(over.get("intermediate_size", _get(model_cfg, "intermediate_size", 4 * h)))
    attention = h * head_dim * 2 * (heads + kv_heads)  # q, o; k, v
    if _get(model_cfg, "family") == "qwen2":
        attention += head_dim * (heads + 2 * kv_heads)  # q/k/v biases
    per_layer = attention + 3 * h * inter + 2 * h  # + gated MLP + two norms
    if _get(model_cfg, "family") == "gemma3":
        per_layer += 2 * h + 2 * head_dim  # two more norms; q/k norms
    params = vocab * h * (1 if tied else 2) + layers * per_layer + h
    return Shape(float(params), h, layers, vocab, tied)


def _weights_gb(model_cfg) -> float:
    dtype = str(_get(model_cfg, "dtype", "auto"))
    if dtype not in BYTES:
        raise ConfigError(
            f"{_get(model_cfg, 'role', 'model')}.dtype={dtype!r} is not allowed; allowed: {', '.join(BYTES)}"
        )
    return built_shape(model_cfg).num_params * BYTES[dtype] / GB


def _dtype_bytes(model_cfg) -> int:
    return BYTES[str(_get(model_cfg, "dtype", "auto"))]


def bridge_params(cfg) -> int:
    """Parameter count of the Perceiver bridge: latents, in/out projections, ``depth`` blocks
    of cross-attention + self-attention (4 d² each) + MLP (2 x mlp_ratio x d²), and the learned
    shared part of the soft tokens: with ``bridge.reference_items`` the prompt and the gain
    (M x receiver width + M), with ``bridge.centre_grad`` the offset (M x receiver width)."""
    d = int(cfg.bridge.dim)
    blocks = int(cfg.bridge.depth) * (8 + 2 * float(_get(cfg, "bridge.mlp_ratio", 4.0))) * d * d
    receiver = built_shape(cfg.receiver).hidden_size
    widths = built_shape(cfg.sender).hidden_size + receiver
    m = num_latents(cfg)
    shared = m * (receiver + 1) if _get(cfg, "bridge.reference_items", 0) else 0
    shared += m * receiver if _get(cfg, "bridge.centre_grad", False) else 0
    return int(m * d + widths * d + blocks + shared)


def _forward_activations_gb(model_cfg, batch: int, tokens: int, keep_all_layers: bool) -> float:
    """Inference peak: one layer's buffers + the logits (+ every layer's hidden states for a sender)."""
    shape, b = built_shape(model_cfg), _dtype_bytes(model_cfg)
    h, layers, vocab = shape.hidden_size, shape.num_layers, shape.vocab_size
    kept = (layers + 1) * batch * tokens * h * b if keep_all_layers else 0
    transient = batch * tokens * h * FORWARD_BYTES_PER_TOKEN_HIDDEN
    logits = batch * tokens * vocab * 4
    return (kept + transient + logits) / GB


def _backward_activations_gb(model_cfg, batch: int, tokens: int) -> float:
    """Training peak through a frozen model: every layer's saved activations + fp32 logits and their grad."""
    shape = built_shape(model_cfg)
    h, layers, vocab = shape.hidden_size, shape.num_layers, shape.vocab_size
    saved = layers * batch * tokens * h * BACKWARD_BYTES_PER_TOKEN_HIDDEN_LAYER
    logits = 2 * batch * tokens * vocab * 4
    return (saved + logits) / GB


@dataclass(frozen=True)
class Estimate:
    """GPU memory in GB, before the margin, per part; ``*_device_gb`` include the margin."""

    sender_gb: float
    receiver_gb: float
    bridge_gb: float
    sender_activations_gb: float
    receiver_activations_gb: float
    margin: float

    @property
    def activations_gb(self) -> float:
        return self.sender_activations_gb + self.receiver_activations_gb

    @property
    def total_gb(self) -> float:
        """Everything on one device, with the margin."""
        return self.margin * (self.sender_gb + self.receiver_gb + self.bridge_gb + self.activations_gb)

    @property
    def sender_device_gb(self) -> float:
        """The first device of a 2-GPU split: the sender and its activations."""
        return self.margin * (self.sender_gb + self.sender_activations_gb)

    @property
    def receiver_device_gb(self) -> float:
        """The second device of a 2-GPU split: receiver, bridge and their activations."""
        return self.margin * (self.receiver_gb + self.bridge_gb + self.receiver_activations_gb)

    def describe(self) -> str:
        return (
            f"{self.total_gb:.1f} GB = {self.margin:g} x (sender {self.sender_gb:.1f} + receiver "
            f"{self.receiver_gb:.1f} + bridge/trainable {self.bridge_gb:.2f} + activations "
            f"{self.activations_gb:.1f})"
        )


def generation_tokens(cfg) -> int:
    """Target tokens a generation task trains on and generates (0 for classification)."""
    if _get(cfg, "task.type", "classification") != "generation":
        return 0
    return int(_get(cfg, "eval.generation.max_new_tokens", None) or _get(cfg, "task.max_target_tokens", 0))


def estimate(cfg, per_device_batch: int | None = None) -> Estimate:
    """GPU memory of ``cfg``'s run; training activations at the per-device batch of
    ``batch_plan`` (or at ``per_device_batch``)."""
    roles = models_used(cfg)
    # what the method does to memory, from its config's ``memory:`` block (conf/method/*.yaml)
    backprop = bool(_get(cfg, "method.memory.backprop", False))
    demos_per_class = int(_get(cfg, "method.memory.demos_per_class", 0))
    keep_all_layers = bool(_get(cfg, "method.memory.keep_all_layers", False))
    overhead = int(_get(cfg, "resources.prompt_tokens", 32))
    text_tokens = int(cfg.task.max_input_tokens) + overhead
    # generation (XSum): the receiver trains on and generates up to this many target tokens
    # (eval.generation.max_new_tokens, else task.max_target_tokens), after the text or the soft tokens
    gen_tokens = generation_tokens(cfg)
    text_tokens += gen_tokens
    train_batch = per_device_batch or batch_plan(cfg)["per_device"]
    eval_batch = int(_get(cfg, "eval.batch_size", train_batch))

    sender_gb = sender_act = receiver_gb = receiver_act = 0.0
    for entry in dict.fromkeys(roles):
        model = model_config(cfg, entry)
        if entry == "sender":
            # the sender's hidden states feed the bridge / probe: every layer is kept
            sender_gb += _weights_gb(model)
            sender_act += _forward_activations_gb(
                model, max(train_batch, eval_batch), text_tokens, keep_all_layers=True
            )
            continue
        # the receiver and any named model live on the receiver's device
        receiver_gb += _weights_gb(model)
        tokens = _reader_tokens(cfg, entry, demos_per_class)
        act = _forward_activations_gb(model, eval_batch, tokens, keep_all_layers=keep_all_layers)
        if entry == "receiver" and backprop:
            act = max(act, _backward_activations_gb(model, train_batch, tokens))
        receiver_act += act
    return Estimate(sender_gb, receiver_gb, _trainable_gb(cfg), sender_act, receiver_act, _margin(cfg))


def _margin(cfg) -> float:
    margin = float(_get(cfg, "resources.margin", 1.25))
    if margin < 1:
        raise ConfigError(f"resources.margin={margin} is not allowed; allowed: a number >= 1")
    return margin


def _reader_tokens(cfg, entry: str, demos_per_class: int = 0) -> int:
    """Positions a model on the receiver's device reads per item: soft tokens instead of the text (the
    bridge), M learned tokens + the text (prompt tuning), or the text after the demonstrations."""
    overhead = int(_get(cfg, "resources.prompt_tokens", 32))
    gen_tokens = generation_tokens(cfg)
    text_tokens = int(cfg.task.max_input_tokens) + overhead + gen_tokens
    soft = uses_soft_tokens(cfg)
    if entry == "receiver" and soft and "sender" in models_used(cfg):
        return num_latents(cfg) + overhead + gen_tokens
    if entry == "receiver" and soft:
        return text_tokens + num_latents(cfg)
    n_labels = len(_get(cfg, "task.labels", []) or [None])
    return (demos_per_class * n_labels + 1) * text_tokens


def _trainable_gb(cfg) -> float:
    """What trains, with its gradients and AdamW state: the bridge, LoRA's adapters, a soft prompt."""
    out = 0.0
    if bool(_get(cfg, "method.memory.backprop", False)):
        fraction = float(_get(cfg, "method.memory.receiver_trained_fraction", 0.0))
        out += fraction * built_shape(cfg.receiver).num_params * TRAINABLE_BYTES_PER_PARAM / GB
    if uses_soft_tokens(cfg) and "sender" in models_used(cfg):
        out += bridge_params(cfg) * TRAINABLE_BYTES_PER_PARAM / GB
    elif uses_soft_tokens(cfg):  # prompt tuning: M trained receiver-sized vectors
        out += num_latents(cfg) * built_shape(cfg.receiver).hidden_size * TRAINABLE_BYTES_PER_PARAM / GB
    return out


def training_gb(cfg, per_device_batch: int, resident: list[str]) -> float:
    """GPU memory while the run trains, with the margin: the ``resident`` models' weights, what trains
    (with gradients and AdamW state) and the receiver's activations kept for backward at this batch."""
    weights = sum(_weights_gb(model_config(cfg, entry)) for entry in dict.fromkeys(resident))
    tokens = _reader_tokens(cfg, "receiver")
    act = _backward_activations_gb(cfg.receiver, per_device_batch, tokens)
    return _margin(cfg) * (weights + _trainable_gb(cfg) + act)


def batch_plan(cfg) -> dict:
    """The per-device batch the run trains with (``batching.plan``'s fields, + ``rule`` and ``training_gb``).

    A method that declares what stays on the device while it trains (``method.work.train_resident``:
    the bridge keeps the receiver, its sender is released once the features are computed; LoRA and
    prompt tuning the receiver) gets the largest split of the effective batch whose training memory
    (``training_gb``) fits one ``cluster.gpu_mem_gb`` GPU: ``rule: memory``. Otherwise (nothing
    declared, or two models resident) the plan's table by model size: ``rule: table``. Either way at most
    ``resources.max_per_device`` (the split a smaller card gets, to check a result does not depend on it).
    The effective batch never changes, so neither does the result; ``batch_by_size=off`` trains as given.
    """
    table = batching.plan(cfg)
    resident = _get(cfg, "method.work.train_resident", None)
    enabled = bool(_get(cfg, "batch_by_size.enabled", False))
    most = _get(cfg, "resources.max_per_device", None)
    if most is not None:
        check_range(cfg, "resources.max_per_device", lo=1, integer=True)
    effective = table["effective"]
    split = [d for d in range(effective, 0, -1) if effective % d == 0 and (most is None or d <= int(most))]
    if resident is None or not enabled or len(set(resident)) > 1:
        per_device = max(d for d in split if d <= table["per_device"])
        return {
            **table,
            "per_device": per_device,
            "grad_accum": effective // per_device,
            "rule": "table" if enabled else "as given",
        }
    resident = [str(r) for r in resident]
    gpu_mem = float(_get(cfg, "cluster.gpu_mem_gb", 80))
    per_device = next((d for d in split if training_gb(cfg, d, resident) <= gpu_mem), 1)
    return {
        **table,
        "per_device": per_device,
        "grad_accum": effective // per_device,
        "rule": "memory",
        "resident": resident,
        "training_gb": round(training_gb(cfg, per_device, resident), 2),
        "table_per_device": table["per_device"],
    }


def describe_batch(out: dict) -> str:
    """One line: the split and why (the dry run prints it per job)."""
    text = f"per-device {out['per_device']} x accumulation {out['grad_accum']} = {out['effective']}"
    if out.get("rule") == "memory":
        return (
            f"{text} (memory: {'+'.join(out['resident'])} + trainable + activations = {out['training_gb']:.1f} GB "
            f"with margin; the size table would give {out['table_per_device']})"
        )
    size = out["size"] or "no"
    return f"{text} ({out.get('rule', 'table')}: {size} size class, {out['column']}-model cap {out['cap']})"


# per-process host memory besides weights and features: Python, torch, transformers, tokenizers
HOST_BASE_GB = 4
# pooled probe features (float32) are copied once more by the scaler/solver
PROBE_COPIES = 2


def host_ram_gb(cfg) -> float:
    """Host RAM of the run ``cfg`` describes, in GB, from the config alone.

    * every model's weights while they load (1.2 x, a transient host copy before the GPU);
    * the sender features a run holds in memory: with the cache on they are streamed
      (``features.FeatureFile``: one batch at a time, nothing counted); with
      ``cache.mode=off`` every train and test prompt's states, twice (the list, and the
      concatenation of the input statistics), at ``task.max_input_tokens`` tokens each;
    * a linear probe's pooled features: examples x layers x hidden in float32, copied once.

    Split sizes are ``task.train_samples``/``test_samples``, or the full splits'
    ``task.split_rows`` when those are null.
    """
    roles = models_used(cfg)
    weights = sum(_weights_gb(model_config(cfg, entry)) for entry in dict.fromkeys(roles))
    rows = _get(cfg, "task.split_rows", {}) or {}
    n = sum(int(_get(cfg, f"task.{split}_samples", None) or rows.get(split, 0)) for split in ("train", "test"))
    features = 0.0
    probe = bool(_get(cfg, "method.memory.keep_all_layers", False))  # a linear probe's pooled features
    if probe:
        model = model_config(cfg, roles[0])
        layers = len(list(_get(cfg, "method.layers", [None])))
        features += PROBE_COPIES * n * layers * built_shape(model).hidden_size * 4 / GB
    reads_features = (uses_soft_tokens(cfg) and "sender" in roles) or probe
    if reads_features and str(_get(cfg, "cache.mode", "on")) == "off":
        model = model_config(cfg, "sender" if "sender" in roles else roles[0])
        hidden = built_shape(model).hidden_size
        features += 2 * n * int(cfg.task.max_input_tokens) * hidden * _dtype_bytes(model) / GB
    return 1.2 * weights + HOST_BASE_GB + features


def mem_request_gb(cfg, floor_key: str, gpus: int) -> int:
    """Host RAM to request: the estimate (``host_ram_gb``: the weights while they load, the process,
    any features kept in memory), at least ``gpus`` x the site's floor ``floor_key`` when it sets one
    (null: the estimate alone, so a ``budget=tiny`` job asks for a few GB, not a paper job's share)."""
    if OmegaConf.select(cfg, floor_key) is None:
        return math.ceil(host_ram_gb(cfg))
    check_range(cfg, floor_key, lo=1)
    return max(math.ceil(gpus * float(OmegaConf.select(cfg, floor_key))), math.ceil(host_ram_gb(cfg)))


@dataclass(frozen=True)
class Resources:
    """One job's SLURM request and where its models go."""

    gpus: int
    cpus: int
    mem_gb: int
    timeout_min: int
    placement: dict = field(default_factory=dict)
    estimate_gb: float = 0.0
    device_gb: tuple = ()
    batch: dict = field(default_factory=dict)  # the training split (batch_plan) of a method that trains

    @property
    def resource_class(self) -> tuple[int, int, int, int]:
        """Jobs with the same class share one SLURM job array."""
        return (self.gpus, self.cpus, self.mem_gb, self.timeout_min)

    @property
    def class_name(self) -> str:
        return f"{self.gpus}gpu-{self.cpus}cpu-{self.mem_gb}gb-{self.timeout_min}min"

    @property
    def gpu_hours(self) -> float:
        """GPU-hours reserved if the job runs to its time limit (an upper bound)."""
        return self.gpus * self.timeout_min / 60

    def to_dict(self) -> dict:
        out = asdict(self)
        out["device_gb"] = list(self.device_gb)
        out["estimate_gb"] = round(self.estimate_gb, 3)
        return out


def plan(cfg) -> Resources:
    """1 or 2 GPUs, CPUs, host memory and time limit for the run ``cfg`` describes."""
    est = estimate(cfg)
    roles = models_used(cfg)
    gpu_mem = float(_get(cfg, "cluster.gpu_mem_gb", 80))
    timeout_min = int(_get(cfg, "cluster.timeout_min", 240))

    split_possible = "sender" in roles and len(set(roles)) > 1
    # resources.min_gpus=2: a phase that plans sender | receiver on their own GPUs (P5)
    want_split = split_possible and int(_get(cfg, "resources.min_gpus", 1)) >= 2
    if est.total_gb <= gpu_mem and not want_split:
        gpus, placement, device_gb = 1, {role: "cuda:0" for role in roles}, (round(est.total_gb, 3),)
    elif split_possible and est.sender_device_gb <= gpu_mem and est.receiver_device_gb <= gpu_mem:
        gpus, placement = 2, {role: "cuda:0" if role == "sender" else "cuda:1" for role in roles}
        device_gb = (round(est.sender_device_gb, 3), round(est.receiver_device_gb, 3))
    else:
        split = ""
        if split_possible:
            split = (
                f" nor two (sender {est.sender_device_gb:.1f} GB on the first, receiver + bridge "
                f"{est.receiver_device_gb:.1f} GB on the second)"
            )
        at_one = estimate(cfg, per_device_batch=1)
        raise ConfigError(
            f"resources: run needs an estimated {est.describe()} of GPU memory, which does not fit one "
            f"{gpu_mem:g} GB GPU (cluster.gpu_mem_gb){split}; at per-device training batch 1 it would need "
            f"{at_one.describe()}; lower the batch_by_size caps, eval.batch_size or task.max_input_tokens, "
            f"or use bigger GPUs"
        )

    if len(set(roles)) == 1:
        cpus = int(_get(cfg, "cluster.single_model.cpus", 4))
        mem_gb = mem_request_gb(cfg, "cluster.single_model.mem_gb", 1)
    else:
        cpus = gpus * int(_get(cfg, "cluster.cpus_per_gpu", 8))
        mem_gb = mem_request_gb(cfg, "cluster.mem_gb_per_gpu", gpus)
    return Resources(
        gpus=gpus,
        cpus=cpus,
        mem_gb=mem_gb,
        timeout_min=timeout_min,
        placement=placement,
        estimate_gb=est.total_gb,
        device_gb=device_gb,
        batch=batch_plan(cfg) if trains(cfg) else {},
    )


def trains(cfg) -> bool:
    """Does the method train (a ``steps`` pass in ``method.work``)?"""
    passes = _get(cfg, "method.work.passes", None) or []
    return any(p.get("items") == "steps" for p in passes)
