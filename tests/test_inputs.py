"""What each method reads: the sender's prompt, the text tokens in it, and measured compression."""

import pytest

from helpers import compose, needs_data
from telepathy.config import ConfigError
from telepathy.config import validate as validate_config
from telepathy.data import Example


def test_sender_inputs_count_text_tokens_and_truncation(tiny_models):
    from telepathy.features import sender_inputs

    sender, _ = tiny_models
    tok = sender.tokenizer
    short, long = "a fine film", " ".join(["wonderful"] * 80)
    examples = [Example(idx=0, text=short, label=0), Example(idx=1, text=long, label=1)]
    got = sender_inputs(sender, examples, "Review: {text}\nSentiment:", max_tokens=40)
    n_short = len(tok(short, add_special_tokens=False).input_ids)
    assert got.text_tokens[0] == n_short and got.truncated == [False, True]
    assert got.text_tokens[1] == 40 < len(tok(long, add_special_tokens=False).input_ids)
    # the prompt holds more than the text (instruction, template): only the text counts
    assert len(got.ids[0]) > got.text_tokens[0]


def test_a_chat_template_does_not_eat_the_texts_budget(tiny_models):
    """The cap is on the text: a sender with a (30-token) chat template reads the same text
    as one without, so the model-size ablation does not compare different inputs."""
    import dataclasses

    from telepathy.features import sender_inputs

    sender = tiny_models[0]
    text = " ".join(["good"] * 30)
    examples = [Example(idx=0, text=text, label=1)]
    plain = sender_inputs(sender, examples, "Review: {text}\nSentiment:", max_tokens=40)
    chat = sender_inputs(
        dataclasses.replace(sender, chat_template=True), examples, "Review: {text}\nSentiment:", max_tokens=40
    )
    assert len(chat.ids[0]) > len(plain.ids[0]) + 10  # the template is there
    assert chat.truncated == plain.truncated == [False]
    assert sender.tokenizer.decode(chat.ids[0]).count("good") == 30


def test_text_is_capped_in_words_once_for_every_method(tmp_path):
    """task.max_text_words cuts the text at load time (what every method reads), marks the
    cut items, keeps formatting; null reads the whole text (the uncapped reference)."""
    import json

    from omegaconf import OmegaConf

    from telepathy.data import cap_words, load_split

    assert cap_words("a  b\nc d", 3) == ("a  b\nc", True) and cap_words("a b", 3) == ("a b", False)
    assert cap_words("a b c d", None) == ("a b c d", False)
    (tmp_path / "t").mkdir()
    rows = [{"text": "one two three four five", "label": 0}, {"text": "short one", "label": 1}]
    (tmp_path / "t" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "local_dir": "t",
        "splits": {"test": "test"},
        "text_column": "text",
        "label_column": "label",
        "type": "classification",
        "labels": ["a", "b"],
        "max_text_words": 3,
    }
    data = OmegaConf.create({"root": str(tmp_path)})
    got = load_split(OmegaConf.create(task), data, "test")
    assert [e.text for e in got] == ["one two three", "short one"]
    assert [e.extra.get("text_truncated", False) for e in got] == [True, False]
    whole = load_split(OmegaConf.create({**task, "max_text_words": None}), data, "test")
    assert whole[0].text == rows[0]["text"]


@needs_data
@pytest.mark.parametrize("task", ["sst2", "trec", "xsum"])
def test_the_word_cap_binds_before_the_senders_token_cap(tiny_models, task):
    """With the shipped task.max_text_words, the demo sender's task.max_input_tokens cuts no test
    text further, so the bridge reads what every other method reads (xsum at 360 words left 21 of
    its 500 articles over 512 tokens). AG News is not here: 6 of its 2000 test items hold URLs or
    markup of 28-42 tokens a word, and some stay over 128 tokens at every cap above 20 words; the
    run records them (bridge.truncated_test_items) and aggregate's table notes them."""
    from helpers import compose
    from telepathy.data import load_split
    from telepathy.features import sender_inputs

    cfg = compose(f"task={task}")
    test = load_split(cfg.task, cfg.data, "test")
    got = sender_inputs(tiny_models[0], test, cfg.task.prompt, cfg.task.max_input_tokens)
    assert sum(got.truncated) == 0 and max(got.text_tokens) <= cfg.task.max_input_tokens


