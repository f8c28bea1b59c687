"""How any model reads a prompt made of text and soft tokens, and how its answer is read out.

A *sequence* is a list of parts: ``str`` (text, tokenised without special tokens),
``list[int]`` (token ids, e.g. a label verbaliser) or a float tensor ``[M, d]``
(soft tokens, already in the model's embedding space). ``PromptIO.embed`` turns a
batch of sequences into ``inputs_embeds`` + ``attention_mask``; the model's own BOS
token (when its tokenizer adds one) or its chat template frames every sequence.

Readouts:
* ``score_labels``: log-likelihood of each label verbaliser after the prompt, argmax.
  The prompt is encoded once: every label's first token is read at its last position, and the
  further tokens of multi-token verbalisers (Mistral's SentencePiece splits " abbreviation" into
  4 pieces) continue from the prompt's KV cache in one more pass over all labels at once, so the
  prompt is never encoded again per label (``label_scores_per_label`` is the old K-pass path,
  kept as the reference the tests and ``benchmarks/label_scoring.py`` compare with).
* ``generate`` + ``parse_label``: greedy text, then a strict parser that accepts an
  output only if it starts with exactly one label (case-insensitive).
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F

from telepathy.data import DataError
from telepathy.models import LoadedModel

SOFT = "<<telepathy-soft-tokens>>"  # placeholder for the soft tokens in a prompt template
# where soft tokens sit in the receiver's prompt (``bridge.placement``; the bridge and prompt tuning)
LAYOUTS = {
    "primer_soft_prompt": "{primer}{soft}{answer}",
    "soft_primer_prompt": "{soft}{primer}{answer}",
    "primer_prompt_soft": "{primer}{answer}{soft}",
}
PLACEMENTS = tuple(LAYOUTS)


class PromptTooLong(DataError):
    """A prompt longer than the model can read; the message names the key that caps texts."""


class PromptIO:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.tok = lm.tokenizer
        self.model = lm.model
        self.embed_layer = self.model.get_input_embeddings()
        # BOS as the tokenizer would add it (Gemma: <bos>; SmolLM2: none)
        self.prefix_ids = [] if lm.chat_template else self.tok("", add_special_tokens=True).input_ids
        text_cfg = self.model.config.get_text_config()
        self.softcap = getattr(text_cfg, "final_logit_softcapping", None)
        self._ids_cache: dict[str, list[int]] = {}

    # --- prompt templates ---------------------------------------------------------
    def frame(self, content: str) -> list[str]:
        """Split a user-message template at SOFT into text pieces, applying the chat
        template when the model uses one. Returns ``[before, after]`` (or ``[text]``)."""
        if self.lm.chat_template:
            content = self.lm.apply_chat(content, tokenize=False)
        return content.split(SOFT)

    def soft_prompt(self, primer: str, answer_prompt: str, placement: str = "primer_soft_prompt") -> list:
        """A template with the soft tokens placed as configured (``bridge.placement``)."""
        pieces = self.frame(LAYOUTS[placement].format(primer=primer, soft=SOFT, answer=answer_prompt))
        return [pieces[0], SOFT, pieces[1]]

    @staticmethod
    def fill(template: list, soft: torch.Tensor) -> list:
        return [soft if part is SOFT or part == SOFT else part for part in template]

    def ids(self, text: str) -> list[int]:
        if text not in self._ids_cache:
            self._ids_cache[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._ids_cache[text]

    # --- embedding ----------------------------------------------------------------
    def _part_embeds(self, part, device) -> torch.Tensor:
        if isinstance(part, torch.Tensor):
            return part
        ids = self.ids(part) if isinstance(part, str) else list(part)
        if not ids:
            return self.embed_layer.weight.new_zeros(0, self.embed_layer.weight.shape[1])
        return self.embed_layer(torch.tensor(ids, device=device))

    def _part_len(self, part) -> int:
        return (
            part.shape[0] if isinstance(part, torch.Tensor) else len(self.ids(part) if isinstance(part, str) else part)
        )

    def check_context(self, sequences: list[list], extra: int = 0) -> None:
        """Refuse (``PromptTooLong``) a batch whose longest sequence, plus ``extra`` tokens to be
        generated, exceeds the model's context (``max_position_embeddings``), before anything is
        allocated for it: an uncapped text (``task.max_text_words=null``) of 100,000 words would
        otherwise ask for a 10 GB attention mask."""
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if not context:
            return
        prefix = len(self.prefix_ids)
        longest = max((prefix + sum(self._part_len(p) for p in seq) for seq in sequences), default=0)
        if longest + extra > context:
            raise PromptTooLong(
                f"task.max_text_words: a prompt of {longest + extra} tokens is longer than {self.lm.name}'s context "
                f"({context} tokens, max_position_embeddings); allowed: a word cap (task.max_text_words=N) "
                f"that keeps every prompt within it"
            )

    def embed(self, sequences: list[list], pad_side: str = "right"):
        """Embed a batch of sequences. Returns (inputs_embeds [B, L, d], attention_mask [B, L], lengths)."""
        self.check_context(sequences)
        device = self.embed_layer.weight.device
        prefix = [self.prefix_ids] if self.prefix_ids else []
        rows = [torch.cat([self._part_embeds(p, device).to(device) for p in prefix + list(seq)]) for seq in sequences]
        lengths = [r.shape[0] for r in rows]
        width = max(lengths)
        dtype = self.embed_layer.weight.dtype
        embeds = torch.zeros(len(rows), width, rows[0].shape[1], device=device, dtype=dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            span = slice(0, lengths[i]) if pad_side == "right" else slice(width - lengths[i], width)
            embeds[i, span] = row.to(dtype)
            mask[i, span] = 1
        return embeds, mask, lengths

    # --- forward pieces -----------------------------------------------------------
    def hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states, with position ids that ignore padding on either side."""
        return self._decode(embeds, mask)[0]

    def _decode(self, embeds: torch.Tensor, mask: torch.Tensor, position_ids=None, cache=None, keep_cache=False):
        """(final hidden states, KV cache or None) of the decoder; ``cache``: a prompt's cache to continue from
        (``mask`` then covers the cached positions and the new ones)."""
        if position_ids is None:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        decoder = self.model.get_decoder()
        kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}
        if cache is not None:
            kwargs[_cache_argument(decoder)] = cache
        out = decoder(**kwargs, use_cache=keep_cache or cache is not None)
        kept = (out["cache"] if "cache" in out else out.get("past_key_values")) if keep_cache else None
        return out.last_hidden_state, kept

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits for selected hidden rows only: the 262k-word head of Gemma
        costs more than its body, so we never apply it to every position."""
        logits = self.model.get_output_embeddings()(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def continuation_logprobs(self, prefixes: list[list], continuations: list[list[int]]) -> list[torch.Tensor]:
        """Per-token log p(continuation | prefix) for each example (one forward pass)."""
        seqs = [list(p) + [c] for p, c in zip(prefixes, continuations)]
        embeds, mask, lengths = self.embed(seqs, pad_side="right")
        h = self.hidden(embeds, mask)
        rows, cols, targets = [], [], []
        for i, (n, cont) in enumerate(zip(lengths, continuations)):
            start = n - len(cont)  # first continuation position; predicted from start-1
            rows += [i] * len(cont)
            cols += list(range(start - 1, n - 1))
            targets += list(cont)
        logp = F.log_softmax(self.logits(h[rows, cols]), dim=-1)
        token_logp = logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)]
        return list(token_logp.split([len(c) for c in continuations]))

    def label_loss(self, prefixes: list[list], label_ids: list[list[int]]) -> torch.Tensor:
        """Cross-entropy on the label tokens only (mean over label tokens of the batch)."""
        return -torch.cat(self.continuation_logprobs(prefixes, label_ids)).mean()

    def label_scores(self, prefixes: list[list], label_ids: list[list[int]]) -> torch.Tensor:
        """[B, K] summed log-likelihood of each label's verbaliser after each prefix (differentiable).

        One encoding of each prompt: the first token of every label is scored at the prompt's last
        position; the later tokens of the multi-token labels are one more pass over all of them
        at once, continuing from the prompt's KV cache (gradients reach the soft tokens through
        the cache). Equal to ``label_scores_per_label`` (float summation order aside)."""
        embeds, mask, lengths = self.embed(prefixes, pad_side="right")
        multi = [k for k, ids in enumerate(label_ids) if len(ids) > 1]
        if multi and not self._cache_continues(mask.shape[1] + max(len(label_ids[k]) for k in multi)):
            return self.label_scores_per_label(prefixes, label_ids)
        h, cache = self._decode(embeds, mask, keep_cache=bool(multi))
        ends = torch.tensor(lengths, device=h.device)
        last = h[torch.arange(len(prefixes), device=h.device), ends - 1]
        scores = F.log_softmax(self.logits(last), dim=-1)[:, [ids[0] for ids in label_ids]]
        if not multi:
            return scores
        rest = self._continuation_logprobs(cache, mask, ends, [label_ids[k] for k in multi])
        return scores.index_add(1, torch.tensor(multi, device=scores.device), rest.to(scores.dtype))

    def _continuation_logprobs(self, cache, mask: torch.Tensor, ends: torch.Tensor, labels: list[list[int]]):
        """[B, K'] log p(tokens 2.. of each of K' labels | prompt, the label's earlier tokens): the B
        prompts' cache repeated K' times, each copy reading one label's tokens but its last."""
        n, k = mask.shape[0], len(labels)
        width = max(len(ids) for ids in labels) - 1
        device = mask.device
        ids = torch.zeros(k, width, dtype=torch.long, device=device)
        keep = torch.zeros(k, width, dtype=mask.dtype, device=device)
        rows, cols, targets = [], [], []
        for j, label in enumerate(labels):
            ids[j, : len(label) - 1] = torch.tensor(label[:-1], device=device)
            keep[j, : len(label) - 1] = 1
            for t in range(1, len(label)):
                rows.append(j)
                cols.append(t - 1)
                targets.append(label[t])
        cache.batch_repeat_interleave(k)
        embeds = self.embed_layer(ids).unsqueeze(0).expand(n, -1, -1, -1).reshape(n * k, width, -1)
        full_mask = torch.cat([mask.repeat_interleave(k, 0), keep.repeat(n, 1)], dim=1)
        positions = ends.repeat_interleave(k)[:, None] + torch.arange(width, device=device)[None]
        h, _ = self._decode(embeds, full_mask, position_ids=positions, cache=cache)
        flat_rows = (torch.arange(n, device=device)[:, None] * k + torch.tensor(rows, device=device)[None]).reshape(-1)
        flat_cols = torch.tensor(cols, device=device).repeat(n)
        logp = F.log_softmax(self.logits(h[flat_rows, flat_cols]), dim=-1)
        token_logp = logp[torch.arange(len(flat_rows), device=device), torch.tensor(targets, device=device).repeat(n)]
        return torch.zeros(n * k, device=device, dtype=token_logp.dtype).index_add(0, flat_rows, token_logp).view(n, k)

    def _cache_continues(self, length: int) -> bool:
        """Can a continuation read the right-padded prompt's cache as one sequence? Not once a sliding
        window (Gemma 3's local layers, Mistral v0.1) is shorter than padded prompt + label: those layers
        count distance in cache slots, padding included (the per-label path is then used, exactly)."""
        text_cfg = self.model.config.get_text_config()
        window = getattr(text_cfg, "sliding_window", None)
        types = getattr(text_cfg, "layer_types", None)
        sliding = window and (types is None or "sliding_attention" in types)
        return not sliding or length <= int(window)

    def label_scores_per_label(self, prefixes: list[list], label_ids: list[list[int]]) -> torch.Tensor:
        """``label_scores`` the old way: one receiver pass over prompt + label per label (K passes when a
        verbaliser has several tokens). The reference the one-pass scorer is tested and timed against."""
        per_label = [
            torch.stack([lp.sum() for lp in self.continuation_logprobs(prefixes, [ids] * len(prefixes))])
            for ids in label_ids
        ]
        return torch.stack(per_label, dim=1)

    @torch.no_grad()
    def score_labels(self, prefixes: list[list], label_ids: list[list[int]]) -> torch.Tensor:
        """``label_scores`` without gradients, on the CPU: what the score readout decides on."""
        return self.label_scores(prefixes, label_ids).cpu()

    def class_loss(self, prefixes: list[list], label_ids: list[list[int]], labels: list[int]) -> torch.Tensor:
        """Cross-entropy over the K label verbalisers' log-likelihoods: the score readout's own decision.

        Unlike ``label_loss`` (the label tokens against the whole vocabulary) it has no part that
        every input shares at the start of training ("answer with a label word at all"), which pushed
        every input's soft tokens the same way until they collapsed to one constant prompt.
        """
        scores = self.label_scores(prefixes, label_ids)
        return F.cross_entropy(scores, torch.tensor(labels, device=scores.device))

    @torch.no_grad()
    def generate(
        self, sequences: list[list], max_new_tokens: int, num_beams: int = 1, repetition_penalty: float = 1.0
    ) -> list[str]:
        """Greedy (or beam) continuation of each sequence, decoded without special tokens."""
        self.check_context(sequences, extra=max_new_tokens)
        embeds, mask, _ = self.embed(sequences, pad_side="left")
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            pad_token_id=self.tok.pad_token_id,
        )
        return [self.tok.decode(row, skip_special_tokens=True) for row in out]


