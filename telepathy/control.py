"""``python -m telepathy.control``: command-line entry point; the code lives in telepathy/cluster/control.py."""

from telepathy.cluster.control import main

if __name__ == "__main__":
    raise SystemExit(main())
