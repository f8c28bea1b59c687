"""Hidden states of the frozen sender.

``encode`` runs the sender over formatted task prompts and returns, for each
requested ``hidden_states`` index, one ``[T_i, d]`` tensor per example (padding
removed). Blocks above the highest requested layer are skipped: a forward hook
captures each needed block output and stops the pass early.

``cached_encode`` is ``encode`` behind an on-disk cache. The sender is frozen, so
its hidden states depend only on the model, the prompt token ids and the layer:
a sweep over seeds and compression factors, or a probe over several layers,
computes them once. One safetensors file per (model, token ids, layer) holds all
examples concatenated (``data`` [sum T_i, d]) and an ``offsets`` index [N + 1];
missing layers are computed together in one forward pass. Files are written to a
temporary name and renamed, so concurrent jobs never see half a file; a file that
does not load or whose stored key differs from the expected one is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from telepathy.data import Example, batches, format_prompt
from telepathy.models import LoadedModel

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class SenderInputs:
    """Each example's sender prompt ids, how many tokens of its text are in it, and whether
    the text was cut (the measured side of compression: text tokens read per soft token)."""

    ids: list[list[int]]
    text_tokens: list[int]
    truncated: list[bool]


def sender_inputs(lm: LoadedModel, examples: list[Example], template: str, max_tokens: int) -> SenderInputs:
    """Token ids of each example's sender prompt, with at most ``max_tokens`` tokens of text.

    The cap is on the text, not on the rendered prompt: a chat template or a long
    instruction does not eat the text's budget, so senders with and without a template
    read the same text (the task's word cap, ``task.max_text_words``, normally cuts
    first; this one is the token bound M is computed from). Long inputs are cut inside
    the text, so the instruction after it (for example ``Sentiment (positive or
    negative):``) survives. ``text_tokens`` counts the text's own tokens in the prompt.
    """
    tok = lm.tokenizer

    def render(text: str) -> list[int]:
        prompt = format_prompt(template, text)
        if lm.chat_template:
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
        return tok(prompt).input_ids

    out = SenderInputs([], [], [])
    for ex in examples:
        text_ids = tok(ex.text, add_special_tokens=False).input_ids
        cut = len(text_ids) > max_tokens
        out.ids.append(render(tok.decode(text_ids[:max_tokens]) if cut else ex.text))
        out.text_tokens.append(min(len(text_ids), max_tokens))
        out.truncated.append(cut)
    return out


def sender_prompts(lm: LoadedModel, examples: list[Example], template: str, max_tokens: int) -> list[list[int]]:
    """``sender_inputs(...).ids``: the prompts alone."""
    return sender_inputs(lm, examples, template, max_tokens).ids


def _decoder_parts(model):
    decoder = model.get_decoder()
    return decoder.embed_tokens, list(decoder.layers), decoder.norm


@torch.no_grad()
def hidden_states(lm: LoadedModel, ids: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """One padded batch → {layer: [B, T, d]} for non-negative ``hidden_states`` indices."""
    embed, blocks, norm = _decoder_parts(lm.model)
    n = len(blocks)
    captured: dict[int, torch.Tensor] = {}
    hooks = []

    def capture(index: int, stop: bool):
        def hook(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _StopForward

        return hook

    top = max(layers)
    for layer in layers:
        module = embed if layer == 0 else (norm if layer == n else blocks[layer - 1])
        hooks.append(module.register_forward_hook(capture(layer, stop=layer == top)))
    width = max(len(x) for x in ids)
    pad = lm.tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    try:
        lm.model.get_decoder()(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return {layer: captured[layer] for layer in layers}


def encode(lm: LoadedModel, ids: list[list[int]], layers: list[int], batch_size: int = 16,
           desc: str = "sender features") -> dict[int, list[torch.Tensor]]:
    """All examples → {layer: [tensor [T_i, d] on CPU, in the model's dtype]}.

    Examples are processed in order of length so that little compute goes to padding.
    """
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: dict[int, list] = {layer: [None] * len(ids) for layer in layers}
    with tqdm(total=len(ids), desc=desc, unit="ex", mininterval=5) as bar:
        for chunk in batches(order, batch_size):
            states = hidden_states(lm, [ids[i] for i in chunk], layers)
            for layer, tensor in states.items():
                for row, i in enumerate(chunk):
                    out[layer][i] = tensor[row, : len(ids[i])].detach().to("cpu").clone()
            bar.update(len(chunk))
    return out


def collate(states: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of [T_i, d] tensors → ([B, T, d], mask [B, T])."""
    width = max(s.shape[0] for s in states)
    batch = states[0].new_zeros(len(states), width, states[0].shape[1])
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for i, s in enumerate(states):
        batch[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return batch.to(device), mask.to(device)


# --- on-disk cache ------------------------------------------------------------------

# Model-config keys that decide the weights (and so the hidden states). Paths of the
# model caches are left out: the same weights in another folder give the same states.
IDENTITY_KEYS = ("name", "hub_id", "path", "gguf_package", "gguf_file", "revision", "random_init",
                 "config_overrides", "init_seed", "trust_remote_code")
CACHE_VERSION = 1  # bump when the stored layout or the meaning of the features changes


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def model_identity(lm: LoadedModel, model_cfg) -> dict:
    """What makes two sender models compute the same hidden states: weights source,
    random-init overrides, and the dtype and device kind they ran in."""
    ident = {k: _plain(model_cfg.get(k)) for k in IDENTITY_KEYS}
    ident.update(dtype=str(lm.dtype).replace("torch.", ""), device=lm.device.type, version=CACHE_VERSION)
    return ident


def ids_digest(ids: list[list[int]]) -> str:
    """sha256 of the prompt token ids (with their lengths): robust to any template or cap change."""
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    flat = np.array([t for row in ids for t in row], dtype=np.int64)
    h = hashlib.sha256(lengths.tobytes())
    h.update(flat.tobytes())
    return h.hexdigest()


def cache_key(identity: dict, digest: str, layer: int) -> tuple[str, str]:
    """(key text stored in the file, its sha256 used as the file name)."""
    text = json.dumps({"model": identity, "ids": digest, "layer": layer}, sort_keys=True)
    return text, hashlib.sha256(text.encode()).hexdigest()


def cache_path(cache_dir, model_name: str, key_hash: str, layer: int) -> Path:
    return Path(cache_dir).expanduser() / model_name / f"L{layer}-{key_hash[:32]}.safetensors"


def save_entry(path: Path, states: list[torch.Tensor], key_text: str) -> None:
    """Write one layer's features atomically: temp file in the same folder, fsync, rename.

    Two jobs writing the same key both write complete files; the last rename wins and
    either one is correct, so no lock is needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = torch.tensor([s.shape[0] for s in states], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    data = torch.cat([s.contiguous() for s in states]) if states else torch.zeros(0)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"data": data, "offsets": offsets}, tmp, metadata={"key": key_text})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other jobs (and users of a shared scratch) read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_entry(path: Path, key_text: str, lengths: list[int]) -> list[torch.Tensor] | None:
    """One layer's features from ``path``, or None when absent, unreadable or not this key.

    The stored key and every example's length are checked, so a truncated file, a
    file from another model or prompt set, or a hash collision is never used.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key_text:
                log.warning("feature cache %s: key mismatch, recomputing", path)
                return None
            data, offsets = f.get_tensor("data"), f.get_tensor("offsets")
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        log.warning("feature cache %s unreadable (%s), recomputing", path, err)
        return None
    stored = (offsets[1:] - offsets[:-1]).tolist()
    if stored != list(lengths) or int(offsets[-1]) != data.shape[0]:
        log.warning("feature cache %s: lengths do not match the prompts, recomputing", path)
        return None
    return list(data.split(stored)) if stored else []


def cached_encode(lm: LoadedModel, ids: list[list[int]], layers: list[int], cache_cfg, model_cfg,
                  batch_size: int = 16, desc: str = "sender features") -> dict[int, list[torch.Tensor]]:
    """``encode`` with the on-disk cache (``cache.mode``, ``cache.dir``).

    ``layers`` are non-negative ``hidden_states`` indices (``config.resolve_layer``).
    Layers found in the cache are loaded; the rest are computed together in one pass
    and stored, one file per layer, so a later run asking for any subset reuses them.
    With ``cache.mode=off`` this is exactly ``encode``.
    """
    if cache_cfg is None or cache_cfg.get("mode", "on") == "off":
        return encode(lm, ids, layers, batch_size=batch_size, desc=desc)
    identity, digest = model_identity(lm, model_cfg), ids_digest(ids)
    lengths = [len(row) for row in ids]
    out: dict[int, list[torch.Tensor]] = {}
    entries = {}
    for layer in layers:
        key_text, key_hash = cache_key(identity, digest, layer)
        path = cache_path(cache_cfg.dir, lm.name, key_hash, layer)
        entries[layer] = (path, key_text)
        found = load_entry(path, key_text, lengths)
        if found is not None:
            out[layer] = found
    missing = [layer for layer in layers if layer not in out]
    if out:
        log.info("%s: layers %s from the feature cache", desc, sorted(out))
    if missing:
        computed = encode(lm, ids, missing, batch_size=batch_size, desc=desc)
        for layer in missing:
            path, key_text = entries[layer]
            save_entry(path, computed[layer], key_text)
            out[layer] = computed[layer]
    return {layer: out[layer] for layer in layers}
