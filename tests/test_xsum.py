"""XSum through the bridge: ROUGE metric, summary-only loss, batched generation, data errors, end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY, compose, needs_data, results, run_train
from telepathy.data import Example
from telepathy.metrics import rouge_scores, rouge_summary
from telepathy.prompting import PromptIO, generation_targets

# 8 articles, short inputs and summaries: plumbing in seconds on 2 CPU cores
SMALL = [
    "task=xsum",
    "task.train_samples=8",
    "task.test_samples=8",
    "task.max_input_tokens=128",
    "task.max_target_tokens=16",
]


def test_rouge_of_a_reference_against_itself_is_one_and_against_nothing_zero():
    refs = [
        "Christmas swims are expected to attract bumper numbers this year.",
        "Stoke's old ground will get 200 homes.",
    ]
    same = rouge_summary(rouge_scores(refs, refs))
    empty = rouge_summary(rouge_scores(refs, ["", ""]))
    for k in ("rouge1", "rouge2", "rougeL"):
        assert same[k] == pytest.approx(1.0) and same[f"{k}_ci_low"] == pytest.approx(1.0)
        assert empty[k] == 0.0 and empty[f"{k}_ci_high"] == 0.0


def test_rouge_stems_and_ignores_case():
    [s] = rouge_scores(["The cats were running home"], ["the cat was run home"])
    assert s["rouge1"] == pytest.approx(0.8)  # the, cat(s), run(ning), home match; were/was do not


def test_rouge_ci_brackets_the_mean():
    per_item = rouge_scores(["a b c d", "a b c d", "e f g h"], ["a b c d", "a b x y", "z"])
    m = rouge_summary(per_item)
    assert m["rouge1_ci_low"] <= m["rouge1"] <= m["rouge1_ci_high"]
    assert m["rouge1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_generation_loss_covers_exactly_the_summary_tokens(tiny_models):
    """The loss is the mean CE of the summary tokens + EOS, each predicted from the position before it."""
    _, receiver = tiny_models
    io = PromptIO(receiver)
    task = compose(*TINY, "task=xsum").task
    summary = "Stoke's old ground is to be redeveloped into 200 homes."
    [target] = generation_targets(io, [Example(0, "article", target=summary)], task)
    assert target == io.ids(" " + summary) + [io.tok.eos_token_id]
    prefix = "Article: the council approved plans.\nOne-sentence summary:"
    loss = io.label_loss([[prefix]], [target])
    ids = io.prefix_ids + io.ids(prefix) + target
    with torch.no_grad():
        logp = F.log_softmax(receiver.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    start = len(ids) - len(target)
    expected = -torch.stack([logp[start - 1 + j, t] for j, t in enumerate(target)]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    # one more target token changes the loss; the prompt's own tokens are never targets
    assert io.label_loss([[prefix]], [target + [target[0]]]).item() != pytest.approx(loss.item(), abs=1e-6)


def test_generation_targets_are_capped_and_end_with_eos(tiny_models):
    _, receiver = tiny_models
    io = PromptIO(receiver)
    task = compose(*TINY, "task=xsum", "task.max_target_tokens=5").task
    [target] = generation_targets(io, [Example(0, "x", target="one two three four five six seven eight")], task)
    assert len(target) == 5 and target[-1] == io.tok.eos_token_id


def test_generate_left_padded_batch_matches_each_example_alone(tiny_models):
    """Left padding with inputs_embeds: position ids must skip the padding, or batched outputs drift."""
    _, receiver = tiny_models
    io = PromptIO(receiver)
    template = io.soft_prompt("Article:", "\nOne-sentence summary:")
    torch.manual_seed(0)
    scale = io.embed_layer.weight.std().item()
    seqs = [io.fill(template, torch.randn(n, receiver.hidden_size) * scale) for n in (2, 9)]
    seqs.append(["Article: a long article about the council and a football ground, with many words.\nSummary:"])
    batched = io.generate(seqs, max_new_tokens=10)
    alone = [io.generate([s], max_new_tokens=10)[0] for s in seqs]
    assert batched == alone
    # and alone equals a plain greedy step on token ids
    ids = io.prefix_ids + io.ids(seqs[2][0])
    with torch.no_grad():
        first = receiver.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    assert alone[2].startswith(io.tok.decode([first], skip_special_tokens=True))


@needs_data
def test_tiny_bridge_on_xsum_writes_rouge(outputs):
    run_train(*TINY, *SMALL, outputs=outputs)
    [record] = results(outputs)
    m = record["metrics"]
    assert record["status"] == "completed" and record["task"] == "xsum"
    assert m["n_test"] == 8
    for k in ("rouge1", "rouge2", "rougeL", "receiver_zeroshot_rouge1", "receiver_zeroshot_rougeL"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["rouge1_ci_low"] <= m["rouge1"] <= m["rouge1_ci_high"]
    assert m["mean_output_tokens"] > 0
    run_dir = Path(record["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["reference"] and "output" in r and "rougeL" in r for r in rows)
    # the scored summary is the raw output's first line; its length is counted in receiver tokens
    # (re-tokenised text, which for random-weight outputs can exceed the tokens generated)
    assert all(r["output"] == r["raw_output"].strip().split("\n")[0].strip() for r in rows)
    assert m["mean_output_tokens"] == pytest.approx(sum(r["output_tokens"] for r in rows) / 8)
    log_rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in log_rows) and any("ce" in r for r in log_rows)


def test_missing_xsum_folder_is_a_clear_error_not_another_data_set(tmp_path, outputs):
    (tmp_path / "sst2").mkdir()  # a data root that has other tasks but no xsum
    proc = run_train(*TINY, *SMALL, outputs=outputs, check=False, env_extra={"TELEPATHY_DATA": tmp_path})
    assert proc.returncode != 0
    assert "xsum" in proc.stderr and "not found" in proc.stderr
    assert not results(outputs)  # checked before the run dir exists (telepathy/hydra_glue.py): no ghost run


@pytest.mark.slow
@needs_data
def test_demo_pair_summarises_a_few_articles(outputs):
    """The real SmolLM2 → Gemma-3 pair: a two-step bridge and the receiver's own zero-shot summaries."""
    run_train(
        "task=xsum",
        "task.train_samples=2",
        "task.test_samples=2",
        "task.max_input_tokens=64",
        "task.max_target_tokens=16",
        "trainer.max_steps=1",
        "trainer.batch_size=2",
        "trainer.eval_every=0",
        "eval.batch_size=2",
        outputs=outputs,
    )
    [record] = results(outputs)
    m = record["metrics"]
    assert record["status"] == "completed" and m["n_test"] == 2
    assert 0.0 <= m["rougeL"] <= 1.0
    # Gemma reading the article itself copies some of its words: a summary with overlap
    assert m["receiver_zeroshot_rouge1"] > 0.0
