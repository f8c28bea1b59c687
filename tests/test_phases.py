"""Every phase of the plan composes to the experiment the plan describes: the paper's models,
settings, grid and per-device batch sizes; and `budget=tiny` shrinks any phase to 2-layer random
models of the same families. Composition is in-process (what `-m +phase=pN +dry_run=true`
expands to, job by job, narrowed to one slice where the grid itself is checked from the
phase's sweep), so checking every phase costs seconds, not a dry run per phase."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from helpers import REPO, needs_data
from telepathy import batching, resources
from telepathy.config import register_resolvers
from telepathy.methods import validate

PAPER_PAIR = ("llama31_8b", "mistral7b")
SMALL_PAIR = ("llama32_1b", "qwen25_15b")
TASKS = ["sst2", "agnews", "trec"]
SEEDS = [42, 123, 456]


def _compose(app: str, overrides: list[str], hydra: bool = False):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=app, overrides=overrides, return_hydra_config=hydra)


def grid(phase: str, app: str = "train") -> dict[str, list[str]]:
    """The phase's sweep: {key: [values]} as the sweeper reads ``hydra.sweeper.params``."""
    params = _compose(app, [f"+phase={phase}"], hydra=True).hydra.sweeper.params or {}
    parser = OverridesParser.create()
    parsed = {k: parser.parse_override(f"{k}={v}") for k, v in params.items()}
    # a single value (a scale narrowing the paper phase's sweep to one task) is a sweep of one
    return {
        k: list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for k, o in parsed.items()
    }


def jobs(phase: str, *narrow: str, app: str = "train") -> list:
    """The composed config of every job of ``-m +phase=<phase> <narrow>`` (command-line values
    narrow the phase's sweep, as they do for a real launch); one compose per job."""
    given = {o.split("=")[0] for o in narrow}
    axes = [[f"{k}={v}" for v in values] for k, values in grid(phase, app).items() if k not in given]
    base = [f"+phase={phase}", *narrow]
    return [_compose(app, [*base, *combo]) for combo in itertools.product(*axes)]


def _models(cfg) -> tuple[str, str]:
    return cfg.sender.name, cfg.receiver.name


def _batch(cfg) -> tuple[int, int, int]:
    out = batching.plan(cfg)
    return out["per_device"], out["grad_accum"], out["effective"]


def test_p1_is_the_paper_pair_with_both_zero_shots_on_1000_items():
    assert grid("p1_seeds") == {
        "method": ["bridge", "zeroshot", "zeroshot_sender", "zeroshot_calibrated"],
        "task": TASKS,
        "seed": [str(s) for s in SEEDS],
    }
    slice_ = jobs("p1_seeds", "task=agnews", "seed=123")
    assert [(j.method.name, j.method.get("model")) for j in slice_] == [
        ("bridge", None),
        ("zeroshot", "receiver"),
        ("zeroshot", "sender"),
        ("zeroshot_calibrated", "receiver"),  # the reference a base receiver's raw zero-shot is not (issue 21)
    ]
    for j in slice_:
        validate(j)
        assert _models(j) == PAPER_PAIR and j.sender.layer == 31 and j.compression == 8
        assert j.task.train_samples == 1000 and j.task.test_samples is None  # full test sets
    # medium (7-8B) pair: 2 per device, the recipe's batch of 16 kept by accumulation
    assert _batch(slice_[0]) == (2, 8, 16)


def test_p2_probes_the_1b_and_mistral_at_the_plans_layers():
    from telepathy.methods.linear_probe import probe_layers

    assert grid("p2_probes") == {"method.model": ["sender", "receiver"], "task": TASKS}
    layers = {}
    for j in jobs("p2_probes", "task=trec"):
        validate(j)
        assert j.method.name == "linear_probe" and j.task.train_samples == 1000 and j.task.test_samples is None
        model = j[j.method.model]
        layers[model.name] = probe_layers(j, int(model.num_layers))
        assert resources.plan(j).gpus == 1
    assert layers == {"llama32_1b": [4, 8, 12, 15], "mistral7b": [8, 16, 24, 31]}


def test_p3_runs_the_bridge_against_every_baseline_on_the_paper_pair():
    assert grid("p3_baselines")["task"] == TASKS
    slice_ = jobs("p3_baselines", "task=sst2")
    methods = [(j.method.name, j.method.get("budget")) for j in slice_]
    assert methods == [
        ("bridge", None),
        ("zeroshot", None),
        ("zeroshot_calibrated", None),
        ("text_relay", None),
        ("llmlingua", "rate"),
        ("llmlingua", "match_bridge"),
        ("prompt_tuning", None),
        ("lora", None),
        ("fewshot", None),
    ]
    for j in slice_:
        validate(j)
        assert _models(j) == PAPER_PAIR and j.compression == 8 and j.task.train_samples == 1000
        if j.method.name == "llmlingua" and j.method.budget == "rate":
            assert j.method.rate == 0.125
        if j.method.name in ("prompt_tuning", "lora"):
            assert _batch(j) == (8, 2, 16)  # one 7B model: the single-model column