def test_measured_compression_is_text_tokens_per_position():
    from telepathy.compression import measured_compression

    m = measured_compression([8, 16, 24, 32], positions=8)
    assert m["text_tokens_mean"] == 20 and m["measured_compression_mean"] == pytest.approx(2.5)
    assert m["measured_compression_median"] == pytest.approx(2.5)
    assert m["measured_compression_p10"] < m["measured_compression_p90"]
    with pytest.raises(ValueError):
        measured_compression([], positions=8)


def test_llmlingua_at_matched_positions_is_a_standard_p3_row():
    """Beside rate 0.125, P3 runs LLMLingua keeping as many tokens as the bridge's M soft tokens."""
    from omegaconf import OmegaConf

    from helpers import compose
    from telepathy import methods
    from telepathy.config import CONF_DIR, ConfigError, run_name
    from telepathy.methods.llmlingua import compression_target
    from telepathy.results import run_identity

    cfg = compose("method=llmlingua_matched", "compression=16")
    assert cfg.method.name == "llmlingua" and cfg.method.budget == "match_bridge"
    assert compression_target(cfg) == {"target_token": 4}  # ceil(64 / 16), the bridge's M
    # the factor that defines its M is part of what the run is: its id, its identity, its table row
    assert run_identity(cfg)["compression"] == 16 and run_identity(cfg)["num_latents"] == 4
    assert "-llmlingua-smollm2_135m_gemma3_270m-c16-" in run_name(cfg)
    assert run_identity(compose("method=llmlingua"))["compression"] is None  # rate 0.125 has no M
    with pytest.raises(ConfigError, match="method.budget=match_bridge needs method.uses"):
        methods.validate(compose("method=llmlingua", "method.budget=match_bridge"))
    phase = OmegaConf.load(CONF_DIR / "phase" / "p3_baselines.yaml")
    assert {"llmlingua", "llmlingua_matched", "bridge"} <= set(phase.hydra.sweeper.params.method.split(","))


def test_quick_eval_probe_is_held_out_of_the_training_split():
    from omegaconf import OmegaConf

    from telepathy.data import DataError, holdout

    train = [Example(idx=i, text=f"t{i}", label=i % 2) for i in range(20)]
    trainer = OmegaConf.create({"eval_every": 5, "eval_samples": 4})
    fit_items, probe = holdout(train, trainer, seed=0)
    assert len(probe) == 4 and len(fit_items) == 16
    assert {e.idx for e in fit_items}.isdisjoint(e.idx for e in probe)  # never trained on
    assert holdout(train, trainer, seed=0) == (fit_items, probe)  # the same for every run seed
    assert holdout(train, OmegaConf.create({"eval_every": 0, "eval_samples": 4}), seed=0) == (train, [])
    with pytest.raises(DataError, match="trainer.eval_samples=20"):
        holdout(train, OmegaConf.create({"eval_every": 5, "eval_samples": 20}), seed=0)


@pytest.mark.parametrize("placement", ["primer_soft_prompt", "soft_primer_prompt", "primer_prompt_soft"])
@pytest.mark.parametrize("chat", [False, True])
def test_prompt_tuning_soft_tokens_sit_where_the_bridge_puts_its_own(tiny_models, chat, placement):
    """Under every bridge.placement, prompt tuning's sequence is the bridge's (same framing, soft
    tokens at the same place relative to primer and answer prompt) with the text after the primer."""
    import dataclasses

    import torch

    from helpers import compose
    from telepathy.methods.prompt_tuning import soft_prompt_sequences
    from telepathy.prompting import SOFT, PromptIO

    cfg = compose("method=prompt_tuning", f"bridge.placement={placement}")
    sender = tiny_models[0]  # SmolLM2's tokenizer has a chat template; the demo config leaves it off
    io = PromptIO(dataclasses.replace(sender, chat_template=chat))
    soft = torch.zeros(3, io.embed_layer.weight.shape[1])
    (seq,) = soft_prompt_sequences(io, cfg, soft, [Example(idx=0, text="a fine film", label=1)])
    before, after = io.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt, placement)[::2]  # the bridge's
    assert len(seq) == 3 and seq[1] is soft
    assert (seq[0] + SOFT + seq[2]).replace(" a fine film", "", 1) == before + SOFT + after
    if chat:  # inside the user turn, after the template's header
        assert "<|im_start|>user" in seq[0]


def test_prompt_tuning_placement_is_checked_before_anything_loads():
    from helpers import compose
    from telepathy.config import ConfigError
    from telepathy.methods.prompt_tuning import validate

    with pytest.raises(ConfigError, match="bridge.placement='middle'"):
        validate(compose("method=prompt_tuning", "bridge.placement=middle"))
    with pytest.raises(ConfigError, match="task.receiver_primer='Text:'"):
        validate(compose("method=prompt_tuning", "task.receiver_primer=Text:"))


