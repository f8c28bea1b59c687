"""Label scoring in one pass: every verbaliser scored from one encoding of the prompt, equal to one
pass per label (scores and the gradients that reach the soft tokens), for the four families the
paper uses (2-layer random models), multi-token verbalisers included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY, compose
from telepathy.prompting import PromptIO, label_token_ids

# the paper's receivers and the demo's, as budget=tiny builds them (Gemma: its own SentencePiece
# tokenizer, under which " Sci/Tech" is 3 pieces; the others the SmolLM2 stand-in's BPE)
FAMILIES = ["gemma3_270m", "smollm2_135m", "mistral7b", "qwen25_15b"]
LABELS = ["world", "sports", "Sci/Tech", "human being", "abbreviation or acronym"]  # 1, 1, 3, 2, 3+ tokens


@pytest.fixture(scope="module", params=FAMILIES)
def receiver(request):
    from telepathy.models import load_model

    return load_model(compose(*TINY, f"receiver={request.param}").receiver)


class DecoderCalls:
    """Counts the receiver body's forward passes (each one encodes or continues a batch)."""

    def __init__(self, io: PromptIO):
        self.n = 0
        self.handle = io.model.get_decoder().register_forward_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _prefixes(io: PromptIO, soft: torch.Tensor) -> list[list]:
    """Two prompts of different lengths around soft tokens: right padding inside the batch."""
    return [
        ["Article:", soft[0], "\nTopic:"],
        ["Article: a much longer framing text before the soft tokens,", soft[1], "\nTopic (pick one):"],
    ]


def test_one_pass_scores_and_gradients_equal_one_pass_per_label(receiver):
    io = PromptIO(receiver)
    label_ids = label_token_ids(io, LABELS)
    assert sum(len(ids) > 1 for ids in label_ids) >= 2  # multi-token verbalisers in every family
    torch.manual_seed(0)
    init = torch.randn(2, 3, receiver.hidden_size) * 0.05
    grads, scores = [], []
    for scorer in (io.label_scores, io.label_scores_per_label):
        soft = init.clone().requires_grad_()
        s = scorer(_prefixes(io, soft), label_ids)
        F.cross_entropy(s, torch.tensor([2, 4])).backward()  # the class loss, on multi-token labels
        scores.append(s.detach())
        grads.append(soft.grad)
    assert torch.allclose(scores[0], scores[1], atol=1e-5, rtol=0), (scores[0] - scores[1]).abs().max()
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=0), (grads[0] - grads[1]).abs().max()
    assert grads[0].abs().sum() > 0


def test_the_prompt_is_encoded_once_whatever_the_number_of_labels(receiver):
    # before: one receiver pass per label (6 on TREC on Mistral, whose " abbreviation" is 4 pieces)
    io = PromptIO(receiver)
    soft = torch.randn(2, 3, receiver.hidden_size) * 0.05
    with torch.no_grad():
        with DecoderCalls(io) as one_pass:
            io.label_scores(_prefixes(io, soft), label_token_ids(io, LABELS))
        with DecoderCalls(io) as single:
            io.label_scores(_prefixes(io, soft), label_token_ids(io, ["world", "sports"]))
    assert single.n == 1  # single-token verbalisers: the prompt's own pass reads them all
    assert one_pass.n == 2  # the prompt once + one continuation pass for every multi-token label at once
    with torch.no_grad(), DecoderCalls(io) as per_label:
        io.label_scores_per_label(_prefixes(io, soft), label_token_ids(io, LABELS))
    assert per_label.n == len(LABELS)


def test_a_sliding_window_shorter_than_the_prompt_falls_back_to_the_exact_path(tiny_models):
    _, receiver = tiny_models  # Gemma 3: local (sliding-window) attention layers
    io = PromptIO(receiver)
    label_ids = label_token_ids(io, LABELS)
    prefixes = [["Article: a text long enough to pass a window of eight positions\nTopic:"], ["Topic:"]]
    text_cfg = receiver.model.config.get_text_config()
    window = text_cfg.sliding_window
    try:
        text_cfg.sliding_window = 8
        assert not io._cache_continues(20)
        with torch.no_grad():
            with DecoderCalls(io) as calls:
                fallback = io.label_scores(prefixes, label_ids)
            exact = io.label_scores_per_label(prefixes, label_ids)
        assert calls.n == len(LABELS)
        assert torch.equal(fallback, exact)
    finally:
        text_cfg.sliding_window = window
