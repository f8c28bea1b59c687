"""The bridge: a Perceiver-style resampler from sender hidden states to receiver soft tokens.

    sender states [B, T, d_sender] --standardise, LayerNorm, in_proj--> [B, T, dim]
    M learned latent queries [M, dim]
    depth x (pre-LN cross-attention to the states, using the sender's padding mask
             -> pre-LN self-attention among latents -> pre-LN GELU MLP)
    --out_proj--> [B, M, d_receiver], each token rescaled to RMS 1 x a learnable scale
    initialised to the median RMS of the receiver's input-embedding rows         = f(x)
    reference normalisation (``bridge.reference_items`` = K > 0, the default):
    soft(x) = prompt + gain * (f(x) - mean_R f) / spread_R f

R is a fixed set of K training inputs drawn once per run (seeded); ``mean_R f`` [M, d] and
``spread_R f`` [M] (the RMS over R of f - mean_R f, per soft-token position) are recomputed from
R with the current weights at every forward, so gradients flow through them, and training and
test compute the same function (unlike BatchNorm's running statistics). ``prompt`` (a learned
soft prompt shared by every input) and ``gain`` start at R's own mean and spread, so the bridge
starts as f.

Why (benchmarks/README.md §3): early in training the receiver's label prior is wrong for every
input alike, so the soft tokens' gradient is mostly one shared direction. Adam moves every weight
by about lr along it, the parts of the resampler that every input shares (template tokens, the
sender's attention-sink token, biases) grow, and the per-token normalisations squeeze what differs
between inputs until every input gets the same soft tokens (one constant prompt: a collapse).
With the reference normalisation the input path is centred on R, so a shared gradient reaches
only ``prompt`` and ``gain``, and what differs between inputs keeps a fixed size relative to the
shared part: the receiver always sees the inputs' differences. Every term is a function of one
input and of R, so a micro-batch split changes nothing (the update of an effective batch is the
same for 1 x 16, 2 x 8 and 8 x 2). The output's direction at init matters too
(``bridge.init=text``): soft tokens that start as combinations of the receiver's embeddings of
tokens of the task's own texts sit where the receiver reads language, not noise.

The output RMS matters: a frozen receiver has only ever seen inputs of the size of its own
embeddings, and soft tokens far off that size are read as noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from telepathy import models
from telepathy.features import collate

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
        reference_items: int = 0,
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
        # the reference set R (``set_reference``): K training inputs, stored with the weights so a
        # checkpoint alone gives back the trained function; empty until set (a checkpoint's load
        # sizes them: ``_size_reference``)
        self.reference_items = int(reference_items)
        self._reference_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.reference_items:
            self.register_buffer("ref_states", torch.zeros(0, 0, sender_dim))
            self.register_buffer("ref_mask", torch.zeros(0, 0, dtype=torch.long))
            self.prompt = nn.Parameter(torch.zeros(num_latents, receiver_dim))
            self.gain = nn.Parameter(torch.ones(num_latents))
            self.register_load_state_dict_pre_hook(_size_reference)
        # centre_grad (an ablation, not the method: a gradient edit, and it depends on how a batch is
        # split into micro-batches): the part of the soft tokens' gradient that a micro-batch shares
        # trains one learned constant ``offset``; the input path gets only what differs (_CentreGrad).
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

    @torch.no_grad()
    def set_reference(self, states: list[torch.Tensor]) -> None:
        """Fix the reference set R to the given [T_i, d] training features (K of them), and start
        ``prompt`` and ``gain`` at R's mean and spread, so the bridge's function does not change."""
        if len(states) < 2:
            raise ValueError(f"the reference set needs at least 2 inputs, got {len(states)}")
        batch, mask = collate(list(states), self.in_mean.device)
        self.ref_states, self.ref_mask = batch, mask
        self._reference_cache = None
        mean, spread, _ = self._reference()
        self.prompt.copy_(mean)
        self.gain.copy_(spread)

    def tokens(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """f(x): the resampler's soft tokens before the reference normalisation, [B, M, receiver_dim]."""
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

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(mean_R f [M, d], spread_R f [M], f(R) [K, M, d] or None) with the current weights. With
        gradients (training) recomputed at every call; without (evaluation) once, until the module
        trains, moves or loads, and then without f(R)."""
        cached = not self.training and not torch.is_grad_enabled()
        if cached and self._reference_cache is not None:
            return (*self._reference_cache, None)
        if self.ref_states.shape[0] < 2:
            raise RuntimeError("the bridge's reference set is empty: call set_reference(...) or load a checkpoint")
        ref = self.tokens(self.ref_states, self.ref_mask)
        mean = ref.mean(0)
        spread = (ref - mean).pow(2).mean(dim=(0, 2)).add(1e-12).sqrt()
        if cached:
            self._reference_cache = (mean, spread)
        return mean, spread, ref

    def encode(self, states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(soft tokens of the inputs [B, M, d], soft tokens of R [K, M, d] or None).

        R's soft tokens (computed when gradients are on) are what the diversity term compares each
        input with (``reference_diversity``); None without a reference set or in evaluation.
        """
        soft = self.tokens(states, attention_mask)
        if not self.reference_items:
            return soft, None
        mean, spread, ref = self._reference()
        gain = (self.gain / spread)[:, None]
        reference = None if ref is None else self.prompt + gain * (ref - mean)
        return self.prompt + gain * (soft - mean), reference

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """states [B, T, sender_dim], attention_mask [B, T] (1 = real token) -> [B, M, receiver_dim]."""
        return self.encode(states, attention_mask)[0]

    def shared_part(self) -> torch.Tensor | None:
        """The input-independent part of every soft token sequence (``prompt`` or ``offset``), or None."""
        return self.prompt if self.reference_items else self.offset

    def train(self, mode: bool = True):
        self._reference_cache = None  # the weights may change: evaluation recomputes R's statistics
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._reference_cache = None  # .to(device / dtype)
        return super()._apply(fn, *args, **kwargs)


