"""``python -m telepathy.plan``: command-line entry point; the code lives in telepathy/cluster/plan.py."""

from telepathy.cluster.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
