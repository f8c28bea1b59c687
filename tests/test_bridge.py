"""The bridge: shapes, padding mask, parameter counts, output scale, M from the compression factor."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from telepathy.bridge import PerceiverBridge, collapse_diagnostics, count_params, diversity_loss
from telepathy.config import num_latents


def make(**kw):
    args = dict(sender_dim=24, receiver_dim=40, num_latents=5, dim=16, depth=2, heads=4, mlp_ratio=2.0, target_rms=3.0)
    args.update(kw)
    torch.manual_seed(0)
    return PerceiverBridge(**args).eval()


def test_output_shape_and_rms():
    bridge = make()
    out = bridge(torch.randn(3, 11, 24), torch.ones(3, 11, dtype=torch.long))
    assert out.shape == (3, 5, 40)
    rms = out.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 3.0), atol=1e-3)


def test_scale_is_learnable_and_initialised_from_target():
    bridge = make(target_rms=0.7)
    assert bridge.scale.requires_grad and bridge.scale.item() == pytest.approx(0.7)


def test_padding_is_ignored():
    bridge = make()
    states = torch.randn(1, 6, 24)
    mask = torch.ones(1, 6, dtype=torch.long)
    padded = torch.cat([states, 100 * torch.randn(1, 4, 24)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    assert torch.allclose(bridge(states, mask), bridge(padded, padded_mask), atol=1e-5)


def test_param_count_matches_architecture():
    d, s, r, m, ratio, depth = 16, 24, 40, 5, 2.0, 2
    hidden = int(d * ratio)
    ln = 2 * d
    attn = 4 * d * d + 4 * d  # in_proj (3 d x d + 3 d) + out_proj (d x d + d)
    block = 4 * ln + 2 * attn + (d * hidden + hidden) + (hidden * d + d)
    expected = 2 * s + (s * d + d) + m * d + depth * block + ln + (d * r + r) + 1
    assert count_params(make()) == expected


@pytest.mark.parametrize("tokens,factor,expected", [(64, 4, 16), (64, 8, 8), (64, 32, 2), (100, 8, 13), (512, 16, 32)])
def test_num_latents_from_compression(tokens, factor, expected):
    cfg = OmegaConf.create(
        {"task": {"max_input_tokens": tokens}, "compression": factor, "bridge": {"num_latents": None}}
    )
    assert num_latents(cfg) == expected == math.ceil(tokens / factor)


def test_num_latents_override():
    cfg = OmegaConf.create({"task": {"max_input_tokens": 64}, "compression": 8, "bridge": {"num_latents": 3}})
    assert num_latents(cfg) == 3


def test_diversity_loss_is_one_for_identical_and_lower_for_distinct():
    same = torch.ones(4, 3, 8)
    assert diversity_loss(same).item() == pytest.approx(1.0)
    distinct = torch.eye(8)[:4].reshape(4, 1, 8).expand(4, 3, 8)
    assert diversity_loss(distinct).item() == pytest.approx(0.0, abs=1e-6)
    assert diversity_loss(torch.ones(1, 3, 8)).item() == 0.0


def test_input_standardisation_removes_a_shared_massive_dimension():
    """A huge dimension shared by every input must not drown the dimensions that differ."""
    bridge = make()
    torch.manual_seed(1)
    states = [torch.randn(7, 24) for _ in range(4)]
    for s in states:
        s[:, 0] += 1000.0  # a "massive activation", the same for every input
    bridge.set_input_stats(states)
    flat = torch.cat(states)
    standardised = (flat - bridge.in_mean) / bridge.in_std
    assert torch.allclose(standardised.mean(0), torch.zeros(24), atol=1e-4)
    assert torch.allclose(standardised.std(0), torch.ones(24), atol=1e-3)
    mask = torch.ones(2, 7, dtype=torch.long)
    out = bridge(torch.stack(states[:2]), mask)
    cos = torch.nn.functional.cosine_similarity(out[0].flatten(), out[1].flatten(), dim=0)
    assert cos < 0.99


def test_collapse_diagnostics_flag_a_constant_bridge():
    constant = torch.randn(1, 5, 40).expand(6, -1, -1)
    diag = collapse_diagnostics(constant, [1, 1, 1, -1, 1, 1])
    assert diag["soft_token_cosine_mean"] == pytest.approx(1.0, abs=1e-5) and diag["cosine_inputs"] == 6
    assert diag["predicted_classes"] == 1 and diag["single_class"]
    varied = make()(torch.randn(6, 11, 24), torch.ones(6, 11, dtype=torch.long))
    diag = collapse_diagnostics(varied, [0, 1, 0, 0, 1, 1])
    assert diag["soft_token_cosine_mean"] < 0.99 and diag["predicted_classes"] == 2 and not diag["single_class"]
    assert set(collapse_diagnostics(varied)) == {"soft_token_cosine_mean", "cosine_inputs"}  # generation tasks