def test_prompt_tuning_has_its_own_learning_rate():
    from helpers import TINY, compose
    from telepathy.config import ConfigError
    from telepathy.methods.prompt_tuning import validate
    from telepathy.methods.train_then_evaluate import trainer_config

    cfg = compose(*TINY, "method=prompt_tuning")
    assert cfg.method.lr == pytest.approx(3e-3) and trainer_config(cfg).lr == pytest.approx(3e-3)
    assert trainer_config(cfg).max_steps == cfg.trainer.max_steps  # everything else is the bridge's
    assert trainer_config(compose(*TINY, "method=prompt_tuning", "method.lr=null")).lr == cfg.trainer.lr
    with pytest.raises(ConfigError, match="method.lr=-1"):
        validate(compose(*TINY, "method=prompt_tuning", "method.lr=-1"))


def test_latency_benchmark_times_the_accuracy_baselines_relay():
    """One relay definition: the latency benchmark's relay.* is conf/method/text_relay.yaml."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from helpers import REPO, compose

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        latency = hydra_compose(config_name="latency", overrides=["task=trec"])
    method = compose("method=text_relay", "task=trec").method
    assert OmegaConf.to_container(latency.relay, resolve=True) == OmegaConf.to_container(method, resolve=True)
    assert latency.relay.instruction == latency.task.prompt and latency.relay.max_new_tokens == 48


def test_final_log_reports_measured_compression_not_prompt_tokens_per_soft_token(caplog):
    """The run's last log line gives M with the nominal and the measured factor (text tokens per
    soft token), not prompt tokens / M (template and instruction included), and warns when the
    sender's token cap cut test texts."""
    import logging

    from telepathy.lifecycle import _log_summary

    bridge = {
        "num_latents": 8,
        "compression_factor": 8,
        "mean_sender_tokens": 33.5,
        "compression_ratio": 33.5 / 8,
        "text_tokens_mean": 23.5,
        "measured_compression_mean": 23.5 / 8,
        "truncated_test_items": 0,
    }
    record = {"method": "bridge", "task": "sst2", "seed": 42, "run_dir": "r", "metrics": {"accuracy": 0.9}}
    with caplog.at_level(logging.INFO, logger="telepathy"):
        _log_summary({**record, "bridge": bridge})
        _log_summary({**record, "bridge": {**bridge, "truncated_test_items": 3}})
    first, second = (r.getMessage() for r in caplog.records)
    assert "8 (compression 8x nominal, 2.9x measured = 23.5 text tokens / 8)" in first
    assert "4.2x" not in first and "33.5" not in first and "WARNING" not in first
    assert "WARNING: task.max_input_tokens cut 3 test texts" in second


@needs_data
def test_measured_compression_sets_m_from_the_training_texts_length(tmp_path, monkeypatch):
    """Issue 21 §4: "8x" of compression_basis=measured is 8x the mean text tokens the sender reads of the
    training items (TREC: ~10 tokens, so M = 2, where the 64-token cap gives M = 8: 1x measured, and 4x
    is an expansion). Measured once per task and sender, cached on disk; cap stays the default."""
    import math

    from telepathy import compression
    from telepathy.data import load_split
    from telepathy.models import load_tokenizer

    base = ["budget=tiny", "task=trec", f"paths.cache_dir={tmp_path}"]
    assert compression.latents(compose(*base)) == 8  # cap: ceil(64 / 8)
    cfg = compose(*base, "compression_basis=measured")
    train = load_split(cfg.task, cfg.data, "train", cfg.task.train_samples, cfg.data.sample_seed)
    tok = load_tokenizer(cfg.sender)
    mean = sum(min(len(tok(ex.text, add_special_tokens=False).input_ids), 64) for ex in train) / len(train)
    assert compression.latents(cfg) == math.ceil(mean / 8) < 8
    assert list((tmp_path / "text_tokens").glob("*.json"))  # on disk: the next job reads it, no tokenizer
    compression._MEASURED.clear()
    monkeypatch.setattr("telepathy.models.load_tokenizer", lambda *_: pytest.fail("measured again"))
    assert compression.latents(cfg) == math.ceil(mean / 8)
    with pytest.raises(ConfigError, match="compression_basis"):
        validate_config(compose(*base, "compression_basis=guess"))
