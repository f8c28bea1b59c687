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


def _with_hydra(*overrides):
    """The composed config with its ``hydra`` node, as Hydra hands it to the run-dir resolver."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from helpers import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    "added,message",
    [
        (
            "+trainer.lrr=1",
            "+trainer.lrr=1 is not allowed: no config or code reads trainer.lrr; did you mean trainer.lr=1?",
        ),
        ("++trainer.lrr=1", "did you mean trainer.lr=1?"),  # ++ may set a key a config file has; this one none has
        ("+reruns=all", "did you mean +rerun=all?"),  # a key the code reads, added with +
        ("+method.shots=2", "no config or code reads method.shots"),  # fewshot's key: method=bridge never reads it
        ("+bridge.dpeth=2", "did you mean bridge.depth=2?"),
    ],
)
def test_a_key_no_config_or_code_reads_is_refused_naming_the_closest_one(added, message):
    """Before: Hydra suggests `+trainer.lrr=1` for a typo and the run took it as a no-op, with a new run id."""
    with pytest.raises(ConfigError) as err:
        validate(_with_hydra(*TINY, added))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "added",
    [
        "+rerun=all",
        "+dry_run=true",
        "+phase=p1_seeds",
        "+pair=small",
        "++resources.gpus=1",
        "+cluster.env.HF_HOME=/x",
        "++run.reuse_seeds=[1,2]",
        "++trainer.lr=1e-3",
        "+sender.init_seed=3",
    ],
)
def test_keys_the_code_reads_or_the_configs_define_can_be_added(added):
    validate(_with_hydra(*TINY, added))
