"""Measured compression: how many tokens of input text each receiver position stands for.

The nominal factor (``compression=8``) sets M = ceil(task.max_input_tokens / factor); the
text actually read is usually far shorter than the cap (an SST-2 review is ~20 tokens, a
TREC question ~10), so "8x" can be 1x. Tables and plots show the measured ratio next to
the nominal one (docs/results.md).
"""

from __future__ import annotations

import statistics


def measured_compression(text_tokens: list[int], positions: int | float) -> dict:
    """Text tokens read per receiver position (text tokens / M), per test item summarised.

    ``text_tokens``: each item's text tokens that reached the reader (after any cap);
    ``positions``: receiver positions that carry them (M soft tokens).
    """
    if not text_tokens or positions <= 0:
        raise ValueError("measured compression needs test items and at least one position")
    ratios = sorted(t / positions for t in text_tokens)
    q = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else ratios * 9
    return {
        "text_tokens_mean": statistics.mean(text_tokens),
        "measured_compression_mean": statistics.mean(ratios),
        "measured_compression_median": statistics.median(ratios),
        "measured_compression_p10": q[0],
        "measured_compression_p90": q[-1],
    }
