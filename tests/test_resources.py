"""GPU-memory estimates and the 1-GPU / 2-GPU / does-not-fit decision (no GPU, no SLURM)."""

import math

import pytest

from helpers import compose
from telepathy.config import ConfigError, models_used, num_latents
from telepathy.resources import GB, HOST_BASE_GB, Resources, bridge_params, estimate, host_ram_gb, plan


def test_weights_follow_num_params_and_dtype():
    cfg = compose()  # demo pair: SmolLM2-135M -> Gemma-3-270M, dtype auto (bf16 on a GPU)
    est = estimate(cfg)
    assert est.sender_gb == pytest.approx(134.5e6 * 2 / GB)
    assert est.receiver_gb == pytest.approx(268.1e6 * 2 / GB)
    fp32 = estimate(compose("sender.dtype=float32", "receiver.dtype=float32"))
    assert fp32.sender_gb == pytest.approx(2 * est.sender_gb)
    assert fp32.receiver_gb == pytest.approx(2 * est.receiver_gb)


def test_bridge_is_counted_with_its_optimizer_state():
    cfg = compose()
    d, m = cfg.bridge.dim, num_latents(cfg)
    expected = (
        m * d
        + cfg.sender.hidden_size * d
        + d * cfg.receiver.hidden_size
        + cfg.bridge.depth * (8 + 2 * cfg.bridge.mlp_ratio) * d * d
        + m * (cfg.receiver.hidden_size + 1)  # the reference normalisation's learned prompt and gain
    )
    assert cfg.bridge.reference_items and not cfg.bridge.centre_grad
    assert bridge_params(cfg) == int(expected)
    assert estimate(cfg).bridge_gb == pytest.approx(bridge_params(cfg) * 16 / GB)


def test_margin_batch_and_sequence_length_raise_the_estimate():
    base = estimate(compose())
    assert estimate(compose("resources.margin=2.5")).total_gb == pytest.approx(2 * base.total_gb)
    assert estimate(compose("trainer.batch_size=64", "eval.batch_size=64")).activations_gb > base.activations_gb
    assert estimate(compose("task.max_input_tokens=512")).activations_gb > base.activations_gb
    assert base.total_gb == pytest.approx(
        base.margin * (base.sender_gb + base.receiver_gb + base.bridge_gb + base.activations_gb)
    )


def test_margin_below_one_is_rejected():
    with pytest.raises(ConfigError, match="resources.margin"):
        estimate(compose("resources.margin=0.5"))


def test_demo_pair_fits_one_gpu_with_both_models_on_it():
    cfg = compose()
    res = plan(cfg)
    assert res.gpus == 1
    assert res.placement == {"sender": "cuda:0", "receiver": "cuda:0"}
    assert res.cpus == cfg.cluster.cpus_per_gpu
    assert cfg.cluster.mem_gb_per_gpu is None and res.mem_gb == math.ceil(host_ram_gb(cfg))  # the estimate
    assert plan(compose("cluster.mem_gb_per_gpu=64")).mem_gb == 64  # a site's per-GPU floor
    assert res.timeout_min == cfg.cluster.timeout_min
    assert res.estimate_gb == pytest.approx(estimate(cfg).total_gb)


def test_two_8b_models_split_over_two_32gb_gpus():
    cfg = compose("sender=llama31_8b", "receiver=mistral7b", "budget=paper", "cluster.gpu_mem_gb=32")
    est = estimate(cfg)
    assert est.total_gb > 32 >= max(est.sender_device_gb, est.receiver_device_gb)
    res = plan(cfg)
    assert res.gpus == 2
    assert res.placement == {"sender": "cuda:0", "receiver": "cuda:1"}
    assert res.device_gb == (round(est.sender_device_gb, 3), round(est.receiver_device_gb, 3))
    assert res.cpus == 2 * cfg.cluster.cpus_per_gpu
    # host RAM holds both models' weights while they load
    assert res.mem_gb >= math.ceil(est.sender_gb + est.receiver_gb)
    # the same pair fits one 80 GB GPU
    assert plan(compose("sender=llama31_8b", "receiver=mistral7b", "budget=paper", "cluster.gpu_mem_gb=80")).gpus == 1


