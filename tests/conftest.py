"""Pytest fixtures shared by the tests; plain helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import TINY, compose


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