def test_p4_times_the_plans_grid_with_the_trained_bridge_and_the_relay_baselines_settings():
    assert grid("p4_latency", app="latency") == {
        "compression": ["4", "8", "16", "32"],
        "eval.batch_size": ["1", "4", "8", "16"],
    }
    [j] = jobs("p4_latency", "compression=16", "eval.batch_size=8", app="latency")
    relay = OmegaConf.load(REPO / "conf" / "method" / "text_relay.yaml")
    assert _models(j) == PAPER_PAIR and j.sender.layer == 31 and j.batch_size == 8
    # the plan's 100 timed iterations (batches) per cell, whatever the batch size
    assert j.bridge_checkpoint == "auto" and j.iterations == 100 and j.num_inputs is None
    assert j.relay.max_new_tokens == relay.max_new_tokens and j.relay.instruction == j.task.prompt


@needs_data
def test_p4_cycles_the_test_set_when_100_batches_of_16_exceed_it():
    """SST-2's test split has 872 items: 100 iterations x batch 16 = 1600 timed inputs reuse them."""
    from benchmarks.latency import timed_inputs

    [j] = jobs("p4_latency", "compression=8", "eval.batch_size=16", app="latency")
    warmup, timed, drawn = timed_inputs(j, 16)
    assert len(timed) == 100 * 16 and len(warmup) == 16 * j.warmup_batches
    assert drawn == {"iterations": 100, "distinct_inputs": 872 - len(warmup), "inputs_reused": True}
    assert not {ex.idx for ex in warmup} & {ex.idx for ex in timed}  # the warm-up stays on other inputs
    pool = timed[: drawn["distinct_inputs"]]
    assert len({ex.idx for ex in pool}) == len(pool) and timed == [pool[i % len(pool)] for i in range(1600)]
    # a batch that fits the split: distinct inputs, nothing reused
    [small] = jobs("p4_latency", "compression=8", "eval.batch_size=4", app="latency")
    assert timed_inputs(small, 4)[2] == {"iterations": 100, "distinct_inputs": 400, "inputs_reused": False}


def test_latency_knobs_are_checked_before_anything_is_submitted():
    from telepathy.cluster.sweep import plan_benchmark_job
    from telepathy.config import ConfigError

    for bad, message in (
        ("iterations=0", "iterations=0 is not allowed; allowed: an integer in [1, inf]"),
        ("num_inputs=2.5", "num_inputs=2.5 is not allowed; allowed: an integer in [1, inf]"),
        ("warmup_batches=-1", "warmup_batches=-1 is not allowed"),
    ):
        cfg = _compose("latency", ["+phase=p4_latency", "compression=8", "eval.batch_size=4", bad], hydra=True)
        with pytest.raises(ConfigError) as err:
            plan_benchmark_job(0, [bad], cfg)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_p5_is_xsum_on_the_small_pair_with_both_zero_shots_and_two_gpus():
    assert grid("p5_xsum") == {"method": ["bridge", "zeroshot", "zeroshot_sender"], "seed": [str(s) for s in SEEDS]}
    for j in jobs("p5_xsum", "seed=42"):
        validate(j)
        assert _models(j) == SMALL_PAIR and j.task.name == "xsum"
        assert j.task.train_samples == 1000 and j.task.test_samples == 500
        assert resources.plan(j).gpus == (2 if j.method.name == "bridge" else 1)
        if j.method.name == "bridge":
            assert _batch(j) == (8, 2, 16)  # small (1-2B) pair


def test_p6_compares_the_small_and_the_medium_pair_on_sst2():
    assert grid("p6_ablations") == {"+pair": ["small", "medium"], "seed": [str(s) for s in SEEDS]}
    small, medium = jobs("p6_ablations", "seed=42")
    for j in (small, medium):
        validate(j)
        assert j.task.name == "sst2" and j.method.name == "bridge" and j.task.train_samples == 1000
    assert (_models(small), _batch(small)) == (SMALL_PAIR, (8, 2, 16))
    assert (_models(medium), _batch(medium)) == (PAPER_PAIR, (2, 8, 16))
    extension = grid("p6_grid")  # the optional 3 x 3 extension
    assert len(extension["sender"]) == len(extension["receiver"]) == 3