def test_does_not_fit_even_two_gpus_names_the_estimate():
    cfg = compose("sender=llama31_8b", "receiver=mistral7b", "cluster.gpu_mem_gb=16")
    with pytest.raises(ConfigError) as err:
        plan(cfg)
    message = str(err.value)
    assert f"{estimate(cfg).total_gb:.1f} GB" in message
    assert "16 GB GPU (cluster.gpu_mem_gb)" in message
    assert "nor two" in message


def test_single_model_method_gets_one_gpu_and_the_small_request():
    cfg = compose("method=zeroshot", "receiver=mistral7b", "cluster.gpu_mem_gb=40")
    assert models_used(cfg) == ["receiver"]
    est = estimate(cfg)
    assert est.sender_gb == 0 and est.bridge_gb == 0
    res = plan(cfg)
    assert res.gpus == 1 and res.placement == {"receiver": "cuda:0"}
    assert res.cpus == cfg.cluster.single_model.cpus
    assert res.mem_gb == math.ceil(1.2 * est.receiver_gb + HOST_BASE_GB)
    assert plan(compose("method=zeroshot", "receiver=mistral7b", "cluster.single_model.mem_gb=32")).mem_gb == 32


def test_a_bad_host_ram_floor_is_refused_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^cluster.mem_gb_per_gpu=0 is not allowed; allowed: a number in \[1, inf\]$"
    ):
        plan(compose("cluster.mem_gb_per_gpu=0"))


def test_single_model_that_does_not_fit_is_an_error_not_a_split():
    cfg = compose("method=zeroshot", "receiver=llama31_8b", "cluster.gpu_mem_gb=10")
    with pytest.raises(ConfigError, match="does not fit one 10 GB GPU") as err:
        plan(cfg)
    assert "nor two" not in str(err.value)


def test_a_model_named_by_its_config_is_estimated_from_that_config():
    cfg = compose("method=zeroshot", "method.model=llama32_1b")
    est = estimate(cfg)
    assert est.sender_gb == 0
    assert est.receiver_gb == pytest.approx(compose("receiver=llama32_1b").receiver.num_params * 2 / GB)
    assert plan(cfg).placement == {"llama32_1b": "cuda:0"}


def test_named_models_live_on_the_receiver_device():
    pair = ["method=llmlingua", "sender=llama31_8b", "receiver=mistral7b", "budget=paper", "cluster.gpu_mem_gb=32"]
    # the compressor is the sender: the split puts it on the first GPU
    assert plan(compose(*pair)).placement == {"sender": "cuda:0", "receiver": "cuda:1"}
    # a compressor named by its config shares the receiver's device, so there is nothing to split
    with pytest.raises(ConfigError, match="does not fit one 32 GB GPU") as err:
        plan(compose(*pair, "method.compressor=llama31_8b"))
    assert "nor two" not in str(err.value)
    small = plan(compose("method=llmlingua", "method.compressor=llama32_1b"))
    assert small.placement == {"llama32_1b": "cuda:0", "receiver": "cuda:0"}


def test_linear_probe_loads_only_the_probed_model():
    cfg = compose("method=linear_probe")
    assert models_used(cfg) == ["sender"]
    res = plan(cfg)
    assert res.gpus == 1 and res.placement == {"sender": "cuda:0"}
    assert res.cpus == cfg.cluster.single_model.cpus


def test_unknown_role_in_method_models_is_rejected():
    with pytest.raises(ConfigError, match="method.models"):
        plan(compose("method.models=[teacher]"))


