"""Checkpoints a resume can trust: verified before use, loaded without unpickling code.

A checkpoint folder ``checkpoints/step_N`` holds ``trainable.safetensors`` (weights),
``state.pt`` (optimizer, scheduler, RNG states, data position) and ``checkpoint.json``
(size and sha256 of both, written last). Why:

* **A damaged checkpoint must not block the run.** A node that dies mid-copy, a full
  scratch disk or a bad sync leaves a truncated file; without a check every relaunch
  fails on a raw safetensors/zip error while an intact older checkpoint sits beside it.
  ``newest_intact`` checks each candidate, newest first, and returns the newest one
  that verifies and loads, moving the damaged ones aside (``damaged_step_N``) and
  logging which and why.
* **Loading must not run code.** ``state.pt`` lives in shared output or scratch dirs;
  ``torch.load(weights_only=False)`` would execute any pickle placed there. The state
  holds only tensors, numbers, strings, lists, tuples and dicts (the numpy RNG state is
  stored as a tensor), so it loads with ``weights_only=True`` and a crafted pickle is
  refused like any other damaged checkpoint.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from telepathy.fsutil import digest_problem, write_digests

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
STATE = "state.pt"


def write_manifest(folder: Path, step: int) -> None:
    """Record size and sha256 of every file of a checkpoint folder (call after they are written)."""
    write_digests(folder, MANIFEST, step=step)


def problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when every file matches its manifest.

    A folder without a manifest (written before manifests existed) is not checked here;
    loading it still has to succeed.
    """
    return digest_problem(folder, MANIFEST, required=False)


def rng_state() -> dict:
    """Every RNG state as plain data (tensors, ints, tuples) that ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(folder: Path) -> dict:
    """``state.pt`` with ``weights_only=True``: plain data only; any other pickle raises."""
    return torch.load(Path(folder) / STATE, weights_only=True, map_location="cpu")


def newest_intact(folders: list[Path], load: Callable[[Path], object]):
    """(folder, load(folder)) for the newest folder that verifies and loads; (None, None) if none does.

    ``folders`` are oldest first. A folder that fails is renamed ``damaged_<name>`` (so
    it is neither tried again nor counted among the checkpoints kept) and the reason
    is logged; the one used is logged too.
    """
    rejected = []
    for folder in reversed(folders):
        why = problem(folder)
        if why is None:
            try:
                loaded = load(folder)
            except Exception as err:  # noqa: BLE001 - any load failure means: try an older one
                why = f"does not load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            else:
                if rejected:
                    log.warning(
                        "resuming from %s, the newest intact checkpoint (skipped: %s)", folder.name, "; ".join(rejected)
                    )
                return folder, loaded
        rejected.append(f"{folder.name}: {why}")
        log.warning("checkpoint %s is damaged: %s; moved aside, trying an older one", folder, why)
        try:
            folder.rename(folder.with_name(f"damaged_{folder.name}"))
        except OSError:
            pass
    if rejected:
        log.warning("no intact checkpoint (%s): training starts from step 0", "; ".join(rejected))
    return None, None
