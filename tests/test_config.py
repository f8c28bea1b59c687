"""Config composition and validation: bad values fail early with the key and the allowed values."""

import pytest

from helpers import TINY, compose, run_train
from telepathy.config import ConfigError, config_hash, resolve_layer, run_name
from telepathy.methods import validate


def test_default_config_is_valid_and_is_the_demo_pair():
    cfg = compose()
    validate(cfg)
    assert (cfg.sender.name, cfg.receiver.name, cfg.task.name, cfg.method.name) == (
        "smollm2_135m",
        "gemma3_270m",
        "sst2",
        "bridge",
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("compression=0", "compression"),
        ("compression=2.5", "compression"),
        ("sender.layer=99", "sender.layer"),
        ("trainer.schedule=linear", "trainer.schedule"),
        ("eval.readout=regex", "eval.readout"),
        ("bridge.heads=3", "bridge.dim"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("method.name=telepathy", "method.name"),
        ("sender.dtype=int4", "sender.dtype"),
        ("bridge.placement=middle", "bridge.placement"),
        ("bridge.init=xavier", "bridge.init"),
        # one input per micro-batch: nothing to centre
        ("bridge.centre_grad=true bridge.reference_items=0 trainer.batch_size=1", "bridge.centre_grad"),
        ("bridge.centre_grad=true", "bridge.centre_grad"),  # the ablation replaces the reference set
        ("bridge.reference_items=1", "bridge.reference_items"),
        ("bridge.reference_items=-2", "bridge.reference_items"),
        ("trainer.loss=mse", "trainer.loss"),
        ("task=xsum trainer.loss=classes", "trainer.loss"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(*override.split()))


def test_layer_error_lists_the_allowed_range():
    with pytest.raises(ConfigError, match=r"allowed: integers in \[-31, 30\]"):
        resolve_layer(31, 30)
    assert resolve_layer(-1, 30) == 30 and resolve_layer(0, 30) == 0 and resolve_layer(-31, 30) == 0


def test_unknown_group_option_is_a_clear_hydra_error():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="task"):
        compose("task=imdb")


def test_run_id_ignores_paths_but_not_what_changes_results():
    base = compose()
    assert run_name(base) == run_name(compose("paths.output_dir=/elsewhere", "eval.batch_size=3"))
    assert config_hash(base) != config_hash(compose("trainer.lr=0.1"))
    assert config_hash(base) != config_hash(compose("seed=123"))
    assert config_hash(base, exclude=("seed",)) == config_hash(compose("seed=123"), exclude=("seed",))
    assert run_name(base).startswith("sst2-bridge-smollm2_135m_gemma3_270m-c8-s42-")


def test_bad_config_fails_before_any_model_loads(outputs):
    proc = run_train(*TINY, "sender.layer=40", outputs=outputs, check=False)
    assert proc.returncode != 0
    assert "sender.layer=40 is out of range" in proc.stderr
    assert not (outputs / "runs").exists() or not any((outputs / "runs").glob("*/result.json"))
