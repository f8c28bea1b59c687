"""The sender-feature cache: cached == uncached bit for bit, one pass serves several layers,
concurrent writers leave one valid file, and a partial, corrupted or foreign file is recomputed."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from omegaconf import OmegaConf

from helpers import TINY, compose, needs_data, results, run_train
from telepathy import features
from telepathy.data import Example

TEXTS = [
    "a gripping, beautifully shot film",
    "dull.",
    "I wanted to like it, but the second half drags on and on",
    "the cast is wonderful",
    "an utter mess from start to finish",
    "fine",
]


@pytest.fixture(scope="module")
def sender_setup(tiny_models):
    cfg = compose(*TINY)
    sender, _ = tiny_models
    examples = [Example(idx=i, text=t, label=i % 2) for i, t in enumerate(TEXTS)]
    ids = features.sender_prompts(sender, examples, cfg.task.prompt, cfg.task.max_input_tokens)
    return sender, cfg.sender, ids


def cache_cfg(tmp_path, mode="on"):
    return OmegaConf.create({"mode": mode, "dir": str(tmp_path / "features")})


def cache_files(tmp_path):
    return sorted((tmp_path / "features").rglob("*.safetensors"))


def forbid_encode(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("the sender ran although every layer was cached")

    monkeypatch.setattr(features, "_encoded_batches", fail)  # the sender pass behind encode and the cache


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for layer in a:
        assert len(a[layer]) == len(b[layer])
        for x, y in zip(a[layer], b[layer]):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_cached_equals_uncached_bit_for_bit(sender_setup, tmp_path, monkeypatch):
    lm, model_cfg, ids = sender_setup
    layers = [0, 1, 2]
    reference = features.encode(lm, ids, layers, batch_size=4)
    first = features.cached_encode(lm, ids, layers, cache_cfg(tmp_path), model_cfg, batch_size=4)
    assert_same(first, reference)
    assert len(cache_files(tmp_path)) == 3  # one file per layer, all from one pass
    forbid_encode(monkeypatch)
    assert_same(features.cached_encode(lm, ids, layers, cache_cfg(tmp_path), model_cfg, batch_size=4), reference)
    # any subset of the cached layers is served without running the sender
    assert_same(features.cached_encode(lm, ids, [1], cache_cfg(tmp_path), model_cfg), {1: reference[1]})


def test_only_missing_layers_are_computed(sender_setup, tmp_path, monkeypatch):
    lm, model_cfg, ids = sender_setup
    features.cached_encode(lm, ids, [1], cache_cfg(tmp_path), model_cfg)
    calls = []
    real = features._encoded_batches

    def spy(lm_, ids_, layers, *args):
        calls.append(list(layers))
        return real(lm_, ids_, layers, *args)

    monkeypatch.setattr(features, "_encoded_batches", spy)
    out = features.cached_encode(lm, ids, [0, 1, 2], cache_cfg(tmp_path), model_cfg)
    assert calls == [[0, 2]] and sorted(out) == [0, 1, 2]


def test_key_depends_on_token_ids_and_model(sender_setup, tmp_path):
    lm, model_cfg, ids = sender_setup
    features.cached_encode(lm, ids, [1], cache_cfg(tmp_path), model_cfg)
    features.cached_encode(lm, ids[:-1], [1], cache_cfg(tmp_path), model_cfg)  # other prompts
    features.cached_encode(lm, [row[:-1] for row in ids], [1], cache_cfg(tmp_path), model_cfg)  # other cap
    other_model = OmegaConf.merge(model_cfg, {"revision": "other-weights"})
    features.cached_encode(lm, ids, [1], cache_cfg(tmp_path), other_model)
    assert len(cache_files(tmp_path)) == 4


def test_off_writes_nothing(sender_setup, tmp_path):
    lm, model_cfg, ids = sender_setup
    out = features.cached_encode(lm, ids, [1], cache_cfg(tmp_path, mode="off"), model_cfg)
    assert_same(out, features.encode(lm, ids, [1]))
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign_key", "same_size"])
def test_damaged_file_is_ignored_and_recomputed(sender_setup, tmp_path, damage):
    lm, model_cfg, ids = sender_setup
    # read into memory: the damage below rewrites the file in place (our writers never do)
    reference = {k: list(v) for k, v in features.cached_encode(lm, ids, [1], cache_cfg(tmp_path), model_cfg).items()}
    (path,) = cache_files(tmp_path)
    blob = path.read_bytes()
    if damage == "truncate":  # a writer killed mid-file (without the atomic rename)
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 8 + os.urandom(64))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "same_size":  # bytes changed in place, size kept (before: trained on, 0.375 vs 0.625)
        data_start = 8 + int.from_bytes(blob[:8], "little")
        flipped = bytearray(blob)
        flipped[data_start + 5] ^= 0x40
        path.write_bytes(bytes(flipped))
    else:  # a valid file that belongs to another key (e.g. a hash collision or a copied folder)
        features.save_entry(path, [torch.zeros(len(row), lm.hidden_size) for row in ids], '{"other": 1}')
    again = features.cached_encode(lm, ids, [1], cache_cfg(tmp_path), model_cfg)
    assert_same(again, reference)
    key_text, _ = features.cache_key(features.model_identity(lm, model_cfg), features.ids_digest(ids), 1)
    assert features.load_entry(path, key_text, [len(r) for r in ids]) is not None  # rewritten whole


def test_lengths_mismatch_is_not_used(tmp_path):
    path = tmp_path / "entry.safetensors"
    features.save_entry(path, [torch.ones(3, 4), torch.ones(2, 4)], "k")
    assert features.load_entry(path, "k", [3, 2]) is not None
    assert features.load_entry(path, "k", [2, 3]) is None
    assert features.load_entry(path, "other", [3, 2]) is None


# --- concurrent writers ---------------------------------------------------------------

ROWS, WIDTH = 64, 512  # ~ 2 MB per file: large enough that a write takes a while


def _payload(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1 + i % 17, WIDTH, generator=g) for i in range(ROWS)]


def _writer(path: str, rounds: int) -> None:
    states = _payload(0)  # same key → same content, as two jobs of a sweep would write
    for _ in range(rounds):
        features.save_entry(path, states, "shared-key")


def test_concurrent_writers_leave_one_valid_file_and_no_partial_read(tmp_path):
    path = tmp_path / "features" / "L1-shared.safetensors"
    expected = _payload(0)
    lengths = [s.shape[0] for s in expected]
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(path), 25)) for _ in range(2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        found = features.load_entry(path, "shared-key", lengths)
        if found is not None:  # absent is fine; present must be complete and correct
            reads += 1
            assert all(torch.equal(a, b) for a, b in zip(found, expected))
    for w in writers:
        w.join()
        assert w.exitcode == 0
    found = features.load_entry(path, "shared-key", lengths)
    assert found is not None and all(torch.equal(a, b) for a, b in zip(found, expected))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    assert reads > 0


# --- through the real entry point -------------------------------------------------------


@needs_data
def test_train_reuses_cached_features_with_identical_results(tmp_path):
    """A second run (another output folder, same cache dir) reads the features the first wrote
    and ends with exactly the same metrics and predictions."""
    feature_dir = tmp_path / "features"
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    run_train(*TINY, f"cache.dir={feature_dir}", outputs=cold)
    files = sorted(feature_dir.rglob("*.safetensors"))
    assert len(files) == 2  # train and test prompts, one layer
    proc = run_train(*TINY, f"cache.dir={feature_dir}", outputs=warm)
    assert "from the feature cache" in proc.stderr + proc.stdout
    assert sorted(feature_dir.rglob("*.safetensors")) == files
    (a,), (b,) = results(cold), results(warm)
    assert a["status"] == b["status"] == "completed"
    assert a["metrics"] == b["metrics"]
    assert (cold / "runs" / a["run_id"] / "predictions.jsonl").read_text() == (
        warm / "runs" / b["run_id"] / "predictions.jsonl"
    ).read_text()
