"""Inference-only baselines (zeroshot, fewshot, text_relay, llmlingua, ensemble): prompt
building and demonstration sampling as units, every method through `python train.py`."""

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY, compose, needs_data, results, run_train
from telepathy.config import ConfigError, group_options, run_name
from telepathy.data import Example, format_prompt
from telepathy.evaluation import text_prompt
from telepathy.methods import validate
from telepathy.methods.baselines import prompt_tokens
from telepathy.methods.ensemble import average_probabilities
from telepathy.methods.fewshot import DemonstrationSampler, demonstrations_text
from telepathy.prompting import PromptIO

CLASSIFICATION_TASKS = [t for t in group_options("task") if compose(f"task={t}").task.type == "classification"]


def predictions(record: dict) -> list[dict]:
    lines = (Path(record["run_dir"]) / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def by_method(records: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in records}


# --- units ------------------------------------------------------------------------


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_every_prompt_a_baseline_reads_lists_every_label(task):
    cfg = compose(f"task={task}", "method=text_relay")
    labels = list(cfg.task.labels)
    demos = [Example(idx=k, text=f"example {k}", label=k) for k in range(len(labels))]
    prompts = {
        "zeroshot": format_prompt(cfg.task.prompt, "some input"),
        "fewshot": demonstrations_text(demos, cfg.task, "\n\n") + format_prompt(cfg.task.prompt, "some input"),
        "text_relay": format_prompt(cfg.method.receiver_prompt, "a message"),
    }
    for method, prompt in prompts.items():
        missing = [label for label in labels if label not in prompt]
        assert not missing, f"{task} {method} prompt does not list {missing}: {prompt!r}"
    # the query comes last, unanswered: the model's next words are its answer
    assert prompts["fewshot"].endswith(format_prompt(cfg.task.prompt, "some input"))


def _pool(per_class: list[int]) -> list[Example]:
    pool = []
    for label, n in enumerate(per_class):
        pool += [
            Example(idx=len(pool), text=f"class {label} item {i}", label=label, id=f"{label}-{i}") for i in range(n)
        ]
    return pool


def test_fewshot_demonstrations_are_class_balanced_and_seeded():
    pool = _pool([30, 5, 50])
    sampler = DemonstrationSampler(pool, num_labels=3, shots=2)
    query = Example(idx=7, text="a test sentence", label=1)
    demos = sampler.draw(seed=42, query=query)
    assert sorted(d.label for d in demos) == [0, 0, 1, 1, 2, 2]
    assert len({d.id for d in demos}) == 6
    assert [d.id for d in sampler.draw(seed=42, query=query)] == [d.id for d in demos]  # reproducible
    draws = {tuple(d.id for d in sampler.draw(seed=s, query=query)) for s in range(20)}
    assert len(draws) > 10  # the seed changes the sample
    other = {tuple(d.id for d in sampler.draw(seed=42, query=Example(idx=i, text="q", label=0))) for i in range(20)}
    assert len(other) > 10  # and so does the query
    # the order is shuffled: the last demonstration is not always the same class
    assert len({sampler.draw(seed=s, query=query)[-1].label for s in range(20)}) == 3


def test_fewshot_query_is_never_its_own_demonstration():
    pool = _pool([3, 3])
    pool.append(Example(idx=len(pool), text=pool[0].text, label=0, id="copy"))  # a duplicate of the query text
    sampler = DemonstrationSampler(pool, num_labels=2, shots=2)
    for seed in range(50):
        demos = sampler.draw(seed=seed, query=pool[0])
        assert pool[0].text not in [d.text for d in demos]
        assert sorted(d.label for d in demos) == [0, 0, 1, 1]


def test_fewshot_needs_enough_examples_of_every_class():
    with pytest.raises(ConfigError, match="method.shots=3"):
        DemonstrationSampler(_pool([5, 2]), num_labels=2, shots=3)
    sampler = DemonstrationSampler(_pool([2, 2]), num_labels=2, shots=2)
    with pytest.raises(ConfigError, match="excluded"):
        sampler.draw(seed=0, query=_pool([2, 2])[0])


def test_ensemble_averages_probabilities_not_log_likelihoods():
    # the sender is sure of label 0; the receiver mildly prefers label 1 with much lower likelihoods
    sender = torch.log(torch.tensor([[0.9, 0.1]]))
    receiver = torch.log(torch.tensor([[0.001, 0.003]]))
    probs = average_probabilities([sender, receiver])
    assert probs.tolist()[0] == pytest.approx([(0.9 + 0.25) / 2, (0.1 + 0.75) / 2])
    assert probs.argmax(-1).item() == 0


def test_calibrated_zeroshot_divides_the_content_free_prior_out(tiny_models):
    """Contextual calibration: p(label | x) / prior(label), the prior the mean label probabilities on
    content-free texts; an argmax that a prior favouring one label decided is decided by the input."""
    from telepathy.methods.zeroshot import CalibratedIO, content_free_prior
    from telepathy.prompting import label_token_ids

    cfg = compose(*TINY, "method=zeroshot_calibrated")
    _, receiver = tiny_models
    raw = PromptIO(receiver)
    build = text_prompt(raw, cfg.task.prompt)
    prior = content_free_prior(raw, build, cfg)
    assert prior.shape == (2,) and float(prior.sum()) == pytest.approx(1.0)
    label_ids = label_token_ids(raw, list(cfg.task.labels), cfg.task.label_prefix)
    seqs = build([Example(idx=i, text=t) for i, t in enumerate(["a great film", "a dull film"])])
    calibrated = CalibratedIO(receiver, prior).score_labels(seqs, label_ids)
    want = raw.score_labels(seqs, label_ids).float().log_softmax(-1) - prior.log()
    assert torch.allclose(calibrated, want, atol=1e-5)
    with pytest.raises(ConfigError, match=r"method\.calibration=content_free is not allowed"):
        validate(compose(*TINY, "method=zeroshot_calibrated", "task=xsum"))


def test_prompt_tokens_counts_what_the_model_reads(tiny_models):
    for lm in tiny_models:
        io = PromptIO(lm)
        seqs = text_prompt(io, "Review: {text}\nSentiment (positive or negative):")(
            [Example(idx=0, text="a fine film"), Example(idx=1, text="dull and far too long")]
        )
        seqs.append(["Review:", torch.zeros(5, lm.hidden_size), [1, 2, 3]])
        _, _, lengths = io.embed(seqs)
        assert [prompt_tokens(io, s) for s in seqs] == lengths


def test_method_configs_are_checked_before_anything_loads():
    for overrides, key in [
        (["method=zeroshot", "method.model=gpt5"], "method.model"),
        (["method=llmlingua", "method.budget=half"], "method.budget"),
        (["method=llmlingua", "method.rate=0"], "method.rate"),
        (["method=fewshot", "method.shots=0"], "method.shots"),
        (["method=text_relay", "method.max_new_tokens=0"], "method.max_new_tokens"),
        (["method=ensemble", "eval.readout=generate"], "eval.readout"),
        (["method=ensemble", "task=xsum"], "classification task"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate(compose(*overrides))


def test_run_names_identify_the_model_that_was_evaluated():
    assert "-zeroshot-gemma3_270m-s42-" in run_name(compose("method=zeroshot"))
    assert "-zeroshot-smollm2_135m-s42-" in run_name(compose("method=zeroshot", "method.model=sender"))
    assert "-zeroshot-llama32_1b-s42-" in run_name(compose("method=zeroshot", "method.model=llama32_1b"))
    assert "-llmlingua-smollm2_135m_gemma3_270m-s42-" in run_name(compose("method=llmlingua"))
    assert "-bridge-smollm2_135m_gemma3_270m-c8-s42-" in run_name(compose())


# --- through the entry point -------------------------------------------------------


def _check_inference_record(record: dict, n_test: int) -> list[dict]:
    """What every baseline writes: completed, nothing trained, tokens read, one row per item."""
    assert record["status"] == "completed", record.get("error")
    assert record["params"]["trainable"] == 0 and record["timing"]["train_s"] == 0
    assert record["timing"]["eval_s"] > 0
    assert record["metrics"]["n_test"] == n_test
    rows = predictions(record)
    assert len(rows) == n_test and all(r["receiver_tokens"] > 0 for r in rows)
    assert record["metrics"]["receiver_tokens_mean"] == pytest.approx(sum(r["receiver_tokens"] for r in rows) / n_test)
    return rows


@needs_data
def test_zeroshot_of_the_sender_with_generation_and_reuse_across_seeds(outputs):
    run_train(
        "-m", *TINY, "method=zeroshot", "method.model=sender", "eval.readout=generate", "seed=42,123", outputs=outputs
    )
    first, second = sorted(results(outputs), key=lambda r: r["seed"])
    assert "-zeroshot-smollm2_135m-s42-" in first["run_id"]
    rows = _check_inference_record(first, 16)
    assert {"output", "pred"} <= set(rows[0])
    assert first["metrics"]["unparseable"] == sum(r["pred"] == -1 for r in rows)
    assert first["params"]["sender"] > 0 and first["reused_from"] is None
    assert second["status"] == "completed" and second["reused_from"] == first["run_dir"]
    assert second["metrics"] == first["metrics"] and predictions(second) == rows


@needs_data
def test_fewshot_run(outputs):
    run_train(*TINY, "method=fewshot", "method.shots=2", "task.test_samples=8", outputs=outputs)
    (record,) = results(outputs)
    rows = _check_inference_record(record, 8)
    assert all(len(r["demonstrations"]) == 4 for r in rows)  # 2 shots x 2 classes
    assert len({tuple(r["demonstrations"]) for r in rows}) > 1
    assert "majority_accuracy" in record["metrics"]


@needs_data
def test_text_relay_run_records_the_messages(outputs):
    run_train(*TINY, "method=text_relay", "method.max_new_tokens=4", "task.test_samples=4", outputs=outputs)
    (record,) = results(outputs)
    rows = _check_inference_record(record, 4)
    assert all(isinstance(r["relay"], str) and 0 <= r["relay_tokens"] <= 4 + 1 for r in rows)
    assert record["metrics"]["relay_tokens_mean"] == pytest.approx(sum(r["relay_tokens"] for r in rows) / 4)
    assert record["params"]["sender"] > 0 and record["params"]["receiver"] > 0


@needs_data
def test_llmlingua_run_matched_to_the_bridge_budget(outputs):
    run_train(*TINY, "method=llmlingua_matched", "compression=16", "task.test_samples=4", outputs=outputs)
    (record,) = results(outputs)
    rows = _check_inference_record(record, 4)
    m = record["metrics"]
    assert m["target_token"] == 4  # M = ceil(64 / 16)
    assert "-c16-" in record["run_id"] and record["identity"]["compression"] == 16
    assert all(r["compressed_tokens"] <= r["origin_tokens"] for r in rows)
    assert m["compressed_tokens_mean"] < m["origin_tokens_mean"]
    assert record["extra"]["compressor"] == "smollm2_135m"


@needs_data
def test_sweep_mixes_bridge_and_baselines_on_the_same_items(outputs):
    run_train("-m", *TINY, "method=bridge,zeroshot,ensemble", "task.max_text_words=5", outputs=outputs)
    records = by_method(results(outputs))
    assert set(records) == {"bridge", "zeroshot", "ensemble"}
    assert all(r["status"] == "completed" for r in records.values())
    zs, ens, bridge = records["zeroshot"], records["ensemble"], records["bridge"]
    _check_inference_record(zs, 16)
    rows = _check_inference_record(ens, 16)
    # the same receiver on the same items gives the same zero-shot answers in all three runs
    assert ens["metrics"]["receiver_accuracy"] == zs["metrics"]["accuracy"]
    assert bridge["metrics"]["receiver_zeroshot_accuracy"] == zs["metrics"]["accuracy"]
    assert [r["receiver_pred"] for r in rows] == [r["pred"] for r in predictions(zs)]
    assert [r["idx"] for r in rows] == [r["idx"] for r in predictions(bridge)]
    assert all(sum(r["scores"]) == pytest.approx(1, abs=1e-3) for r in rows)
    # every text reader records how many test texts the word cap cut: the same count for all three
    truncated = {name: r["metrics"]["text_truncated_items"] for name, r in records.items()}
    assert truncated["ensemble"] == truncated["zeroshot"] == truncated["bridge"] > 0


@needs_data
def test_zeroshot_and_text_relay_summarise_xsum(outputs):
    run_train(
        "-m",
        *TINY,
        "task=xsum",
        "method=zeroshot,text_relay",
        "task.test_samples=2",
        "++method.max_new_tokens=4",
        "eval.generation.max_new_tokens=4",
        outputs=outputs,
    )
    records = by_method(results(outputs))
    for record in records.values():
        rows = _check_inference_record(record, 2)
        assert 0 <= record["metrics"]["rouge1"] <= 1 and {"reference", "output", "rouge1"} <= set(rows[0])
    assert all("relay" in r for r in predictions(records["text_relay"]))


@pytest.mark.slow
@needs_data
def test_demo_receiver_zeroshot_on_sst2_is_reused_for_a_second_seed(outputs):
    run_train("-m", "method=zeroshot", "task.test_samples=40", "seed=42,123", outputs=outputs)
    first, second = sorted(results(outputs), key=lambda r: r["seed"])
    rows = _check_inference_record(first, 40)
    assert 0 <= first["metrics"]["accuracy"] <= 1
    assert first["metrics"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 40)
    assert second["reused_from"] == first["run_dir"] and second["metrics"] == first["metrics"]
