"""What each method reads: the sender's prompt, the text tokens in it, and measured compression."""

import pytest

from telepathy.compression import measured_compression
from telepathy.data import Example
from telepathy.features import sender_inputs


def test_sender_inputs_count_text_tokens_and_truncation(tiny_models):
    sender, _ = tiny_models
    tok = sender.tokenizer
    short, long = "a fine film", " ".join(["wonderful"] * 80)
    examples = [Example(idx=0, text=short, label=0), Example(idx=1, text=long, label=1)]
    got = sender_inputs(sender, examples, "Review: {text}\nSentiment:", max_tokens=40)
    n_short = len(tok(short, add_special_tokens=False).input_ids)
    assert got.text_tokens[0] == n_short and got.truncated == [False, True]
    assert len(got.ids[1]) <= 40 and got.text_tokens[1] < len(tok(long, add_special_tokens=False).input_ids)
    # the prompt holds more than the text (instruction, template): only the text counts
    assert len(got.ids[0]) > got.text_tokens[0]


def test_measured_compression_is_text_tokens_per_position():
    m = measured_compression([8, 16, 24, 32], positions=8)
    assert m["text_tokens_mean"] == 20 and m["measured_compression_mean"] == pytest.approx(2.5)
    assert m["measured_compression_median"] == pytest.approx(2.5)
    assert m["measured_compression_p10"] < m["measured_compression_p90"]
    with pytest.raises(ValueError):
        measured_compression([], positions=8)


def test_llmlingua_at_matched_positions_is_a_standard_p3_row():
    """Beside rate 0.125, P3 runs LLMLingua keeping as many tokens as the bridge's M soft tokens."""
    from omegaconf import OmegaConf

    from baselines.llmlingua import compression_target
    from helpers import compose
    from telepathy.config import CONF_DIR

    cfg = compose("method=llmlingua_matched", "compression=16")
    assert cfg.method.name == "llmlingua" and cfg.method.budget == "match_bridge"
    assert compression_target(cfg) == {"target_token": 4}  # ceil(64 / 16), the bridge's M
    phase = OmegaConf.load(CONF_DIR / "phase" / "p3_baselines.yaml")
    assert {"llmlingua", "llmlingua_matched", "bridge"} <= set(phase.hydra.sweeper.params.method.split(","))
