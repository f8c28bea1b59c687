"""``python -m telepathy <command> [args]``: the tools beside ``train.py``, declared once here.

    status     where every run of every launched phase stands           telepathy/cluster/status.py
    plan       will a set of phases fit the cluster's window?           telepathy/cluster/plan.py
    control    hold, release or cancel a phase's SLURM jobs             telepathy/cluster/control.py
    aggregate  tables with CIs, paired tests and plots of finished runs telepathy/analysis/aggregate.py
    report     a phase's completion, GPU-hours, memory and checks       telepathy/analysis/report.py
    paper      the paper's tables and figures from stored records       telepathy/analysis/paper.py

``python -m telepathy <command> --help`` shows a command's options; installed (``make setup``),
``telepathy <command>`` is the same (``[project.scripts]`` in pyproject.toml points here).
This dispatcher sits above the three layers: it names the cluster and read sides, which the
run core (the rest of telepathy/) never imports. A command's module loads only when it runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "status": "telepathy.cluster.status",
    "plan": "telepathy.cluster.plan",
    "control": "telepathy.cluster.control",
    "aggregate": "telepathy.analysis.aggregate",
    "report": "telepathy.analysis.report",
    "paper": "telepathy.analysis.paper",
}
USAGE = "usage: python -m telepathy {" + ",".join(COMMANDS) + "} [args]\n\n" + __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int | None:
    """Run ``argv[0]``'s ``main`` with the rest of ``argv``; without a known command, print the list."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        if argv[:1] in ([], ["-h"], ["--help"]):
            print(USAGE)
            return 0
        print(f"{USAGE}\nunknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
