"""Hidden states of the frozen sender.

``encode`` runs the sender over formatted task prompts and returns, for each
requested ``hidden_states`` index, one ``[T_i, d]`` tensor per example (padding
removed). Blocks above the highest requested layer are skipped: a forward hook
captures each needed block output and stops the pass early.

``cached_encode`` is ``encode`` behind an on-disk cache. The sender is frozen, so
its hidden states depend only on the model, the prompt token ids and the layer:
a sweep over seeds and compression factors, or a probe over several layers,
computes them once. One safetensors file per (model, token ids, layer) holds all
examples concatenated (``data`` [sum T_i, d]), an ``offsets`` index [N + 1] and a
CRC-32 of each example's bytes (``digests`` [N]); missing layers are computed together in
one forward pass. Files are written to a temporary name and renamed, so concurrent jobs
never see half a file; a file that does not load, whose stored key differs from the
expected one, or whose bytes no longer match their checksums (changed on disk, even
without changing its size) is recomputed.

Streaming: an 8B sender's features of a full training set are tens to hundreds of GB
(SST-2 ~84 GB, AG News ~270 GB with every copy counted), more than a job's RAM. So each
batch's states are written into the cache file as soon as they are computed
(``EntryWriter``), and runs read them back example by example (``FeatureFile``); the
bridge's input statistics are one streaming pass (``bridge.set_input_stats``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from telepathy.data import Example, batches, format_prompt
from telepathy.fsutil import atomic_path, writing
from telepathy.models import LoadedModel
from telepathy.progress import progress

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
            return lm.apply_chat(prompt, tokenize=True)
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


def _encoded_batches(lm: LoadedModel, ids: list[list[int]], layers: list[int], batch_size: int, desc: str):
    """Yield ({layer: [B, T, d]}, example indices) batch by batch, in order of length so that
    little compute goes to padding."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with progress(len(ids), desc, unit="ex") as bar:
        for chunk in batches(order, batch_size):
            yield hidden_states(lm, [ids[i] for i in chunk], layers), chunk
            bar.update(len(chunk))


def encode(
    lm: LoadedModel, ids: list[list[int]], layers: list[int], batch_size: int = 16, desc: str = "sender features"
) -> dict[int, list[torch.Tensor]]:
    """All examples → {layer: [tensor [T_i, d] on CPU, in the model's dtype]}, held in RAM
    (``cache.mode=off``; with the cache on, ``cached_encode`` streams them to disk instead)."""
    out: dict[int, list] = {layer: [None] * len(ids) for layer in layers}
    for states, chunk in _encoded_batches(lm, ids, layers, batch_size, desc):
        for layer, tensor in states.items():
            for row, i in enumerate(chunk):
                out[layer][i] = tensor[row, : len(ids[i])].detach().to("cpu").clone()
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
IDENTITY_KEYS = (
    "name",
    "hub_id",
    "path",
    "gguf_package",
    "gguf_file",
    "revision",
    "random_init",
    "config_overrides",
    "init_seed",
    "trust_remote_code",
    "stand_in",
)
CACHE_VERSION = 2  # bump when the stored layout or the meaning of the features changes


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


ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


