"""Test helpers (``from helpers import ...``): run the real entry points in a subprocess, read what they wrote.

Data comes from TELEPATHY_DATA (CI and `make test` set it to ../shared/data); tests
that need it skip with that reason when it is unset. Converted demo models are cached
in TELEPATHY_CACHE (default ~/.cache/telepathy), so only the first test pays for the
GGUF conversion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["budget=tiny"]  # 2-layer random models with the demo tokenizers: plumbing, not learning


def data_root() -> Path | None:
    root = os.environ.get("TELEPATHY_DATA")
    return Path(root) if root and Path(root).is_dir() else None


needs_data = pytest.mark.skipif(
    data_root() is None,
    reason="TELEPATHY_DATA is not set to the data folder "
    "(e.g. export TELEPATHY_DATA=../shared/data, as `make test` does)",
)


def run_env(outputs: Path, **extra) -> dict:
    env = dict(os.environ)
    env["TELEPATHY_OUTPUTS"] = str(outputs)
    env.setdefault("TELEPATHY_CACHE", str(Path("~/.cache/telepathy").expanduser()))
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(
    script: str, *overrides: str, outputs: Path, check: bool = True, timeout: int = 900, env_extra: dict | None = None
) -> subprocess.CompletedProcess:
    """``python <script> <overrides>`` from the repo root, as a user would type it (``script``:
    ``train.py``, or ``-m benchmarks.latency`` for a module)."""
    proc = subprocess.run(
        [sys.executable, *script.split(), *overrides],
        cwd=REPO,
        env=run_env(outputs, **(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def run_train(*overrides: str, outputs: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_script("train.py", *overrides, outputs=outputs, **kwargs)


def results(outputs: Path) -> list[dict]:
    """Every result.json under outputs/runs, sorted by run id."""
    found = sorted((Path(outputs) / "runs").glob("*/result.json"))
    return [json.loads(p.read_text()) for p in found]


def compose(*overrides: str):
    """The composed train config, as train.py would see it (without running anything)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from telepathy.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))
