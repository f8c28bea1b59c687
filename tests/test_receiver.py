"""Receiver I/O: embeddings reproduce token-id forward passes, label scoring, loss masking, parsing."""

import pytest
import torch
import torch.nn.functional as F

from telepathy.data import Example
from telepathy.features import hidden_states, sender_prompts
from telepathy.prompting import PromptIO, label_token_ids, parse_label


def reference_logprobs(lm, ids):
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    return F.log_softmax(logits, -1)


def test_label_scores_match_a_plain_forward_pass(tiny_models):
    _, receiver = tiny_models
    io = PromptIO(receiver)
    labels = label_token_ids(io, ["negative", "positive"])
    prompts = ["Review: a gorgeous film\nSentiment (positive or negative):", "Review: dull\nSentiment:"]
    scores = io.score_labels([[p] for p in prompts], labels)
    for i, p in enumerate(prompts):
        ids = io.prefix_ids + io.ids(p)
        ref = reference_logprobs(receiver, ids)[-1]
        assert torch.allclose(scores[i], ref[[l[0] for l in labels]], atol=1e-4)


def test_multi_token_scores_sum_token_logprobs(tiny_models):
    _, receiver = tiny_models
    io = PromptIO(receiver)
    labels = [io.ids(" very good"), io.ids(" bad")]
    assert len(labels[0]) > 1
    prompt = "Rating:"
    scores = io.score_labels([[prompt]], labels)
    for k, lab in enumerate(labels):
        ids = io.prefix_ids + io.ids(prompt) + lab
        ref = reference_logprobs(receiver, ids)
        start = len(ids) - len(lab)
        expected = sum(ref[start - 1 + j, t] for j, t in enumerate(lab))
        assert scores[0, k].item() == pytest.approx(expected.item(), abs=1e-3)


def test_soft_tokens_equal_to_own_embeddings_reproduce_text(tiny_models):
    """Feeding the receiver its own (scaled) embeddings as soft tokens changes nothing."""
    _, receiver = tiny_models
    io = PromptIO(receiver)
    labels = label_token_ids(io, ["negative", "positive"])
    soft = io.embed_layer(torch.tensor(io.ids(" a gorgeous film")))
    template = io.soft_prompt("Review:", "\nSentiment:")
    with_soft = io.score_labels([io.fill(template, soft)], labels)
    as_text = io.score_labels([["Review: a gorgeous film\nSentiment:"]], labels)
    assert torch.allclose(with_soft, as_text, atol=1e-4)


def test_label_loss_ignores_prompt_tokens(tiny_models):
    _, receiver = tiny_models
    io = PromptIO(receiver)
    gold = io.ids(" positive")
    loss = io.label_loss([["Review: fine\nSentiment:"]], [gold])
    expected = -reference_logprobs(receiver, io.prefix_ids + io.ids("Review: fine\nSentiment:") + gold)[-2, gold[0]]
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)


def test_right_padding_does_not_change_scores(tiny_models):
    _, receiver = tiny_models
    io = PromptIO(receiver)
    labels = label_token_ids(io, ["negative", "positive"])
    short, long = ["Sentiment:"], ["A much longer review text goes here, really.\nSentiment:"]
    alone = io.score_labels([short], labels)
    batched = io.score_labels([short, long], labels)
    assert torch.allclose(alone[0], batched[0], atol=1e-4)


def test_duplicate_verbalisers_are_rejected(tiny_models):
    _, receiver = tiny_models
    with pytest.raises(ValueError, match="identical"):
        label_token_ids(PromptIO(receiver), ["yes", "yes"])


@pytest.mark.parametrize(
    "text,expected",
    [
        (" positive.", 1),
        ("Negative", 0),
        ("positively", -1),
        ("positive or negative", -1),
        ("I think positive", -1),
        ("", -1),
        ("\n negative\n", 0),
    ],
)
def test_strict_parser(text, expected):
    assert parse_label(text, ["negative", "positive"]) == expected


def test_hooked_hidden_states_match_output_hidden_states(tiny_models):
    sender, _ = tiny_models
    ids = sender_prompts(
        sender, [Example(0, "great movie"), Example(1, "a bad, long and boring film")], "Review: {text}\nSentiment:", 64
    )
    got = hidden_states(sender, ids, [0, 1, 2])
    for i, row in enumerate(ids):
        with torch.no_grad():
            ref = sender.model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
        for layer in (0, 1, 2):
            assert torch.allclose(got[layer][i, : len(row)], ref[layer][0], atol=1e-5), layer


def test_sender_prompt_truncation_keeps_the_instruction(tiny_models):
    sender, _ = tiny_models
    template = "Review: {text}\nSentiment (positive or negative):"
    ids = sender_prompts(sender, [Example(0, "word " * 200)], template, 32)[0]
    assert len(ids) <= 32 + len(sender_prompts(sender, [Example(0, "")], template, 32)[0])  # 32 text tokens
    assert sender.tokenizer.decode(ids).endswith("Sentiment (positive or negative):")


def test_class_loss_is_cross_entropy_over_the_label_scores_and_trains_them(tiny_models):
    # trainer.loss=classes: the loss of the score readout's own decision, with gradients
    _, receiver = tiny_models
    io = PromptIO(receiver)
    label_ids = label_token_ids(io, ["negative", "positive", "neutral stance"])  # one multi-token label
    soft = (torch.randn(2, 3, receiver.hidden_size) * 0.02).requires_grad_()
    prefixes = [["Review:", soft[i], "\nSentiment:"] for i in range(2)]
    loss = io.class_loss(prefixes, label_ids, [1, 2])
    expected = F.cross_entropy(io.score_labels(prefixes, label_ids), torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    loss.backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