def _cache_argument(decoder) -> str:
    """The decoder's KV-cache keyword: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def label_token_ids(io: PromptIO, labels: list[str], prefix: str = " ") -> list[list[int]]:
    """Token ids of each label verbaliser as it follows the answer prompt."""
    ids = [io.ids(prefix + label) for label in labels]
    if len({tuple(i) for i in ids}) != len(ids):
        raise ValueError(f"label verbalisers {labels} tokenise to identical ids for {io.lm.name}")
    return ids


def classification_targets(io: PromptIO, examples, task_cfg) -> list[list[int]]:
    """Each example's label verbaliser token ids: the loss scores the label only."""
    label_ids = label_token_ids(io, list(task_cfg.labels), task_cfg.label_prefix)
    return [label_ids[ex.label] for ex in examples]


def generation_targets(io: PromptIO, examples, task_cfg) -> list[list[int]]:
    """Each example's reference tokens (at most ``max_target_tokens`` with EOS) after the answer prompt.

    EOS ends every target so the receiver learns where to stop; the summary is tokenised
    with ``target_prefix`` as it follows the answer prompt.
    """
    keep = task_cfg.max_target_tokens - 1
    return [io.ids(task_cfg.target_prefix + ex.target)[:keep] + [io.tok.eos_token_id] for ex in examples]


def task_targets(io: PromptIO, examples, task_cfg) -> list[list[int]]:
    """The tokens a trained method's loss scores after the prompt, for the task's type."""
    fn = generation_targets if task_cfg.type == "generation" else classification_targets
    return fn(io, examples, task_cfg)


def parse_label(text: str, labels: list[str]) -> int:
    """Strict parser: the label the output's first line starts with, or -1.

    -1 also when that line names any other label too ("positive or negative"):
    an answer that hedges between labels is not an answer.
    """
    line = text.strip().split("\n")[0].lower()
    named = [k for k, label in enumerate(labels) if re.search(r"\b" + re.escape(label.lower()) + r"\b", line)]
    if len(named) == 1 and re.match(re.escape(labels[named[0]].lower()) + r"\b", line):
        return named[0]
    return -1