def test_p6_reads_both_senders_at_the_same_relative_depth_and_sets_m_on_measured_text():
    """Issue 21 §4: the small sender was read at block 9 of 16 (56 %) and the medium one at 31 of 32
    (97 %): the ablation changed the depth with the size. Now both read their second-to-last block."""
    from telepathy.config import resolve_layer

    small, medium = jobs("p6_ablations", "seed=42")
    depth = {
        j.sender.name: resolve_layer(j.sender.layer, j.sender.num_layers) / j.sender.num_layers for j in (small, medium)
    }
    assert depth == {"llama32_1b": 15 / 16, "llama31_8b": 31 / 32}
    assert small.compression_basis == medium.compression_basis == "measured"
    for phase, narrow in (("p1_seeds", "task=sst2"), ("p3_baselines", "task=sst2"), ("p5_xsum", "seed=42")):
        assert jobs(phase, narrow, "method=bridge")[0].compression_basis == "measured", phase


# the jobs of each phase whose models differ (one task, one seed, one method per model pair)
TINY_SLICES = {
    "p1_seeds": (["task=sst2", "seed=42", "method=bridge"], [PAPER_PAIR]),
    "p2_probes": (["task=sst2"], [SMALL_PAIR[:1] + PAPER_PAIR[1:]] * 2),
    "p5_xsum": (["seed=42", "method=bridge"], [SMALL_PAIR]),
    "p6_ablations": (["seed=42"], [SMALL_PAIR, PAPER_PAIR]),
}
FAMILIES = {"llama31_8b": "llama", "llama32_1b": "llama", "mistral7b": "mistral", "qwen25_15b": "qwen2"}


@pytest.mark.parametrize("phase", sorted(TINY_SLICES))
def test_budget_tiny_shrinks_every_phase_to_two_layer_models_of_the_same_families(phase):
    narrow, pairs = TINY_SLICES[phase]
    tiny = jobs(phase, *narrow, "budget=tiny")
    assert [_models(t) for t in tiny] == pairs
    for t in tiny:
        validate(t)
        for role in ("sender", "receiver"):
            assert t[role].random_init and t[role].config_overrides.num_hidden_layers == 2
            assert t[role].family == FAMILIES[t[role].name] and t[role].stand_in == "smollm2_135m"
        assert t.task.train_samples == 32 and t.task.test_samples == 16 and t.trainer.max_steps == 4


def test_a_run_too_big_even_at_batch_1_stops_with_the_estimate():
    from telepathy.config import ConfigError

    [j] = jobs("p6_ablations", "+pair=medium", "seed=42", "cluster.gpu_mem_gb=10")
    with pytest.raises(ConfigError, match=r"at per-device training batch 1 it would need \d+\.\d GB"):
        resources.plan(j)


# which app runs each phase file: benchmarks/latency.py for P4, train.py for the rest
PHASE_APPS = {"p4_latency": "latency"}
# every phase file, the paper's (p1_seeds) and those of another scale (demo/p1_seeds: `make paper SCALE=demo`)
PHASE_FILES = sorted(
    p.relative_to(REPO / "conf" / "phase").with_suffix("").as_posix() for p in (REPO / "conf" / "phase").rglob("*.yaml")
)
# what a scale's phases launch with (scripts/paper.py SCALES): its cluster config, whose gpu_mem_gb a job must fit
SCALE_CLUSTER = {"demo": ("cluster=paper_demo", "smollm2_135m")}


@pytest.mark.parametrize("phase", PHASE_FILES)
def test_every_job_of_every_phase_passes_the_checks_a_launch_runs_first(phase):
    # the in-process dry run of `-m +phase=<phase>`: every job of the full sweep composes, passes
    # the validation that runs before a run dir exists (train.py) and gets a cluster request
    scale, _, base = phase.rpartition("/")
    cluster, sender = SCALE_CLUSTER[scale] if scale else (None, PAPER_PAIR[0])
    app = PHASE_APPS.get(base, "train")
    seeds = grid(phase, app).get("seed")
    # one seed of each: the seed selects no config group, so the others compose the same (seconds saved)
    every = jobs(phase, *([f"seed={seeds[0]}"] if seeds else []), *([cluster] if cluster else []), app=app)
    assert every, phase
    for cfg in every:
        if app == "train":
            validate(cfg)
            request = resources.plan(cfg)
            assert request.gpus >= 1 and request.mem_gb > 0 and request.timeout_min > 0, (phase, request)
        else:
            from telepathy.config import validate_latency

            validate_latency(cfg)
            assert cfg.bridge_checkpoint == "auto" and cfg.sender.name == sender
