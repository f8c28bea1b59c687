"""Pytest fixtures shared by the tests; plain helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import TINY, compose


@pytest.fixture
def outputs(tmp_path) -> Path:
    return tmp_path / "outputs"


@pytest.fixture(scope="session")
def tiny_models():
    """(sender, receiver) as LoadedModel: 2-layer random weights, real demo tokenizers."""
    from telepathy.models import load_model

    cfg = compose(*TINY)
    return load_model(cfg.sender), load_model(cfg.receiver)
