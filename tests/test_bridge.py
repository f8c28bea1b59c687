"""The bridge: shapes, padding mask, parameter counts, output scale, M from the compression factor."""

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import telepathy.bridge as bridge_module
from telepathy import models
from telepathy.bridge import PerceiverBridge, collapse_diagnostics, count_params, diversity_loss, init_from_embeddings
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


def test_a_large_shared_prompt_does_not_hide_what_the_inputs_differ_in():
    """The cosine of whole soft tokens rises with the shared prompt; the input part's does not."""
    inputs = torch.randn(6, 5, 40)
    for size in (0.1, 10.0):
        shared = size * torch.randn(5, 40)
        diag = collapse_diagnostics(inputs + shared, shared=shared)
        assert diag["input_cosine_mean"] == pytest.approx(
            collapse_diagnostics(inputs)["soft_token_cosine_mean"], abs=1e-5
        )
        assert diag["shared_rms_ratio"] == pytest.approx(size, rel=0.2)
    assert diag["soft_token_cosine_mean"] > 0.95  # size 10: whole tokens look alike, the inputs do not


def _vocabulary(rows=300, width=40, seed=0):
    """Embedding rows that share a strong common direction, as real vocabularies do."""
    gen = torch.Generator().manual_seed(seed)
    return 0.02 * (torch.randn(rows, width, generator=gen) + 1.5 * torch.randn(1, width, generator=gen))


def _cosine_to(out, direction):
    return torch.nn.functional.cosine_similarity(out.flatten(0, 1), direction.expand(out.shape[0] * out.shape[1], -1))


def test_embedding_init_makes_every_soft_token_look_like_a_receiver_embedding():
    """bridge.init=embeddings: before any training each soft token is the vocabulary's mean row plus a
    typical deviation, so its cosine to the mean is a typical row's (here about 0.8); PyTorch's
    default init gives isotropic tokens at cosine about 0 (the init that collapsed short runs)."""
    vocab = _vocabulary()
    mean = vocab.mean(0, keepdim=True)
    states, mask = torch.randn(6, 9, 24), torch.ones(6, 9, dtype=torch.long)
    typical = torch.nn.functional.cosine_similarity(vocab, mean.expand_as(vocab)).median()

    random_init = make()
    assert _cosine_to(random_init(states, mask), mean).abs().mean() < 0.3

    bridge = make()
    init_from_embeddings(bridge, vocab, scale=1.0, seed=1)
    cosine = _cosine_to(bridge(states, mask), mean)
    assert cosine.min() > 0.5 and abs(cosine.mean() - typical) < 0.15, (cosine, typical)
    torch.testing.assert_close(bridge.out_proj.bias, vocab.mean(0))


def test_embedding_init_is_seeded_scaled_and_streams_the_mean(monkeypatch):
    vocab = _vocabulary()
    whole = make()
    init_from_embeddings(whole, vocab, scale=2.0, seed=3)
    monkeypatch.setattr(models, "EMBEDDING_ROWS_PER_CHUNK", 7)  # 300 rows in 43 chunks
    chunked = make()
    init_from_embeddings(chunked, vocab, scale=2.0, seed=3)
    torch.testing.assert_close(chunked.out_proj.bias, whole.out_proj.bias)
    torch.testing.assert_close(chunked.out_proj.weight, whole.out_proj.weight)
    torch.testing.assert_close(whole.out_proj.bias, 2.0 * vocab.mean(0))  # rows as the model scales them
    other = make()
    init_from_embeddings(other, vocab, scale=2.0, seed=4)
    assert not torch.allclose(other.out_proj.weight, whole.out_proj.weight)


def test_centred_gradient_leaves_the_forward_alone_and_sends_the_shared_gradient_to_the_offset():
    """bridge.centre_grad: the same function (offset 0 at init), but a loss that pulls every input's
    soft tokens the same way (the receiver's prior) trains only the offset, never the input path."""
    states, mask = torch.randn(4, 7, 24), torch.ones(4, 7, dtype=torch.long)
    plain, centred = make(), make(centre_grad=True)
    torch.testing.assert_close(centred(states, mask), plain(states, mask))

    direction = torch.randn(5, 40)
    (centred(states, mask) * direction).sum().backward()  # the same pull on every input
    assert centred.offset.grad.abs().sum() > 0
    for name, p in centred.named_parameters():
        if name != "offset" and p.grad is not None:
            assert p.grad.abs().max() < 1e-5, name
    plain_direction = make()
    (plain_direction(states, mask) * direction).sum().backward()
    assert plain_direction.out_proj.weight.grad.abs().max() > 1e-3  # without it, every weight moves that way

    centred.zero_grad()
    per_input = torch.randn(4, 5, 40)  # pulls that differ between inputs reach the weights
    (centred(states, mask) * per_input).sum().backward()
    assert centred.out_proj.weight.grad.abs().max() > 1e-3


