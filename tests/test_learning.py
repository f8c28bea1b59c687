"""A bridge between the real demo models learns: SST-2 accuracy clearly above the majority class.

Real weights (SmolLM2-135M → Gemma-3-270M), CPU, the robustness table's budget (120 steps of 8,
two passes over 480 items), three seeds in one multirun. The bar is sized from the measured table
(benchmarks/README.md §3): at this budget every run there learned, over seeds x CPU kernels x
thread counts x micro-batches, the smallest margin over the test majority +0.14 and the median
near +0.29. Every run must predict both classes and beat the majority rate, and the median margin
must clear 0.15. The previous recipes failed here on some machines: the one before this collapsed to
one class on CI's AVX-512 EPYC (issue 20), the token loss before that on most seeds; at 60 steps the
current one still left seed 2 below the majority rate on both kernels.
"""

import statistics

import pytest

from benchmarks.robustness import TEST_BUDGET
from helpers import needs_data, results, run_train

pytestmark = [needs_data, pytest.mark.slow]

SEEDS = (42, 1, 2)
MEDIAN_MARGIN = 0.15  # over the test split's majority rate (0.55 on these 120 items)


@pytest.mark.timeout(2400)  # ~2 min a seed alone; make test runs it beside another worker's tests
def test_bridge_on_sst2_beats_the_majority_class_on_every_seed(outputs):
    run_train("-m", f"seed={','.join(map(str, SEEDS))}", *TEST_BUDGET, outputs=outputs, timeout=2400)
    records = results(outputs)
    assert sorted(r["seed"] for r in records) == sorted(SEEDS) and all(r["status"] == "completed" for r in records)
    for r in records:
        assert r["metrics"]["n_test"] == 120
        diagnostics = r["bridge"]["diagnostics"]
        assert not diagnostics["single_class"] and diagnostics["predicted_classes"] == 2, (r["seed"], diagnostics)
    margins = {r["seed"]: r["metrics"]["accuracy"] - r["metrics"]["majority_accuracy"] for r in records}
    assert min(margins.values()) > 0, margins  # no seed at or below the majority rate
    assert statistics.median(margins.values()) >= MEDIAN_MARGIN, margins
