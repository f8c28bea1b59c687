"""The trained / probing baselines: linear_probe, prompt_tuning, lora.

Unit tests pin what makes each one fair and correct (probe layers resolved against the
model's real depth, exactly M x d prompt-tuning weights, LoRA trained on label tokens only
with only adapters trainable); smoke tests run each through ``python train.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import TINY, compose, needs_data, results, run_train
from telepathy import config as tconfig
from telepathy import methods
from telepathy.methods.linear_probe import resolve_layers
from telepathy.methods.lora import add_lora
from telepathy.methods.prompt_tuning import SoftPrompt, init_soft_prompt
from telepathy.models import embedding_rms_median, load_model
from telepathy.prompting import PromptIO

SPREAD = ["25%", "50%", "75%", "100%"]


# --- linear probe: layers -------------------------------------------------------------------


def test_probe_depth_fractions_resolve_against_the_real_depth():
    assert resolve_layers(SPREAD, 16) == [4, 8, 12, 16]
    assert resolve_layers(SPREAD, 30) == [8, 15, 23, 30]
    # the bridge's layer joins the spread; duplicates collapse; negatives count from the end
    assert resolve_layers(["bridge", *SPREAD], 30, bridge_layer=16) == [8, 15, 16, 23, 30]
    assert resolve_layers(["bridge", "50%", -1, 0], 16, bridge_layer=8) == [0, 8, 16]
    assert resolve_layers(["bridge", "100%"], 16, bridge_layer=None) == [16]  # receiver probe: no bridge layer


def test_probe_layers_beyond_the_model_are_a_config_error():
    with pytest.raises(tconfig.ConfigError, match=r"method\.layers entry=24 .*16-layer model.*\[-17, 16\]"):
        resolve_layers([8, 16, 24, 31], 16)
    with pytest.raises(tconfig.ConfigError, match=r"'150%'.*\[0, 100\]"):
        resolve_layers(["150%"], 16)


def test_probe_config_is_checked_before_launch():
    # llama32_1b has 16 layers (its config says so): the seed plan's 8/16/24/31 cannot run on it
    cfg = compose("method=linear_probe", "sender=llama32_1b", "method.layers=[8,16,24,31]")
    with pytest.raises(tconfig.ConfigError, match=r"method\.layers.*allowed: integers in \[-17, 16\]"):
        methods.validate(cfg)
    methods.validate(compose("method=linear_probe", "sender=llama32_1b", "method.layers=[4,8,12,16]"))
    with pytest.raises(tconfig.ConfigError, match="method.pooling"):
        methods.validate(compose("method=linear_probe", "method.pooling=max"))
    with pytest.raises(tconfig.ConfigError, match="method.model"):
        methods.validate(compose("method=linear_probe", "method.model=llama32_1b"))


def test_probe_features_pooled_in_chunks_match_one_pass(tiny_models, tmp_path, monkeypatch):
    from telepathy.data import Example
    from telepathy.features import encode, sender_prompts
    from telepathy.methods import RunContext, linear_probe

    cfg = compose(*TINY, "cache=off")
    sender, _ = tiny_models
    texts = ["a gripping film", "dull.", "the second half drags on and on and on", "fine", "an utter mess"]
    ids = sender_prompts(sender, [Example(idx=i, text=t) for i, t in enumerate(texts)], cfg.task.prompt, 64)
    ctx = RunContext(cfg, tmp_path, {"sender": sender.device, "receiver": sender.device})
    whole = encode(sender, ids, [1, 2])
    monkeypatch.setattr(linear_probe, "FEATURE_CHUNK", 2)
    last = linear_probe.pooled_features(ctx, sender, ids, [1, 2], "last", split="test")
    mean = linear_probe.pooled_features(ctx, sender, ids, [1, 2], "mean", split="test")
    for layer in (1, 2):
        assert last[layer].shape == (5, sender.hidden_size)
        torch.testing.assert_close(torch.from_numpy(last[layer]), torch.stack([s[-1] for s in whole[layer]]))
        torch.testing.assert_close(torch.from_numpy(mean[layer]), torch.stack([s.mean(0) for s in whole[layer]]))


# --- prompt tuning ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [8, 16])
def test_prompt_tuning_trains_exactly_m_by_d(tiny_models, compression):
    cfg = compose(*TINY, "method=prompt_tuning", f"compression={compression}")
    _, receiver = tiny_models
    io = PromptIO(receiver)
    m = tconfig.num_latents(cfg)
    assert m == 64 // compression
    prompt = SoftPrompt(init_soft_prompt(io, m, "vocab", 5000, seed=0))
    assert [p.shape for p in prompt.parameters()] == [torch.Size([m, receiver.hidden_size])]
    assert sum(p.numel() for p in prompt.parameters() if p.requires_grad) == m * receiver.hidden_size
    assert not any(p.requires_grad for p in receiver.model.parameters())
    # random init sits at the receiver's own embedding scale
    rms = init_soft_prompt(io, 256, "random", 5000, seed=0).pow(2).mean(1).sqrt().median()
    assert rms == pytest.approx(embedding_rms_median(receiver.model), rel=0.1)


# --- LoRA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_receiver():
    """A fresh tiny receiver with adapters (not the session's shared one: LoRA changes it in place)."""
    cfg = compose(*TINY, "method=lora")
    lm = load_model(cfg.receiver)
    add_lora(lm, cfg.method, seed=0)
    with torch.no_grad():  # B starts at 0; make the adapters change the output
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return lm


def test_lora_trains_only_adapters(lora_receiver):
    named = dict(lora_receiver.model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # q/k/v/o of both tiny layers, A and B each
    assert len(trainable) == 2 * 4 * 2


def test_lora_loss_is_on_label_tokens_only(lora_receiver):
    lm = lora_receiver
    io = PromptIO(lm)
    prompt = "Review: a quietly moving film\nSentiment (positive or negative):"
    label = io.ids(" positive, truly")
    assert len(label) > 1
    ours = io.label_loss([[prompt]], [label])

    ids = torch.tensor([io.prefix_ids + io.ids(prompt) + label])
    n_prompt = ids.shape[1] - len(label)
    masked = ids.clone()
    masked[0, :n_prompt] = -100
    with torch.no_grad():
        label_only = lm.model(input_ids=ids, labels=masked).loss
        everything = lm.model(input_ids=ids, labels=ids).loss
        other_prompt_targets = ids.clone()
        other_prompt_targets[0, 1:n_prompt] = (ids[0, 1:n_prompt] + 7) % 1000
        changed = lm.model(input_ids=ids, labels=other_prompt_targets).loss
    assert ours.item() == pytest.approx(label_only.item(), rel=1e-4)
    # prompt targets count in an unmasked loss, never in ours
    assert everything.item() != pytest.approx(ours.item(), rel=1e-3)
    assert changed.item() != pytest.approx(everything.item(), rel=1e-3)

    ours.backward()
    grads = {n: p.grad for n, p in lm.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    lm.model.zero_grad(set_to_none=True)


# --- through the entry point --------------------------------------------------------------


def _items_over(words: int, *overrides: str) -> int:
    """Test items of the run's task whose whole text has more than ``words`` words."""
    from telepathy.data import load_task

    _, test = load_task(compose(*overrides, "task.max_text_words=null"))
    return sum(len(ex.text.split()) > words for ex in test)


def _rows(record: dict) -> list[dict]:
    path = Path(record["run_dir"]) / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_data
def test_linear_probe_run(outputs):
    run_train("-m", *TINY, "method=linear_probe", "seed=1,2", "task.max_text_words=5", outputs=outputs)
    first, second = results(outputs)
    assert first["status"] == second["status"] == "completed"
    assert first["run_id"].startswith("sst2-linear_probe-smollm2_135m-s1-")
    m = first["metrics"]
    # tiny sender: 2 layers, sender.layer=1 → bridge 1, 25/50/75/100% → 1, 1, 2, 2
    assert first["probe"]["layers"] == [1, 2]
    assert m["reported_layer"] in (1, 2)
    assert m["accuracy"] == m[f"layer_{m['reported_layer']}_accuracy"]
    for layer in (1, 2):
        assert 0 <= m[f"layer_{layer}_accuracy"] <= 1 and m[f"layer_{layer}_C"] > 0
    assert m["n_test"] == 16 and "majority_accuracy" in m and m["receiver_tokens_mean"] == 0.0
    assert m["model_tokens_mean"] > 0
    # like every text reader, it records the test texts task.max_text_words cut (here: those over 5 words)
    assert m["text_truncated_items"] == _items_over(5, *TINY) > 0
    assert first["probe"]["truncated_test_items"] == 0  # 5 words are far below the 64-token cap
    assert first["params"]["trainable"] == 64 + 1  # binary: one weight vector + bias, d = 64
    assert first["timing"]["train_s"] > 0 and first["timing"]["eval_s"] > 0
    rows = _rows(first)
    assert len(rows) == 16 and {"idx", "id", "label", "pred", "correct", "scores"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 16 == m["accuracy"]
    # deterministic: the second seed reuses the first's result
    assert second["reused_from"] == first["run_dir"] and second["metrics"] == m
    # ... its whole record: the method's own sections too (a reused probe once lost `probe`)
    assert second["probe"] == first["probe"] and second["params"] == first["params"]
    assert second["identity"] == {**first["identity"], "seed": 2}


@needs_data
def test_linear_probe_layer_out_of_range_fails_before_loading(outputs):
    proc = run_train(*TINY, "method=linear_probe", "method.layers=[8,16,24,31]", outputs=outputs, check=False)
    assert proc.returncode != 0
    assert "method.layers entry=8 is out of range for a 2-layer model" in proc.stderr
    assert "loaded smollm2" not in proc.stderr


@needs_data
def test_prompt_tuning_run(outputs):
    run_train(*TINY, "method=prompt_tuning", outputs=outputs)
    (record,) = results(outputs)
    assert record["status"] == "completed"
    assert "-prompt_tuning-gemma3_270m-c8-" in record["run_id"]  # M depends on the compression
    assert record["params"]["trainable"] == 8 * 64
    assert record["prompt_tuning"]["num_virtual_tokens"] == 8
    assert record["prompt_tuning"]["placement"] == record["config"]["bridge"]["placement"] == "primer_soft_prompt"
    # its own learning rate (method.lr), not the bridge's trainer.lr, and the record says which
    assert record["training"]["lr"] == pytest.approx(3e-3) != record["config"]["trainer"]["lr"]
    m = record["metrics"]
    assert m["n_test"] == 16 and "majority_accuracy" in m
    rows = _rows(record)
    assert len(rows) == 16
    # the receiver read M soft tokens + BOS + the text prompt
    assert all(r["receiver_tokens"] > 8 + 1 for r in rows)
    assert m["receiver_tokens_mean"] == pytest.approx(sum(r["receiver_tokens"] for r in rows) / 16)
    assert record["training"]["steps"] == 4 and record["timing"]["train_s"] > 0


@needs_data
def test_lora_run_checkpoints_adapters_only(outputs):
    run_train(*TINY, "method=lora", outputs=outputs)
    (record,) = results(outputs)
    assert record["status"] == "completed"
    # r=8 on q/k/v/o of 2 layers (d=64; q: 4 heads x 16, k/v: 2 x 16): A r x in + B out x r
    assert record["params"]["trainable"] == 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert record["metrics"]["receiver_tokens_mean"] > 0 and record["metrics"]["n_test"] == 16
    log = [json.loads(line) for line in (Path(record["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    checkpoint = sorted((Path(record["run_dir"]) / "checkpoints").glob("step_*"))[-1]
    with safe_open(str(checkpoint / "trainable.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 16 and all("lora_" in k for k in keys)


@pytest.mark.slow
@needs_data
def test_linear_probe_on_the_demo_sender_beats_the_majority_class(outputs, tmp_path):
    """SmolLM2-135M's hidden states separate SST-2 sentiment with 200 training examples."""
    run_train(
        "method=linear_probe",
        "task.train_samples=200",
        "task.test_samples=100",
        "method.layers=[25%,50%,bridge]",
        f"cache.dir={tmp_path / 'features'}",
        outputs=outputs,
    )
    (record,) = results(outputs)
    m = record["metrics"]
    assert record["probe"]["layers"] == [8, 15, 16]  # 30 layers; the forward pass stops at 16
    assert m["n_test"] == 100
    assert m["accuracy"] > m["majority_accuracy"] + 0.1, m
