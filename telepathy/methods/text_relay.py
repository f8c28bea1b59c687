"""method=text_relay: the sender writes a message in words; the receiver answers from it.

    sender reads method.instruction with the input   → greedy message, ≤ method.max_new_tokens
    receiver reads method.receiver_prompt with the message (it ends with the task's
             answer prompt, which lists the label set) → label readout as zero-shot
    task.type=generation (XSum): the sender's summary, rewritten by the receiver, scored with ROUGE

The bridge's natural rival: the same two frozen models, talking in text instead of
latent vectors. By default the sender reads exactly the task prompt the bridge's
sender reads, and its continuation (an answer, a summary, or whatever it writes) is
the message. Greedy decoding and no training make the result the same for every seed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from telepathy.config import ConfigError, check_range
from telepathy.data import batches, load_task
from telepathy.evaluation import text_prompt
from telepathy.methods import MethodOutput
from telepathy.methods.baselines import evaluate_counted, inference_result
from telepathy.prompting import PromptIO

DETERMINISTIC = True


def validate(cfg) -> None:
    check_range(cfg, "method.max_new_tokens", lo=1, integer=True)
    for key in ("instruction", "receiver_prompt"):
        if "{text}" not in cfg.method[key]:
            raise ConfigError(f"method.{key}={cfg.method[key]!r} is not allowed; allowed: a template with {{text}}")


def relay_messages(io: PromptIO, examples, relay_cfg, batch_size: int) -> dict[int, str]:
    """The sender's greedy message for each example, keyed by ``idx``.

    ``relay_cfg`` is ``conf/method/text_relay.yaml`` (``cfg.method`` here, ``cfg.relay`` in the
    latency benchmark): one definition of the relay, so the accuracy and the latency of
    "the text relay" are measured on the same message (instruction, length cap).
    """
    build = text_prompt(io, relay_cfg.instruction)
    messages = {}
    for chunk in batches(examples, batch_size):
        for ex, text in zip(chunk, io.generate(build(chunk), max_new_tokens=relay_cfg.max_new_tokens)):
            messages[ex.idx] = text.strip()
    return messages


def relay_reader(io: PromptIO, relay_cfg):
    """Builder of the receiver's prompts around each message (``relay_cfg.receiver_prompt``)."""
    return text_prompt(io, relay_cfg.receiver_prompt)


def run(cfg, ctx) -> MethodOutput:
    train, test = load_task(cfg)
    sender, receiver = ctx.model("sender"), ctx.model("receiver")
    sender_io, io = PromptIO(sender), PromptIO(receiver)

    t0 = time.time()
    messages = relay_messages(sender_io, test, cfg.method, cfg.eval.batch_size)
    relay_s = time.time() - t0
    relayed = [replace(ex, text=messages[ex.idx]) for ex in test]  # same idx, label and target
    metrics, rows, eval_s = evaluate_counted(
        io, relayed, relay_reader(io, cfg.method), cfg, desc="receiver reads the relay"
    )
    for row in rows:
        row["relay"] = messages[row["idx"]]
        row["relay_tokens"] = len(sender_io.ids(row["relay"]))
    metrics["relay_tokens_mean"] = statistics.mean(r["relay_tokens"] for r in rows)
    metrics["relay_s"] = relay_s
    return inference_result(cfg, metrics, rows, train, test, {"sender": sender, "receiver": receiver}, relay_s + eval_s)
