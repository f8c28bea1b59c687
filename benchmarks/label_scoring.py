"""Label scoring side by side: multi-token verbalisers in one pass, single-token ones, and the old pass per label.

    python -m benchmarks.label_scoring --out outputs/label_scoring.json [--repeats 5] [-- overrides]

Loads the receiver of the composed config (default: the demo pair's Gemma-3-270M, real weights)
and times, in one process and interleaved (so machine load falls on every variant alike):

* ``eval``: ``PromptIO.score_labels`` on ``eval.batch_size`` prompts, both prompt kinds the runs
  use: ``bridge`` (primer + M soft tokens + answer prompt) and ``text`` (the task prompt with the
  test text: zero-shot, LoRA, prompt tuning);
* ``train``: the class loss forward + backward to the soft tokens (the bridge's micro-step through
  the receiver) at the per-device batch ``batching.plan`` gives;

for three labelings: ``single`` (the task's own labels, one token each under this tokenizer),
``multi`` (the same classes as multi-word phrases, ``--phrases``) scored in one pass, and
``multi-per-label`` (the same phrases through ``label_scores_per_label``, one receiver pass per label:
the code before issue 22). Per example: median over ``--repeats`` batches. The ratio that matters is
multi / single (target <= 1.3; the old path was about K x). Output: a table and ``--out`` JSON with
the machine's load average beside the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# TREC's six classes as multi-word phrases (2-4 tokens each under Gemma's SentencePiece vocabulary)
PHRASES = ",".join(
    [
        "abbreviation or acronym",
        "entity or thing",
        "description or definition",
        "human or person",
        "location or place",
        "number or quantity",
    ]
)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from telepathy.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(cfg, phrases: list[str], repeats: int) -> dict:
    from telepathy import batching
    from telepathy.config import num_latents
    from telepathy.data import format_prompt, load_task
    from telepathy.models import embedding_rms_median, load_model
    from telepathy.prompting import PromptIO, label_token_ids

    lm = load_model(cfg.receiver)
    io = PromptIO(lm)
    _, test = load_task(cfg)
    labelings = {"single": list(cfg.task.labels), "multi": phrases}
    ids = {name: label_token_ids(io, labels, cfg.task.label_prefix) for name, labels in labelings.items()}
    eval_b, train_b = int(cfg.eval.batch_size), batching.plan(cfg)["per_device"]
    m = num_latents(cfg)
    torch.manual_seed(0)
    soft = torch.randn(max(eval_b, train_b), m, lm.hidden_size) * embedding_rms_median(lm.model) / 1.0
    template = io.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt, cfg.bridge.placement)
    texts = [[io.frame(format_prompt(cfg.task.prompt, ex.text))[0]] for ex in test[:eval_b]]

    def bridge_prompts(s):
        return [io.fill(template, row.to(lm.dtype)) for row in s]

    def train_step(scorer, label_ids):
        s = soft[:train_b].clone().requires_grad_()
        scores = scorer(bridge_prompts(s), label_ids)
        F.cross_entropy(scores, torch.arange(train_b) % len(label_ids)).backward()

    paths = {
        "single": (io.label_scores, ids["single"]),
        "multi": (io.label_scores, ids["multi"]),
        "multi-per-label": (io.label_scores_per_label, ids["multi"]),
    }
    cells = {}
    for _ in range(repeats):  # interleaved: each repeat times every variant once
        for name, (scorer, label_ids) in paths.items():
            with torch.no_grad():
                for kind, batch in (("bridge", lambda: bridge_prompts(soft[:eval_b])), ("text", lambda: texts)):
                    prompts = batch()
                    cells.setdefault(("eval", kind, name), []).append(
                        _median_ms(lambda f=scorer, x=prompts, y=label_ids: f(x, y), 1) / len(prompts)
                    )
            cells.setdefault(("train", "bridge", name), []).append(
                _median_ms(lambda f=scorer, y=label_ids: train_step(f, y), 1) / train_b
            )
    rows = []
    for (stage, kind, name), values in cells.items():
        rows.append({"stage": stage, "prompt": kind, "labels": name, "ms_per_example": statistics.median(values)})
    base = {(r["stage"], r["prompt"]): r["ms_per_example"] for r in rows if r["labels"] == "single"}
    for r in rows:
        r["vs_single"] = r["ms_per_example"] / base[(r["stage"], r["prompt"])]
    return {
        "receiver": str(cfg.receiver.name),
        "task": str(cfg.task.name),
        "label_tokens": {name: [len(x) for x in v] for name, v in ids.items()},
        "labels": labelings,
        "eval_batch": eval_b,
        "train_batch": train_b,
        "soft_tokens": m,
        "rows": rows,
    }


def host() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    return {"cpu": cpu, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "torch": torch.__version__}


def render(result: dict) -> str:
    lines = [
        f"receiver {result['receiver']}, task {result['task']}, label tokens {result['label_tokens']}, "
        f"eval batch {result['eval_batch']}, train batch {result['train_batch']}, M={result['soft_tokens']}",
        f"host: {result['host']['cpu']}, {result['host']['threads']} threads, "
        f"load average {', '.join(f'{x:.2f}' for x in result['host']['loadavg_before'])} before / "
        f"{', '.join(f'{x:.2f}' for x in result['host']['loadavg'])} after",
        "",
        "| stage | prompt | labels | ms / example | x single |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["stage"], r["prompt"], r["vs_single"])):
        lines.append(
            f"| {r['stage']} | {r['prompt']} | {r['labels']} | {r['ms_per_example']:.1f} | {r['vs_single']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from telepathy.results import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/label_scoring.json"))
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per variant (interleaved)")
    parser.add_argument("--phrases", default=PHRASES, help="comma list: the multi-token labels, one per class")
    parser.add_argument("overrides", nargs="*", help="config overrides (default: task=trec, the demo pair)")
    args = parser.parse_args(argv)
    cfg = compose(["task=trec", "task.test_samples=64", *args.overrides])
    before = os.getloadavg()
    result = measure(cfg, args.phrases.split(","), args.repeats)
    result["host"] = {**host(), "loadavg_before": before}
    write_json(args.out, result)
    print(render(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
