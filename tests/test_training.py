"""The training loop: seeded data order, schedule, and exact resume after an interruption."""

import json
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf

from helpers import REPO
from telepathy.training import DataStream, Interrupted, fit, latest_checkpoint, lr_lambda


def trainer_cfg(**kw):
    """conf/trainer/default.yaml with a toy run's steps, batch and schedule."""
    small = dict(lr=1e-2, warmup_steps=2, batch_size=3, grad_accum=2, max_steps=6, checkpoint_every=3, log_every=1)
    return OmegaConf.merge(OmegaConf.load(REPO / "conf/trainer/default.yaml"), small, kw)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.drop = torch.nn.Dropout(0.5)  # uses the RNG, so resume must restore it


X = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
Y = X.sum(-1, keepdim=True)


def make_loss(model, crash_at=None, signal_at=()):
    """The toy's loss; ``crash_at``: raise on that call; ``signal_at``: the calls on which the process
    sends itself SIGINT (a Ctrl-C arriving mid-step)."""
    calls = {"n": 0}

    def loss_fn(idx):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated preemption")
        if calls["n"] in signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        loss = ((model.lin(model.drop(X[idx])) - Y[idx]) ** 2).mean()
        return loss, {"loss": loss.item()}

    return loss_fn


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    ref = Toy()
    fit(ref, make_loss(ref), 20, trainer_cfg(), seed=7, run_dir=tmp_path / "ref")

    model = Toy()
    with pytest.raises(KeyboardInterrupt):
        fit(model, make_loss(model, crash_at=9), 20, trainer_cfg(), seed=7, run_dir=tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    resumed = Toy()  # a fresh process: weights come from the checkpoint
    result = fit(resumed, make_loss(resumed), 20, trainer_cfg(), seed=7, run_dir=tmp_path / "run")
    assert result.resumed_from == 3
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_data_stream_crosses_epochs_without_repeats_within_one():
    stream = DataStream(n=5, batch_size=3, seed=0)
    first = stream.next() + stream.next()[:2]
    assert sorted(first) == list(range(5))
    assert stream.position == 6


def test_warmup_then_cosine_to_zero():
    fn = lr_lambda("cosine", warmup=4, total=14)
    assert [round(fn(s), 2) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(14) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_only_trainable_parameters_are_saved(tmp_path):
    from safetensors.torch import load_file

    model = Toy()
    model.lin.bias.requires_grad_(False)
    fit(model, make_loss(model), 20, trainer_cfg(max_steps=3), seed=0, run_dir=tmp_path)
    saved = load_file(str(latest_checkpoint(tmp_path) / "trainable.safetensors"))
    assert list(saved) == ["lin.weight"]


def test_checkpoint_keeps_the_bridge_input_standardisation(tmp_path):
    """A bridge loaded from a checkpoint computes the trained function: in_mean / in_std are
    saved, and a checkpoint without them (or with other keys) is refused, never read as 0 / 1."""
    from safetensors.torch import save_file

    from telepathy.bridge import PerceiverBridge
    from telepathy.training import load_trainable, trainable_state

    torch.manual_seed(0)
    trained = PerceiverBridge(12, 8, num_latents=3, dim=16, depth=1, heads=2).eval()
    trained.set_input_stats([torch.randn(5, 12) * 7 + 3])
    save_file(trainable_state(trained), str(tmp_path / "trainable.safetensors"))
    fresh = PerceiverBridge(12, 8, num_latents=3, dim=16, depth=1, heads=2).eval()
    load_trainable(fresh, tmp_path)
    x, mask = torch.randn(2, 4, 12), torch.ones(2, 4)
    torch.testing.assert_close(fresh(x, mask), trained(x, mask))

    old = {k: v for k, v in trainable_state(trained).items() if k not in ("in_mean", "in_std")}
    save_file(old, str(tmp_path / "trainable.safetensors"))
    with pytest.raises(RuntimeError, match="missing.*in_mean"):
        load_trainable(fresh, tmp_path)


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt here, as in an interactive Python (a shell may start pytest ignoring it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _steps_logged(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_ctrl_c_finishes_the_step_checkpoints_it_and_stops_in_one_line(tmp_path, caplog, ctrl_c):
    """Before: Ctrl-C raised KeyboardInterrupt mid-step and the steps since the last checkpoint
    were lost (here step 5: the last checkpoint was step 3). SIGINT is handled as SIGTERM is."""
    model = Toy()
    try:  # 2 micro-batches a step: call 9 is the first half of step 5
        fit(model, make_loss(model, signal_at=(9,)), 20, trainer_cfg(), seed=7, run_dir=tmp_path / "run")
    except BaseException as err:  # noqa: BLE001 - a KeyboardInterrupt (the old behaviour) must fail the test, not stop pytest
        stop = err
    assert isinstance(stop, Interrupted) and str(stop) == "interrupted at step 5 (SIGINT)", repr(stop)
    assert stop.step == 5 and latest_checkpoint(tmp_path / "run").name == "step_00000005"
    assert _steps_logged(tmp_path / "run") == [1, 2, 3, 4, 5]
    assert "received SIGINT: will checkpoint after this step (Ctrl-C again stops at once)" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler from before fit is back

    resumed = Toy()
    assert fit(resumed, make_loss(resumed), 20, trainer_cfg(), seed=7, run_dir=tmp_path / "run").resumed_from == 5
    ref = Toy()
    fit(ref, make_loss(ref), 20, trainer_cfg(), seed=7, run_dir=tmp_path / "ref")
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_second_ctrl_c_stops_at_once(tmp_path, ctrl_c):
    model = Toy()
    with pytest.raises(KeyboardInterrupt, match="a second Ctrl-C: stopped at once"):
        fit(model, make_loss(model, signal_at=(9, 10)), 20, trainer_cfg(), seed=7, run_dir=tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"  # step 5 was not finished
    assert _steps_logged(tmp_path / "run") == [1, 2, 3, 4]
