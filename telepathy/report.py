"""``python -m telepathy.report``: command-line entry point; the code lives in telepathy/analysis/report.py."""

from telepathy.analysis.report import main

if __name__ == "__main__":
    raise SystemExit(main())
