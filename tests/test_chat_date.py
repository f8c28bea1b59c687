"""Chat templates that print today's date (Llama-3.x: ``strftime_now``) get the pinned
``chat_template_kwargs.date_string``, so sender features, cache keys and receiver prompts are
a function of the config, not of the day a job runs."""

from __future__ import annotations

import copy
import dataclasses
import datetime

from helpers import TINY, compose
from telepathy.data import Example
from telepathy.features import ids_digest, sender_prompts
from telepathy.models import chat_kwargs
from telepathy.prompting import PromptIO

# the date logic of the Llama-3.1/3.2 Instruct templates
LLAMA3_DATE_TEMPLATE = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "<|start_header_id|>system<|end_header_id|>\nToday Date: {{ date_string }}<|eot_id|>"
    "{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n{{ m['content'] }}<|eot_id|>"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n{%- endif %}"
)


def _with_llama3_template(lm, kwargs):
    tok = copy.copy(lm.tokenizer)
    tok.chat_template = LLAMA3_DATE_TEMPLATE
    return dataclasses.replace(lm, tokenizer=tok, chat_template=True, chat_kwargs=kwargs)


def test_prompts_carry_the_pinned_date_not_today(tiny_models):
    cfg = compose(*TINY, "sender=llama31_8b")
    pinned = chat_kwargs(cfg.sender)
    assert pinned == {"date_string": "26 Jul 2024"}
    today = datetime.date.today().strftime("%d %b %Y")
    sender, _ = tiny_models
    lm = _with_llama3_template(sender, pinned)
    examples = [Example(idx=0, text="a fine film", label=1)]
    ids = sender_prompts(lm, examples, cfg.task.prompt, cfg.task.max_input_tokens)
    text = lm.tokenizer.decode(ids[0])
    assert "Today Date: 26 Jul 2024" in text and today not in text
    assert "26 Jul 2024" in "".join(PromptIO(lm).frame("Review: x"))
    # without the pin the template prints the day the job runs: features and cache keys would follow it
    unpinned = sender_prompts(_with_llama3_template(sender, {}), examples, cfg.task.prompt, cfg.task.max_input_tokens)
    assert today in lm.tokenizer.decode(unpinned[0]) and ids_digest(unpinned) != ids_digest(ids)
