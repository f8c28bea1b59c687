"""``python -m telepathy.aggregate``: command-line entry point; the code lives in telepathy/analysis/aggregate.py."""

from telepathy.analysis.aggregate import main

if __name__ == "__main__":
    raise SystemExit(main())