def _size_reference(module: PerceiverBridge, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook: give the (empty) reference buffers the stored shapes."""
    module._reference_cache = None
    for name in ("ref_states", "ref_mask"):
        stored = state_dict.get(prefix + name)
        if stored is not None:
            current = getattr(module, name)
            setattr(module, name, torch.empty(stored.shape, dtype=stored.dtype, device=current.device))


class _CentreGrad(torch.autograd.Function):
    """Identity forward; backward subtracts the batch mean of the gradient (over dim 0).

    The ``bridge.centre_grad`` ablation (the previous default): the shared part of the gradient
    trains ``offset``, a weight's gradient is the covariance of its features with the inputs' own
    gradients. Not a loss, and the mean is over each micro-batch, so the update depends on the split.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g - g.mean(0, keepdim=True)


INITS = ("text", "embeddings", "random")


@torch.no_grad()
def init_from_embeddings(bridge: PerceiverBridge, embedding_weight: torch.Tensor, scale: float, seed: int) -> None:
    """``bridge.init=embeddings``: point ``out_proj`` at the receiver's whole vocabulary.

    bias = the mean embedding row (as the model scales it); the ``dim`` weight columns = (rows drawn
    at random - mean) / sqrt(dim). Then out_proj(LayerNorm(latent)) is the mean embedding plus a
    combination of embedding deviations of a typical row's size. The mean is taken a chunk of rows
    at a time (a 128k x 4096 vocabulary is 2 GB in float32); the draw is seeded by the run's seed.
    """
    vocab, dim = embedding_weight.shape[0], bridge.out_proj.in_features
    total = torch.zeros(embedding_weight.shape[1], dtype=torch.float64, device=embedding_weight.device)
    for rows in embedding_weight.split(models.EMBEDDING_ROWS_PER_CHUNK):
        total += rows.double().sum(0)
    rows = torch.randint(vocab, (dim,), generator=torch.Generator().manual_seed(seed))
    _point_out_proj(bridge, embedding_weight, rows, (total / vocab).float(), scale)


@torch.no_grad()
def init_from_text(bridge: PerceiverBridge, embedding_weight: torch.Tensor, scale: float, token_ids, seed: int) -> None:
    """``bridge.init=text`` (default): point ``out_proj`` at the receiver's embeddings of the task's text.

    ``token_ids``: the receiver's tokens of training texts, every occurrence. bias = their mean
    embedding (so frequent tokens weigh more); the weight columns = embeddings of ``dim`` occurrences
    drawn at random (seeded) - that mean, / sqrt(dim). Every soft token then starts as a mix of
    words the task's texts use, where the receiver reads language; a random row of a 262k
    vocabulary is mostly a rare token or a script the task never shows.
    """
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("bridge.init=text needs training texts with at least one token")
    used, counts = ids.unique(return_counts=True)
    rows = embedding_weight[used.to(embedding_weight.device)].double()
    mean = (rows * counts.to(rows.device, rows.dtype)[:, None]).sum(0) / counts.sum()
    draw = torch.randint(ids.numel(), (bridge.out_proj.in_features,), generator=torch.Generator().manual_seed(seed))
    _point_out_proj(bridge, embedding_weight, ids[draw], mean.float(), scale)


def _point_out_proj(bridge: PerceiverBridge, embedding_weight: torch.Tensor, rows, mean: torch.Tensor, scale: float):
    """out_proj.bias = mean x scale; weight column k = (row rows[k] - mean) x scale / sqrt(dim)."""
    dim = bridge.out_proj.in_features
    drawn = embedding_weight[rows.to(embedding_weight.device)].float()
    weight = bridge.out_proj.weight
    weight.copy_(((drawn - mean) * scale / dim**0.5).T.to(weight.device, weight.dtype))
    bridge.out_proj.bias.copy_((mean * scale).to(weight.device, weight.dtype))


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


def reference_diversity(soft_tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The diversity term of the loss: mean cosine of each input's (flattened) soft tokens with the
    reference set's, [B] -> its mean over the batch.

    A per-input term (each input against the fixed R), so its gradient adds up over micro-batches
    exactly as one batch's does; an in-batch mean pairwise cosine (``diversity_loss``) would change
    with the split. 1 when every input gets R's soft tokens (a collapse); an input that is itself in
    R adds a cosine of 1 with itself, a constant without gradient.
    """
    flat = F.normalize(soft_tokens.flatten(1).float(), dim=-1)
    ref = F.normalize(reference.flatten(1).float(), dim=-1)
    return (flat @ ref.T).mean()


@torch.no_grad()
def collapse_diagnostics(
    soft_tokens: torch.Tensor, predicted: list[int] | None = None, shared: torch.Tensor | None = None
) -> dict:
    """How close a trained bridge is to one constant prompt, for result.json.

    A collapsed bridge sends (nearly) the same soft tokens for every input, so the
    receiver answers one class for every item; its accuracy is then the majority
    rate and could pass unnoticed into a table. ``soft_tokens`` [N, M, d] are the
    bridge's outputs for N held-out inputs; ``predicted`` the readout's label ids
    (-1: unparsed, ignored), None for generation tasks. ``shared``: the learned part every
    input gets (``PerceiverBridge.shared_part``: the prompt of the reference normalisation),
    whose size grows the cosine of whole soft tokens without saying anything of the input
    part; with it, the input part's own cosine and the shared part's RMS relative to it.
    """
    out = {"soft_token_cosine_mean": float(diversity_loss(soft_tokens)), "cosine_inputs": int(soft_tokens.shape[0])}
    if shared is not None:
        inputs = soft_tokens.float() - shared.float()
        out["input_cosine_mean"] = float(diversity_loss(inputs))
        out["shared_rms_ratio"] = float(shared.float().pow(2).mean().sqrt() / inputs.pow(2).mean().sqrt())
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
        reference_items=b.reference_items,
        centre_grad=b.centre_grad,
    )


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