def test_resource_class_groups_identical_requests():
    a = Resources(gpus=1, cpus=8, mem_gb=64, timeout_min=240, placement={"sender": "cuda:0"})
    b = Resources(gpus=1, cpus=8, mem_gb=64, timeout_min=240, placement={"receiver": "cuda:0"}, estimate_gb=3.0)
    c = Resources(gpus=2, cpus=16, mem_gb=128, timeout_min=240)
    assert a.resource_class == b.resource_class != c.resource_class
    assert c.class_name == "2gpu-16cpu-128gb-240min"
    assert c.gpu_hours == pytest.approx(8.0)
    assert b.to_dict()["estimate_gb"] == 3.0


def test_generation_adds_the_target_tokens_not_the_classification_readout_cap():
    """XSum trains on and generates task.max_target_tokens (64), not eval.max_new_tokens (8)."""
    base = estimate(compose("task=xsum"))
    longer = estimate(compose("task=xsum", "task.max_target_tokens=512"))
    assert longer.receiver_activations_gb > base.receiver_activations_gb  # the bridge's receiver reads them too
    assert longer.sender_activations_gb > base.sender_activations_gb
    assert estimate(compose("task=xsum", "eval.max_new_tokens=512")).total_gb == pytest.approx(base.total_gb)
    capped = estimate(compose("task=xsum", "task.max_target_tokens=512", "eval.generation.max_new_tokens=64"))
    assert capped.total_gb == pytest.approx(base.total_gb)


def test_prompt_tuning_counts_its_trained_soft_prompt():
    cfg = compose("method=prompt_tuning")
    expected = num_latents(cfg) * cfg.receiver.hidden_size * 16 / GB
    assert estimate(cfg).bridge_gb == pytest.approx(expected)
    assert estimate(cfg).bridge_gb > 0


def test_budget_tiny_is_planned_as_the_model_it_builds_not_the_paper_model():
    """budget=tiny builds 2 layers of width 64 of the paper's families: GPU memory and the host-RAM
    request follow that model (its parameters counted from the overridden shape), not the 8B facts."""
    from telepathy.resources import built_shape

    paper = compose("sender=llama31_8b", "receiver=mistral7b", "budget=paper")
    tiny = compose("sender=llama31_8b", "receiver=mistral7b", "budget=tiny")
    assert built_shape(paper.sender).num_params == paper.sender.num_params  # published facts: unchanged
    assert plan(paper).mem_gb >= 38  # both 8B-class models' weights while they load
    assert built_shape(tiny.sender).num_params < 1e7 and built_shape(tiny.sender).hidden_size == 64
    est = estimate(tiny)
    assert est.total_gb < 0.5 and est.sender_gb < 0.02  # was 36 GB: the 8B + 7B weights
    assert host_ram_gb(tiny) < HOST_BASE_GB + 0.1  # the process, not 30 GB of weights
    assert plan(tiny).mem_gb == math.ceil(host_ram_gb(tiny)) <= 5  # no per-GPU floor by default
    zeroshot = plan(compose("method=zeroshot", "receiver=mistral7b", "budget=tiny"))
    assert zeroshot.mem_gb <= 5 and zeroshot.estimate_gb < 0.5


@pytest.mark.slow
def test_built_shape_counts_the_parameters_of_the_model_load_model_builds():
    """One tiny model per way a family counts: untied embeddings (mistral), q/k/v biases (qwen2),
    tied embeddings and extra norms (gemma3)."""
    from telepathy.models import load_model
    from telepathy.resources import built_shape

    families = compose("sender=qwen25_15b", "receiver=mistral7b", "budget=tiny")
    gemma = compose("sender=gemma3_270m", "budget=tiny").sender
    for model_cfg in (families.sender, families.receiver, gemma):
        built = load_model(model_cfg).model
        shape = built_shape(model_cfg)
        assert shape.num_params == sum(p.numel() for p in built.parameters()), model_cfg.name
        embeddings = {
            id(p): p.numel()
            for m in (built.get_input_embeddings(), built.get_output_embeddings())
            for p in m.parameters()
        }
        assert shape.body_params == shape.num_params - sum(embeddings.values()), model_cfg.name
        assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (
            built.config.hidden_size,
            built.config.num_hidden_layers,
            built.config.vocab_size,
        )