def test_embedding_rms_median_reads_the_rows_a_chunk_at_a_time(monkeypatch):
    """The soft-token scale of the other readers: the median row RMS, as the model scales rows,
    the same whether the matrix is read whole or in chunks (a 128k x 4096 float32 copy is 2 GB)."""
    from telepathy.models import embedding_rms_median

    embedding = torch.nn.Embedding.from_pretrained(_vocabulary().to(torch.bfloat16))
    embedding.embed_scale = torch.tensor(3.0)  # as Gemma's scaled embedding layer carries it
    model = SimpleNamespace(get_input_embeddings=lambda: embedding)
    expected = float(embedding.weight.float().pow(2).mean(1).sqrt().median()) * 3.0
    monkeypatch.setattr(models, "EMBEDDING_ROWS_PER_CHUNK", 7)
    assert embedding_rms_median(model) == pytest.approx(expected)


def _reference_bridge(k=6, **kw):
    bridge = make(reference_items=k, **kw)
    torch.manual_seed(1)
    states = [torch.randn(4 + i % 3, 24) for i in range(k)]
    bridge.set_reference(states)
    return bridge, states


def test_the_reference_set_starts_as_the_plain_bridge_and_centres_the_input_path():
    bridge, states = _reference_bridge()
    x, mask = torch.randn(3, 7, 24), torch.ones(3, 7, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(bridge(x, mask), bridge.tokens(x, mask), atol=1e-5)  # prompt, gain = R's mean, spread
        bridge.prompt.add_(0.5)
        bridge.gain.mul_(2.0)
        ref = bridge.tokens(bridge.ref_states, bridge.ref_mask)
        mean, spread = ref.mean(0), (ref - ref.mean(0)).pow(2).mean(dim=(0, 2)).sqrt()
        want = bridge.prompt + (bridge.gain / spread)[:, None] * (bridge.tokens(x, mask) - mean)
        assert torch.allclose(bridge(x, mask), want, atol=1e-5)
        assert torch.allclose(bridge(bridge.ref_states, bridge.ref_mask).mean(0), bridge.prompt, atol=1e-5)


def test_a_gradient_shared_by_every_input_trains_only_the_prompt():
    """The cause of the collapse: a shared gradient moving the weights every input shares. With the
    reference set, a loss that pushes every soft token the same way reaches only prompt and gain."""
    bridge, _ = _reference_bridge()
    bridge.train()
    x, mask = bridge.ref_states, bridge.ref_mask  # the reference set itself: its mean is exactly R's
    direction = torch.randn(5, 40)
    (bridge(x, mask) * direction).sum().backward()
    assert bridge.prompt.grad.abs().sum() > 0
    for name, p in bridge.named_parameters():
        if name not in ("prompt", "gain") and p.grad is not None:
            assert p.grad.abs().max() < 1e-4, name


def test_evaluation_caches_the_reference_statistics_and_recomputes_after_training():
    bridge, _ = _reference_bridge()
    x, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        bridge(x, mask)
        cached = bridge._reference_cache
        assert cached is not None
        bridge.out_proj.weight.mul_(1.5)  # evaluation does not change weights: the statistics are kept ...
        bridge(x, mask)
        assert bridge._reference_cache is cached
        bridge.train().eval()  # ... until the module trains (or loads, or moves) again
        assert bridge._reference_cache is None
        bridge(x, mask)
        assert not torch.allclose(bridge._reference_cache[0], cached[0])
    with torch.enable_grad():
        bridge.train()
        trained = bridge(x, mask)
    assert torch.allclose(trained.detach(), bridge.eval()(x, mask), atol=1e-5)  # one function in training and test


def test_a_checkpoint_alone_gives_back_the_trained_function(tmp_path):
    from telepathy.training import load_trainable, save_checkpoint

    bridge, _ = _reference_bridge()
    with torch.no_grad():
        bridge.prompt.add_(torch.randn_like(bridge.prompt))
    opt = torch.optim.AdamW(bridge.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    from telepathy.training import DataStream

    folder = save_checkpoint(tmp_path, bridge, opt, sched, DataStream(4, 2, 0), 1)
    fresh = make(reference_items=6)  # empty reference set: the load sizes it
    load_trainable(fresh, folder)
    x, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x, mask), bridge.eval()(x, mask), atol=1e-6)


def test_a_bridge_without_its_reference_set_refuses_to_run():
    with pytest.raises(RuntimeError, match="reference set is empty"):
        make(reference_items=4)(torch.randn(1, 3, 24), torch.ones(1, 3, dtype=torch.long))


