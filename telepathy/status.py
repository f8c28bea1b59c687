"""``python -m telepathy.status``: command-line entry point; the code lives in telepathy/cluster/status.py."""

from telepathy.cluster.status import main

if __name__ == "__main__":
    raise SystemExit(main())
