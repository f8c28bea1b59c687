"""The bridge: a Perceiver-style resampler from sender hidden states to receiver soft tokens.

    sender states [B, T, d_sender] --LayerNorm, in_proj--> [B, T, dim]
    M learned latent queries [M, dim]
    depth x (pre-LN cross-attention to the states, using the sender's padding mask
             -> pre-LN self-attention among latents -> pre-LN GELU MLP)
    --out_proj--> [B, M, d_receiver], then each token rescaled to RMS 1 x a learnable
    scale initialised to the median RMS of the receiver's input-embedding rows.

The output RMS matters: a frozen receiver has only ever seen inputs of the size of
its own embeddings, and soft tokens far off that size are read as noise. So does the
output's direction at init (``init_from_embeddings``, ``bridge.init=embeddings``):
isotropic random soft tokens put some seeds' receivers where the class margin is
very sharp (gradient norms in the hundreds), and soft tokens that start as typical
embeddings of the receiver's own vocabulary avoid that. With the centred gradient
(``bridge.centre_grad``, below) 60-step runs learn on every seed and thread count
tried (benchmarks/README.md §3); either alone did not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STATS_CHUNK_VALUES = 2**19  # feature values per step of the streaming input statistics (4 MB in float64)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, latents: torch.Tensor, context: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        ctx = self.norm_context(context)
        q = self.norm_latents(latents)
        latents = latents + self.cross_attn(q, ctx, ctx, key_padding_mask=pad_mask, need_weights=False)[0]
        q = self.norm_self(latents)
        latents = latents + self.self_attn(q, q, q, need_weights=False)[0]
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverBridge(nn.Module):
    def __init__(
        self,
        sender_dim: int,
        receiver_dim: int,
        num_latents: int,
        dim: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        target_rms: float = 1.0,
        centre_grad: bool = False,
    ):
        super().__init__()
        self.num_latents = num_latents
        # LLM hidden states carry a few huge "massive activation" dimensions that are the
        # same for every input. LayerNorm alone divides by a std those dimensions dominate,
        # shrinking everything else, so every input looks alike. Standardising each
        # dimension with statistics of the training features first fixes that
        # (``set_input_stats``; buffers, recomputed from the same features on resume).
        self.register_buffer("in_mean", torch.zeros(sender_dim))
        self.register_buffer("in_std", torch.ones(sender_dim))
        self.in_norm = nn.LayerNorm(sender_dim)
        self.in_proj = nn.Linear(sender_dim, dim)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim**-0.5)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, receiver_dim)
        self.scale = nn.Parameter(torch.tensor(float(target_rms)))
        # centre_grad: the part of the soft tokens' gradient that a batch shares (the receiver's
        # class prior, "say any label word") trains one learned constant ``offset``; the input
        # path gets only what differs between the batch's inputs (_CentreGrad). The forward is
        # unchanged (soft tokens + offset), so nothing differs between training and test.
        self.centre_grad = centre_grad
        self.offset = nn.Parameter(torch.zeros(num_latents, receiver_dim)) if centre_grad else None

    @torch.no_grad()
    def set_input_stats(self, states) -> None:
        """Per-dimension mean and (unbiased) std over every token of the given [T_i, d] feature tensors.

        ``states`` is any sequence, e.g. a ``features.FeatureFile`` read from disk: one
        streaming pass, about ``STATS_CHUNK_VALUES`` values at a time, merged in float64
        (Chan et al.), so the statistics of a training set larger than RAM never hold it all.
        """
        count, mean, m2 = 0, None, None
        for chunk in _chunks(states, STATS_CHUNK_VALUES):
            n = chunk.shape[0]
            c_mean = chunk.mean(0)
            c_m2 = (chunk - c_mean).pow(2).sum(0)
            if mean is None:
                count, mean, m2 = n, c_mean, c_m2
                continue
            delta = c_mean - mean
            total = count + n
            mean = mean + delta * n / total
            m2 = m2 + c_m2 + delta.pow(2) * count * n / total
            count = total
        self.in_mean.copy_(mean.float())
        self.in_std.copy_((m2 / max(count - 1, 1)).sqrt().float().clamp(min=1e-4))

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """states [B, T, sender_dim], attention_mask [B, T] (1 = real token) -> [B, M, receiver_dim]."""
        pad_mask = attention_mask == 0
        standardised = (states.float() - self.in_mean) / self.in_std
        context = self.in_proj(self.in_norm(standardised))
        latents = self.latents.unsqueeze(0).expand(states.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, context, pad_mask)
        out = self.out_proj(self.out_norm(latents))
        rms = out.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
        soft = out / rms * self.scale
        if self.centre_grad:
            soft = _CentreGrad.apply(soft) + self.offset
        return soft


class _CentreGrad(torch.autograd.Function):
    """Identity forward; backward subtracts the batch mean of the gradient (over dim 0).

    Why: every Adam step moves every weight by about lr along the batch-shared gradient, and
    the per-token RMS normalisation then squeezes out what differs between inputs; in 60-step
    runs that made the soft tokens one constant prompt (cosine 0.999 across inputs) on 2 of 5
    seeds. With the shared part routed to ``offset``, a weight's gradient is the covariance of
    its features with the inputs' own gradients: it moves only to tell inputs apart.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g - g.mean(0, keepdim=True)