def test_reference_diversity_is_each_inputs_mean_cosine_with_the_reference_set():
    from telepathy.bridge import reference_diversity

    ref = torch.randn(4, 2, 3)
    assert reference_diversity(ref[:1].expand(4, 2, 3), ref[:1].expand(4, 2, 3)).item() == pytest.approx(1.0)
    soft = torch.randn(3, 2, 3)
    flat = torch.nn.functional.normalize(soft.flatten(1), dim=-1)
    want = (flat @ torch.nn.functional.normalize(ref.flatten(1), dim=-1).T).mean()
    assert reference_diversity(soft, ref).item() == pytest.approx(want.item())
    # a per-input term: the batch's value is the mean of its parts' values
    halves = [reference_diversity(soft[:1], ref), reference_diversity(soft[1:], ref)]
    assert reference_diversity(soft, ref).item() == pytest.approx((halves[0] + 2 * halves[1]).item() / 3)


def test_text_init_points_the_output_at_the_task_texts_token_embeddings():
    from telepathy.bridge import init_from_text

    bridge = make()
    emb = torch.randn(100, 40)
    ids = [3, 3, 3, 7, 9, 9]  # every occurrence: 3 weighs three times
    init_from_text(bridge, emb, 2.0, ids, seed=5)
    mean = (3 * emb[3] + emb[7] + 2 * emb[9]) / 6
    assert torch.allclose(bridge.out_proj.bias, 2.0 * mean, atol=1e-5)
    columns = bridge.out_proj.weight.T * bridge.out_proj.in_features**0.5 / 2.0 + mean  # each a drawn text token's row
    for col in columns:
        assert min((col - emb[i]).abs().max() for i in (3, 7, 9)) < 1e-4
    again = make()
    init_from_text(again, emb, 2.0, ids, seed=5)
    assert torch.equal(again.out_proj.weight, bridge.out_proj.weight)


@pytest.mark.parametrize("ablation", [False, True])
def test_an_effective_batch_gives_one_gradient_however_it_is_split(tiny_models, ablation):
    """1 x 16, 2 x 8 and 8 x 2: the bridge's loss (class cross-entropy + the diversity term, λ=0.1)
    through ``training.accumulate_gradients``, as ``fit`` runs it. The previous default (the centred
    gradient, in-batch diversity) fails this; it stays as the ``bridge.centre_grad`` ablation."""
    from helpers import TINY, compose
    from telepathy.data import Example
    from telepathy.features import encode, sender_prompts
    from telepathy.methods.bridge import SoftPrompts, reference_set
    from telepathy.prompting import PromptIO, task_targets
    from telepathy.training import accumulate_gradients

    sender, receiver = tiny_models
    extra = ["bridge.init=embeddings", "bridge.reference_items=0", "bridge.centre_grad=true"] if ablation else []
    cfg = compose(*TINY, "trainer.diversity_weight=0.1", *extra)
    words = ["good", "bad", "fine", "awful", "great", "dull", "nice", "poor"]
    items = [Example(i, f"a {words[i % 8]} film, {i} minutes", label=i % 2) for i in range(20)]
    feats = encode(sender, sender_prompts(sender, items, cfg.task.prompt, 16), [1])[1]
    io = PromptIO(receiver)
    torch.manual_seed(0)
    bridge = bridge_module.build_bridge(cfg, sender.hidden_size, receiver.hidden_size, 4, target_rms=1.0)
    bridge.set_input_stats(feats)
    if cfg.bridge.reference_items:
        bridge.set_reference([feats[ex.idx] for ex in reference_set(items, cfg)])
    bridge.train()
    soft = SoftPrompts(bridge, io, io.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt), cfg)
    targets = task_targets(io, items, cfg.task)
    batch = list(range(2, 18))

    def loss_fn(indices):
        return soft.loss(feats, [items[i] for i in indices], [targets[i] for i in indices])

    grads = []
    for size in (16, 8, 2):
        bridge.zero_grad()
        stats = accumulate_gradients(loss_fn, [batch[i : i + size] for i in range(0, 16, size)])
        grads.append((torch.cat([p.grad.flatten() for p in bridge.parameters() if p.grad is not None]), stats))
    (whole, whole_stats), *splits = grads
    for grad, stats in splits:
        relative = ((grad - whole).norm() / whole.norm()).item()
        if ablation:
            assert relative > 0.05  # the centred gradient (and the in-batch diversity) depend on the split
        else:
            assert stats["loss"] == pytest.approx(whole_stats["loss"], rel=1e-5)
            assert relative < 1e-4, relative
