"""The read side: run directories back into tables, statistics, plots and reports.

    runs       find run dirs, load result.json / predictions / logs into DataFrames
    summarise  one row per experiment (mean and CI across seeds), paired comparisons
    tables     Markdown / LaTeX tables, JSON-safe values
    plots      accuracy vs compression, training curves, latency, probes by layer, latency heat map
    aggregate  ``python -m telepathy aggregate``: summary.json / .md / .tex and plots of a sweep
    report     ``python -m telepathy report``: a phase's resources, GPU-hours and checks
    paper      ``python -m telepathy paper``: the paper's tables and figures from a folder of stored records

The statistics (seed-level CIs, Holm, McNemar, sign test, cluster bootstrap, permutation
test) are ``telepathy.stats``, a leaf of the run core that the run's metrics use too.
Nothing here writes into a run directory; the write side is telepathy/results.py. It imports
the run core; the run core never imports it. The names below are the public API used by
notebooks (``from telepathy import analysis``).
"""

from telepathy.analysis.runs import (
    BENCHMARK_METHODS,
    GROUP_KEYS,
    LOG_FILE,
    PREDICTIONS_FILE,
    RESULT_FILE,
    MissingMetricError,
    RunReadError,
    find_run_dirs,
    is_missing,
    is_reused,
    load_logs,
    load_predictions,
    load_runs,
    read_run,
)
from telepathy.analysis.summarise import (
    compare_settings,
    compare_to_baseline,
    compare_to_reference,
    metric_column,
    sender_controls,
    summarise,
)
from telepathy.stats import (
    holm,
    mcnemar,
    mean_ci,
    mean_difference_p,
    paired_bootstrap,
    paired_permutation_p,
    seeds_and_items_bootstrap,
    sign_test_p,
)

__all__ = [
    "BENCHMARK_METHODS",
    "GROUP_KEYS",
    "LOG_FILE",
    "PREDICTIONS_FILE",
    "RESULT_FILE",
    "MissingMetricError",
    "RunReadError",
    "compare_settings",
    "compare_to_baseline",
    "compare_to_reference",
    "find_run_dirs",
    "holm",
    "is_missing",
    "is_reused",
    "load_logs",
    "load_predictions",
    "load_runs",
    "mcnemar",
    "mean_ci",
    "mean_difference_p",
    "metric_column",
    "paired_bootstrap",
    "paired_permutation_p",
    "read_run",
    "seeds_and_items_bootstrap",
    "sender_controls",
    "sign_test_p",
    "summarise",
]