class EntryWriter:
    """Write one layer's features straight to disk, example by example, in any order.

    Every example's length is known before the sender runs (the prompt token ids), so the
    file's layout is too: a safetensors file with ``data`` [sum T_i, d] in example order and
    ``offsets`` [N + 1]. Rows go to their place with ``pwrite`` as each batch is encoded, so
    the process never holds more than one batch of features; the file is a temporary name
    (``fsutil.atomic_path``, the one writer of shared files) until ``close`` writes each
    example's CRC-32, fsyncs and renames it (concurrent jobs never see half a file).
    """

    def __init__(self, path: Path, lengths: list[int], dim: int, dtype: torch.dtype, key_text: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.row_bytes = dim * torch.empty(0, dtype=dtype).element_size()
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        data_bytes = self.offsets[-1] * self.row_bytes
        self.digests_at = data_bytes + 8 * len(self.offsets)
        self.digests = [0] * len(lengths)  # CRC-32 of each example's bytes, written by ``close``
        header = {
            "data": {"dtype": ST_DTYPES[dtype], "shape": [self.offsets[-1], dim], "data_offsets": [0, data_bytes]},
            "offsets": {
                "dtype": "I64",
                "shape": [len(self.offsets)],
                "data_offsets": [data_bytes, self.digests_at],
            },
            "digests": {
                "dtype": "I64",
                "shape": [len(lengths)],
                "data_offsets": [self.digests_at, self.digests_at + 8 * len(lengths)],
            },
            "__metadata__": {"key": key_text},
        }
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # 8-byte aligned data, as safetensors writes it
        self.start = 8 + len(text)
        self._writing = contextlib.ExitStack()  # atomic_path's block, open from here until close / abort
        self.tmp = self._writing.enter_context(atomic_path(self.path))
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._io(lambda: os.write(self.fd, len(text).to_bytes(8, "little") + text))
        self._io(lambda: os.pwrite(self.fd, np.array(self.offsets, dtype="<i8").tobytes(), self.start + data_bytes))
        self.dtype, self.dim = dtype, dim

    def _io(self, write) -> None:
        """One write of the file; on failure the temporary file goes and the error names the target
        (``fsutil.writing``: a full disk says which file)."""
        try:
            with writing(self.path):
                write()
        except BaseException:
            self.abort()
            raise

    def write(self, i: int, rows: torch.Tensor) -> None:
        """Example ``i``'s features [T_i, d]."""
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        if tuple(rows.shape) != (self.offsets[i + 1] - self.offsets[i], self.dim):
            raise ValueError(
                f"example {i}: features {tuple(rows.shape)}, expected "
                f"{(self.offsets[i + 1] - self.offsets[i], self.dim)}"
            )
        raw = (rows.view(torch.uint8) if rows.numel() else rows).numpy().tobytes()
        self.digests[i] = zlib.crc32(raw)
        self._io(lambda: os.pwrite(self.fd, raw, self.start + self.offsets[i] * self.row_bytes))

    def close(self) -> None:
        """Write the checksums and rename the file into place (atomic_path: fsync, the umask's mode)."""
        self._io(
            lambda: os.pwrite(self.fd, np.array(self.digests, dtype="<i8").tobytes(), self.start + self.digests_at)
        )
        fd, self.fd = self.fd, None
        os.close(fd)
        self._writing.close()

    def abort(self) -> None:
        """Drop the temporary file; the target is untouched (a second call does nothing)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        stop = RuntimeError("feature cache write aborted")
        with contextlib.suppress(Exception):  # cleanup on an error path: the error being raised is the one to see
            self._writing.__exit__(type(stop), stop, None)  # atomic_path removes its temporary file


class Rows(Sequence):
    """Rows ``index`` of a feature sequence, read when accessed: a subset that stays on disk."""

    def __init__(self, feats: Sequence, index: list[int]):
        self.feats, self.index = feats, list(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.feats[self.index[i]]


class FeatureFile(Sequence):
    """One layer's cached features as a sequence of [T_i, d] tensors, read from disk on demand.

    Indexing reads that example's rows with ``pread`` (no memory map: the pages stay in the
    kernel's page cache, not in the process), so a training set far larger than the job's
    RAM costs one batch of memory. The file descriptor keeps the version it opened, even if
    another job renames a fresh copy over the path.
    """

    def __init__(self, path: Path, start: int, dtype: torch.dtype, dim: int, offsets: list[int]):
        self.path, self.start, self.dtype, self.dim, self.offsets = Path(path), start, dtype, dim, offsets
        self.row_bytes = dim * torch.empty(0, dtype=dtype).element_size()
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        n = self.offsets[i + 1] - self.offsets[i]
        raw = os.pread(self._fd, n * self.row_bytes, self.start + self.offsets[i] * self.row_bytes)
        if not raw:
            return torch.empty(0, self.dim, dtype=self.dtype)
        return torch.frombuffer(bytearray(raw), dtype=self.dtype).view(n, self.dim)

    def first_mismatch(self, digests: list[int], chunk_bytes: int = 4 << 20) -> int | None:
        """The first example whose bytes do not match its CRC-32 in ``digests`` (None: all do),
        read in chunks of about ``chunk_bytes`` through this file's own descriptor (small: the
        check must not hold more of a file larger than the job's RAM than training does)."""
        n, i = len(self), 0
        while i < n:
            j = i + 1
            while j < n and (self.offsets[j + 1] - self.offsets[i]) * self.row_bytes <= chunk_bytes:
                j += 1
            base = self.offsets[i] * self.row_bytes
            size = self.offsets[j] * self.row_bytes - base
            view = memoryview(os.pread(self._fd, size, self.start + base))
            if len(view) != size:
                return i
            for k in range(i, j):
                lo, hi = self.offsets[k] * self.row_bytes - base, self.offsets[k + 1] * self.row_bytes - base
                if zlib.crc32(view[lo:hi]) != digests[k]:
                    return k
            i = j
        return None

    def __del__(self):
        with contextlib.suppress(OSError, AttributeError, TypeError):
            os.close(self._fd)


def save_entry(path: Path, states: list[torch.Tensor], key_text: str) -> None:
    """Write one layer's features atomically (``EntryWriter``).

    Two jobs writing the same key both write complete files; the last rename wins and
    either one is correct, so no lock is needed.
    """
    dim = states[0].shape[1] if states else 0
    writer = EntryWriter(
        path, [s.shape[0] for s in states], dim, states[0].dtype if states else torch.float32, key_text
    )
    try:
        for i, s in enumerate(states):
            writer.write(i, s)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def load_entry(path: Path, key_text: str, lengths: list[int]) -> FeatureFile | None:
    """One layer's features from ``path`` (read on demand), or None when absent, unreadable or not this key.

    The stored key and every example's length are checked, so a truncated file, a
    file from another model or prompt set, or a hash collision is never used; then every
    example's bytes against its CRC-32 (one pass over the file), so bytes changed on disk,
    even without changing the file's size, are recomputed rather than trained on.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key_text:
                log.warning("feature cache %s: key mismatch, recomputing", path)
                return None
            offsets = f.get_tensor("offsets")
            digests = f.get_tensor("digests").tolist()
            shape = f.get_slice("data").get_shape()
            dtype = TORCH_DTYPES.get(f.get_slice("data").get_dtype())
        with open(path, "rb") as raw:
            header_len = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_len))
        stored = (offsets[1:] - offsets[:-1]).tolist()
        if stored != list(lengths) or int(offsets[-1]) != shape[0] or dtype is None or len(shape) != 2:
            log.warning("feature cache %s: lengths do not match the prompts, recomputing", path)
            return None
        start = 8 + header_len + header["data"]["data_offsets"][0]
        found = FeatureFile(path, start, dtype, shape[1], offsets.tolist())
        bad = found.first_mismatch(digests)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        log.warning("feature cache %s unreadable (%s), recomputing", path, err)
        return None
    if bad is not None:
        log.warning(
            "feature cache %s: example %d does not match its checksum (changed on disk), recomputing", path, bad
        )
        return None
    return found


def cached_encode(
    lm: LoadedModel,
    ids: list[list[int]],
    layers: list[int],
    cache_cfg,
    model_cfg,
    batch_size: int = 16,
    desc: str = "sender features",
) -> dict[int, list[torch.Tensor]]:
    """``encode`` with the on-disk cache (``cache.mode``, ``cache.dir``).

    ``layers`` are non-negative ``hidden_states`` indices (``config.resolve_layer``).
    Layers found in the cache are opened; the rest are computed together in one pass
    and streamed into their files, one per layer, so a later run asking for any subset
    reuses them. Each layer comes back as a ``FeatureFile``: a sequence of [T_i, d]
    tensors read from disk on demand, so host memory does not grow with the training
    set. With ``cache.mode=off`` this is exactly ``encode`` (everything in RAM).
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
        _stream_to_cache(lm, ids, missing, {layer: entries[layer] for layer in missing}, batch_size, desc)
        for layer in missing:
            path, key_text = entries[layer]
            out[layer] = load_entry(path, key_text, lengths)
            if out[layer] is None:
                raise RuntimeError(f"feature cache {path}: written but not readable back")
    return {layer: out[layer] for layer in layers}


def _stream_to_cache(lm, ids, layers, entries, batch_size, desc) -> None:
    """Encode and write every example straight into its cache file, one batch in memory at a time."""
    lengths = [len(row) for row in ids]
    writers: dict[int, EntryWriter] = {}
    try:
        for states, chunk in _encoded_batches(lm, ids, layers, batch_size, desc):
            for layer, tensor in states.items():
                if layer not in writers:
                    path, key_text = entries[layer]
                    writers[layer] = EntryWriter(path, lengths, tensor.shape[-1], tensor.dtype, key_text)
                for row, i in enumerate(chunk):
                    writers[layer].write(i, tensor[row, : lengths[i]])
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for layer in layers:
        if layer not in writers:  # no examples: an empty entry
            save_entry(entries[layer][0], [], entries[layer][1])
        else:
            writers[layer].close()
