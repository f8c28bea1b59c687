"""Pytest fixtures shared by the tests; plain helpers live in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _threads_per_worker() -> int:
    """The cores this process may use, shared out over pytest-xdist's workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


# Under `make test` two workers share the machine; each one's torch (and every `python train.py`
# or SLURM job it starts, which inherit the environment) would otherwise start a thread per core,
# and two workers' spinning OpenMP pools on two cores slow both down many times over. An
# OMP_NUM_THREADS the caller set is kept.
if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker())
    if "torch" in sys.modules:  # already imported by a plugin: its pool is sized, resize it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

from helpers import TINY, compose  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the group into the node id
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``), every SLURM test runs on one worker, one after the
    other: they share the one-node test cluster, and some assert which job ids are new."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture
def outputs(tmp_path) -> Path:
    return tmp_path / "outputs"


@pytest.fixture(scope="session")
def tiny_models():
    """(sender, receiver) as LoadedModel: 2-layer random weights, real demo tokenizers."""
    from telepathy.models import load_model

    cfg = compose(*TINY)
    return load_model(cfg.sender), load_model(cfg.receiver)
