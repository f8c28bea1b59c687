"""The method contract (telepathy/methods/) and the result record (telepathy/results.py),
checked without loading a model."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from helpers import REPO, TINY, compose
from telepathy import config, lifecycle, methods, results
from telepathy.config import ConfigError


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_keeps_the_contract(name):
    module = methods.get(name)
    assert isinstance(module.DETERMINISTIC, bool)
    assert callable(module.validate) and callable(module.run)
    methods.validate(compose(*TINY, f"method={name}"))  # its defaults pass its own checks


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports anywhere (function-local imports too; not
    under ``if TYPE_CHECKING``, which never runs)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & known


def test_the_import_graph_has_no_cycle():
    """config.py is a leaf (it once imported methods, which import the recipes, which import config)."""
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (REPO / "telepathy").rglob("*.py")
    }
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    assert not graph["telepathy.config"]

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert not sorted(name for name in graph if name in reachable(name))


# the two sides above the run core, and the command dispatcher above all three layers
UPPER_LAYERS = ("telepathy.cluster", "telepathy.analysis")
DISPATCHER = "telepathy.__main__"


def _every_import(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``: at module level or inside a function, under
    ``if TYPE_CHECKING`` too, ``from pkg import sub`` as ``pkg.sub``, relative imports resolved
    against ``package``, and ``importlib.import_module("...")`` of a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:  # `from . import x`, `from ..y import z`: relative to the module's package
                parts = package.split(".")
                module = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            found += [(node.lineno, module), *((node.lineno, f"{module}.{alias.name}") for alias in node.names)]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).split(".")[-1] in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_the_run_core_never_imports_the_cluster_or_the_read_side():
    """Three one-way layers. The run core (telepathy/ except cluster/, analysis/ and the
    ``python -m telepathy`` dispatcher) imports neither ``telepathy.cluster`` nor ``telepathy.analysis``,
    not even inside a function; cluster/ and analysis/ may import the core. What a run needs while
    it runs (its telemetry, its own memory estimate, the statistics of its metrics) lives in the core."""
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in sorted((REPO / "telepathy").rglob("*.py"))
    }

    def above(name: str) -> bool:
        return any(name == up or name.startswith(f"{up}.") for up in UPPER_LAYERS)

    offending: dict[str, str] = {}
    for name, path in files.items():
        if name == DISPATCHER or above(name):
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, module in _every_import(path, package):
            if above(module):  # named by the deepest module it reaches: `from telepathy.cluster import status`
                reached = max((known for known in files if module == known or module.startswith(f"{known}.")), key=len)
                where = f"{path.relative_to(REPO)}:{line}"
                offending[where] = max(offending.get(where, ""), reached, key=len)
    listed = "\n".join(f"{where} imports {module}" for where, module in sorted(offending.items()))
    assert not offending, f"the run core imports the cluster or the read side:\n{listed}"


def test_validation_runs_the_shared_checks_then_the_methods_own():
    bad_placement = compose("bridge.placement=middle")
    config.validate(bad_placement)  # only the bridge reads it ...
    with pytest.raises(ConfigError, match=r"bridge\.placement='middle' is not allowed"):
        methods.validate(bad_placement)  # ... so the bridge's own checks reject it
    methods.validate(compose("method=zeroshot", "bridge.placement=middle"))
    with pytest.raises(ConfigError, match=r"compression=0"):  # shared checks apply to every method
        methods.validate(compose("method=zeroshot", "compression=0"))
    with pytest.raises(ConfigError, match=r"method\.r=0 is not allowed; allowed: an integer in \[1, inf\]"):
        methods.validate(compose("method=lora", "method.r=0"))


def test_identity_block_says_what_a_run_used():
    bridge = results.run_identity(compose("compression=4"))
    assert bridge == {
        "task": "sst2",
        "method": "bridge",
        "sender": "smollm2_135m",
        "receiver": "gemma3_270m",
        "compression": 4,
        "num_latents": config.num_latents(compose("compression=4")),
        "layer": 16,
        "model": None,
        "seed": 42,
    }
    relay = results.run_identity(compose("method=text_relay"))
    assert relay["compression"] is None and relay["num_latents"] is None and relay["sender"] == "smollm2_135m"
    tuned = results.run_identity(compose("method=prompt_tuning", "compression=16"))
    assert (tuned["sender"], tuned["layer"], tuned["compression"]) == (None, None, 16)
    probe = results.run_identity(compose("method=zeroshot", "method.model=llama32_1b"))
    assert (probe["sender"], probe["receiver"], probe["model"]) == (None, None, "llama32_1b")
    with pytest.raises(ValueError, match="identity has no field"):
        results.identity_block(batch_size=2)


def test_memory_facts_do_not_change_run_ids():
    """The method's ``memory:`` block is for the resource plan only: not part of a run's id."""
    cfg = compose("method=fewshot")
    assert cfg.method.memory.demos_per_class == cfg.method.shots
    assert config.run_name(cfg) == config.run_name(compose("method=fewshot", "method.memory.demos_per_class=9"))


def test_reusing_a_deterministic_run_copies_its_whole_record(tmp_path):
    """A second seed of a deterministic method copies every section the first measured, its
    own sections included (a reused linear_probe once lost `probe`), and loads no model."""
    first = compose(*TINY, "method=linear_probe", "seed=1", f"paths.output_dir={tmp_path}")
    source_dir = config.run_dir(first)
    source = results.record(
        "completed",
        run_id=source_dir.name,
        run_dir=source_dir,
        identity=results.run_identity(first),
        config={},
        seedless_hash=config.config_hash(first, exclude=("seed",)),
        reused_from=None,
        metrics={"accuracy": 0.75},
        params={"trainable": 65},
        timing={"train_s": 1.0, "eval_s": 0.5},
        probe={"layers": [1, 2], "reported_layer": 2},
        memory={"peak_rss_mb": 1.0},
    )
    results.write_json(source_dir / results.RESULT_FILE, source)
    (source_dir / results.PREDICTIONS_FILE).write_text('{"idx": 0, "pred": 1}\n')

    second = compose(*TINY, "method=linear_probe", "seed=2", f"paths.output_dir={tmp_path}")
    assert lifecycle.main(second) == {"accuracy": 0.75}
    reused = json.loads((config.run_dir(second) / results.RESULT_FILE).read_text())
    assert reused["reused_from"] == str(source_dir) and reused["status"] == "completed"
    assert reused["probe"] == source["probe"] and reused["params"] == source["params"]
    assert reused["timing"] == source["timing"] and "memory" not in reused  # nothing was measured here
    assert reused["identity"] == {**source["identity"], "seed": 2} and reused["seed"] == 2
    assert (Path(reused["run_dir"]) / results.PREDICTIONS_FILE).read_text() == '{"idx": 0, "pred": 1}\n'


@pytest.mark.parametrize(
    "classes,warning",
    [
        (1, "WARNING: single_class: the readout answers one class for every test item (the bridge collapsed)"),
        (0, "WARNING: unparsed: no test answer could be parsed (every item counts as wrong, so accuracy is 0, not the"),
    ],
)
def test_the_final_metrics_say_collapse_only_when_one_class_was_predicted(classes, warning, caplog):
    """Before: a generate readout whose answers were all unparseable (accuracy 0.0) was called a collapse,
    'one class predicted for every test item'."""
    from telepathy.methods.bridge import run_flags

    diagnostics = {"soft_token_cosine_mean": 0.9, "predicted_classes": classes, "single_class": True}
    bridge = {
        "num_latents": 8,
        "compression_factor": 8,
        "measured_compression_mean": 3.0,
        "text_tokens_mean": 24.0,
        "diagnostics": diagnostics,
        "flags": run_flags({"accuracy": 0.0}, diagnostics, {}),
    }
    record = {"method": "bridge", "task": "sst2", "seed": 1, "run_dir": "r", "metrics": {"accuracy": 0.0}}
    with caplog.at_level("INFO", logger="telepathy"):
        lifecycle._log_summary({**record, "bridge": bridge})
    assert warning in caplog.text
    assert ("the bridge collapsed" in caplog.text) == (classes == 1)