INITS = ("embeddings", "random")
EMBEDDING_ROWS_PER_CHUNK = 2**15  # rows of the receiver's embedding matrix averaged at a time


@torch.no_grad()
def init_from_embeddings(bridge: PerceiverBridge, embedding_weight: torch.Tensor, scale: float, seed: int) -> None:
    """Point ``out_proj`` at the receiver's own input embeddings (as the model scales them).

    bias = the mean embedding row; the ``dim`` weight columns = (rows drawn at random - mean) /
    sqrt(dim). Then out_proj(LayerNorm(latent)) is the mean embedding plus a combination of
    embedding deviations of a typical row's size: every soft token starts as a plausible input
    of the receiver, whatever the latent. The mean is taken a chunk of rows at a time (a
    128k x 4096 vocabulary is 2 GB in float32); the draw is seeded by the run's seed.
    """
    vocab, dim = embedding_weight.shape[0], bridge.out_proj.in_features
    total = torch.zeros(embedding_weight.shape[1], dtype=torch.float64, device=embedding_weight.device)
    for start in range(0, vocab, EMBEDDING_ROWS_PER_CHUNK):
        total += embedding_weight[start : start + EMBEDDING_ROWS_PER_CHUNK].double().sum(0)
    mean = (total / vocab).float() * scale
    rows = torch.randint(vocab, (dim,), generator=torch.Generator().manual_seed(seed))
    drawn = embedding_weight[rows.to(embedding_weight.device)].float() * scale
    weight = bridge.out_proj.weight
    weight.copy_(((drawn - mean) / dim**0.5).T.to(weight.device, weight.dtype))
    bridge.out_proj.bias.copy_(mean.to(weight.device, weight.dtype))


def _chunks(states, values: int):
    """Consecutive [T_i, d] tensors of ``states`` concatenated into float64 chunks of about ``values`` values."""
    parts, size = [], 0
    for i in range(len(states)):
        part = states[i]
        if part.numel() == 0:
            continue
        parts.append(part)
        size += part.numel()
        if size >= values:
            yield torch.cat(parts).double()
            parts, size = [], 0
    if parts:
        yield torch.cat(parts).double()


def diversity_loss(soft_tokens: torch.Tensor) -> torch.Tensor:
    """Penalise soft tokens that are the same for every input of a batch.

    Mean pairwise cosine similarity between the (flattened) soft-token sequences of
    different examples; 0 for a batch of one. A bridge that collapses to one
    constant prompt scores the majority class and this loss is then 1.
    """
    b = soft_tokens.shape[0]
    if b < 2:
        return soft_tokens.new_zeros(())
    flat = F.normalize(soft_tokens.flatten(1).float(), dim=-1)
    sim = flat @ flat.T
    off_diag = sim.sum() - sim.diagonal().sum()
    return off_diag / (b * (b - 1))


@torch.no_grad()
def collapse_diagnostics(soft_tokens: torch.Tensor, predicted: list[int] | None = None) -> dict:
    """How close a trained bridge is to one constant prompt, for result.json.

    A collapsed bridge sends (nearly) the same soft tokens for every input, so the
    receiver answers one class for every item; its accuracy is then the majority
    rate and could pass unnoticed into a table. ``soft_tokens`` [N, M, d] are the
    bridge's outputs for N held-out inputs; ``predicted`` the readout's label ids
    (-1: unparsed, ignored), None for generation tasks.
    """
    out = {"soft_token_cosine_mean": float(diversity_loss(soft_tokens)), "cosine_inputs": int(soft_tokens.shape[0])}
    if predicted is not None:
        classes = len({p for p in predicted if p >= 0})
        out.update(predicted_classes=classes, single_class=classes <= 1)
    return out


def build_bridge(cfg, sender_dim: int, receiver_dim: int, num_latents: int, target_rms: float) -> PerceiverBridge:
    b = cfg.bridge
    return PerceiverBridge(
        sender_dim=sender_dim,
        receiver_dim=receiver_dim,
        num_latents=num_latents,
        dim=b.dim,
        depth=b.depth,
        heads=b.heads,
        mlp_ratio=b.mlp_ratio,
        dropout=b.dropout,
        target_rms=target_rms,
        centre_grad=b.centre_grad,
    )


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
