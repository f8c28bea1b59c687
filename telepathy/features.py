"""Hidden states of the frozen sender.

``encode`` runs the sender over formatted task prompts and returns, for each
requested ``hidden_states`` index, one ``[T_i, d]`` tensor per example (padding
removed). Blocks above the highest requested layer are skipped: a forward hook
captures each needed block output and stops the pass early.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from telepathy.data import Example, batches, format_prompt
from telepathy.models import LoadedModel

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def sender_prompts(lm: LoadedModel, examples: list[Example], template: str, max_tokens: int) -> list[list[int]]:
    """Token ids of each example's sender prompt, at most ``max_tokens`` long.

    Long inputs are cut inside the text, so the instruction after it (for example
    ``Sentiment (positive or negative):``) survives truncation.
    """
    tok = lm.tokenizer

    def render(text: str) -> list[int]:
        prompt = format_prompt(template, text)
        if lm.chat_template:
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
        return tok(prompt).input_ids

    out = []
    for ex in examples:
        ids = render(ex.text)
        if len(ids) > max_tokens:
            overflow = len(ids) - max_tokens
            text_ids = tok(ex.text, add_special_tokens=False).input_ids
            keep = max(len(text_ids) - overflow - 2, 1)  # -2: re-tokenisation at the cut can add tokens
            ids = render(tok.decode(text_ids[:keep]))[:max_tokens]
        out.append(ids)
    return out


def _decoder_parts(model):
    decoder = model.get_decoder()
    return decoder.embed_tokens, list(decoder.layers), decoder.norm


@torch.no_grad()
def hidden_states(lm: LoadedModel, ids: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """One padded batch → {layer: [B, T, d]} for non-negative ``hidden_states`` indices."""
    embed, blocks, norm = _decoder_parts(lm.model)
    n = len(blocks)
    captured: dict[int, torch.Tensor] = {}
    hooks = []

    def capture(index: int, stop: bool):
        def hook(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _StopForward

        return hook

    top = max(layers)
    for layer in layers:
        module = embed if layer == 0 else (norm if layer == n else blocks[layer - 1])
        hooks.append(module.register_forward_hook(capture(layer, stop=layer == top)))
    width = max(len(x) for x in ids)
    pad = lm.tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    try:
        lm.model.get_decoder()(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return {layer: captured[layer] for layer in layers}


def encode(lm: LoadedModel, ids: list[list[int]], layers: list[int], batch_size: int = 16,
           desc: str = "sender features") -> dict[int, list[torch.Tensor]]:
    """All examples → {layer: [tensor [T_i, d] on CPU, in the model's dtype]}.

    Examples are processed in order of length so that little compute goes to padding.
    """
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: dict[int, list] = {layer: [None] * len(ids) for layer in layers}
    with tqdm(total=len(ids), desc=desc, unit="ex", mininterval=5) as bar:
        for chunk in batches(order, batch_size):
            states = hidden_states(lm, [ids[i] for i in chunk], layers)
            for layer, tensor in states.items():
                for row, i in enumerate(chunk):
                    out[layer][i] = tensor[row, : len(ids[i])].detach().to("cpu").clone()
            bar.update(len(chunk))
    return out


def collate(states: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of [T_i, d] tensors → ([B, T, d], mask [B, T])."""
    width = max(s.shape[0] for s in states)
    batch = states[0].new_zeros(len(states), width, states[0].shape[1])
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for i, s in enumerate(states):
        batch[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return batch.to(device), mask.to(device)
