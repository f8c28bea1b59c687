"""Every command in docs/ is run (or composed) by a test, so the docs cannot drift from the code.

Commands are read from the fenced code blocks and the inline ``code`` spans of docs/*.md
that start with ``python``. What each kind gets, and why:

* ``python train.py ...`` and ``python -m benchmarks.latency ...`` (runs, sweeps, phase
  launches): composed in-process with the same config, overrides and config name as the
  script, taking the first value of each swept key, then validated. Composition is where
  a documented command breaks (``+cluster=default`` appending a group the defaults list
  already has); running them would train or submit, and the dry-run path of a phase is
  run by tests/test_launcher.py.
* ``python -m telepathy status|aggregate|report|plan|control ...`` and ``python -m telepathy.prepare ...``:
  run for real (their ``main``) on
  synthetic run dirs (``control`` finds no job of them to hold/release/cancel), with ``outputs``
  pointing at a temporary folder.
* synopses with placeholders (``PHASE_DIR [--metric accuracy]``) are skipped: they are
  not commands.
* ```python blocks that start with an import (the read side's "In Python"): run as they
  are, on synthetic run dirs under ``outputs/runs``; a block that starts otherwise is a
  sketch of an interface (the Method protocol), not code to run.
* The shell lines of the local-cluster section (``up.sh``, ``pytest -m slurm``,
  ``down.sh``) are what CI itself runs to bring the cluster up and test it.
"""

from __future__ import annotations

import os
import re
import shlex

import pytest

from analysis_fixtures import write_run
from helpers import REPO
from telepathy.__main__ import COMMANDS as TOOLS

SCRIPTS = {"train.py": "train", "benchmarks.latency": "latency"}  # python train.py | python -m benchmarks.latency
CLI = {"telepathy.prepare", *(f"telepathy {name}" for name in TOOLS)}  # python -m telepathy.prepare | telepathy <tool>


def script_of(argv: list[str]) -> str | None:
    """The Hydra app a command starts (``train.py``, ``benchmarks.latency``), or None."""
    name = argv[2] if argv[1] == "-m" else argv[1]
    return name if name in SCRIPTS else None


def cli_kind(argv: list[str]) -> str | None:
    """What a ``python -m ...`` command runs: ``telepathy status`` (a tool) or ``telepathy.prepare`` (a module)."""
    if argv[1] != "-m":
        return None
    kind = " ".join(argv[2:4]) if argv[2] == "telepathy" else argv[2]
    return kind if kind in CLI else None


def doc_commands() -> list[tuple[str, str]]:
    """(file:line, command) for every distinct ``python ...`` command in docs/*.md."""
    found = []
    for path in sorted((REPO / "docs").glob("*.md")):
        fenced = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            candidates = [line] if fenced else re.findall(r"`(python [^`]+)`", line)
            for text in candidates:
                text = text.split(" #")[0].strip()
                if text.startswith("python ") and "[" not in text and not re.search(r"\b[A-Z]+_[A-Z]+\b", text):
                    found.append((f"{path.name}:{number}", text.replace(" ...", "")))
    # a command quoted twice is run once (its first place): `plan +phase=all` alone plans ~200 jobs
    return list({command: (where, command) for where, command in reversed(found)}.values())[::-1]


COMMANDS = doc_commands()


def test_docs_have_commands_and_each_is_handled():
    kinds = set()
    for where, command in COMMANDS:
        argv = shlex.split(command)
        kind = script_of(argv) or cli_kind(argv)
        assert kind, f"{where}: no test knows how to run `{command}`"
        kinds.add(kind)
    assert {"train.py", "benchmarks.latency", "telepathy status"} <= kinds


def _first_values(overrides: list[str]) -> list[str]:
    """Each swept override (``task=a,b``) reduced to its first value; launcher options kept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            out.append(f"{text.split('=', 1)[0]}={next(iter(parsed.sweep_string_iterator()))}")
        else:
            out.append(text)
    return out


@pytest.mark.parametrize(
    "where,command",
    [c for c in COMMANDS if script_of(shlex.split(c[1]))],
    ids=[c[0] for c in COMMANDS if script_of(shlex.split(c[1]))],
)
def test_documented_run_and_launch_commands_compose(where, command, monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from telepathy.config import check_added_keys, register_resolvers, validate

    monkeypatch.setenv("TELEPATHY_OUTPUTS", str(tmp_path))
    argv = shlex.split(command)
    script = script_of(argv)
    overrides = _first_values([a for a in argv[argv.index(script) + 1 :] if a not in ("-m", "--multirun")])
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=SCRIPTS[script], overrides=overrides)
    if script == "train.py":
        validate(cfg)
        check_added_keys(cfg, overrides)  # every +key=value the docs add is one the code reads
    assert cfg.get("cluster") is not None  # the launchers read cluster.*


@pytest.mark.parametrize(
    "where,command",
    [c for c in COMMANDS if cli_kind(shlex.split(c[1]))],
    ids=[c[0] for c in COMMANDS if cli_kind(shlex.split(c[1]))],
)
def test_documented_cli_commands_run(where, command, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)  # the docs say `outputs/...`: a fresh one here
    for runs in (tmp_path / "outputs" / "runs", tmp_path / "outputs" / "p1" / "runs"):  # also 'outputs/*/runs'
        for seed in (0, 1):
            write_run(runs, seed=seed, metrics={"accuracy": 0.8 + seed / 100}, correct=[1, 0, 1, 1])
    argv = shlex.split(command)
    module, args = ("telepathy.__main__", argv[3:]) if argv[2] == "telepathy" else (argv[2], argv[3:])
    if len(args) == (module == "telepathy.__main__"):  # a bare `python -m telepathy x` in a table names the tool
        args.append("--help")
    try:
        code = importlib.import_module(module).main(args)
    except SystemExit as stop:
        code = stop.code
    # --check exits 1 when a success check fails, as documented; two synthetic seeds may fail one
    assert code in (0, None) or (code == 1 and "--check" in args), f"{command} exited {code}"


def doc_snippets() -> list[tuple[str, str]]:
    """(file:line, code) of every ```python block of docs/*.md that starts with an import."""
    found = []
    for path in sorted((REPO / "docs").glob("*.md")):
        text = path.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
            code = match.group(1)
            if code.lstrip().startswith(("from ", "import ")):
                found.append((f"{path.name}:{text[: match.start()].count(chr(10)) + 1}", code))
    return found


@pytest.mark.parametrize("where,code", doc_snippets(), ids=[w for w, _ in doc_snippets()])
def test_documented_python_snippets_run(where, code, tmp_path, monkeypatch):
    """Before: docs/results.md's `from telepathy import analysis, aggregate, plots` raised ImportError."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        write_run(tmp_path / "outputs" / "runs", seed=seed, metrics={"accuracy": 0.8 + seed / 100}, correct=[1, 0, 1])
    exec(compile(code, where, "exec"), {"__name__": "__doc_snippet__"})


def test_make_demo_passes_args_to_train_py():
    """README: `make demo ARGS="budget=tiny seed=1"` (before: ARGS was ignored, the demo ran as is)."""
    import subprocess

    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", "ARGS=budget=tiny seed=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        # as a user types it, not under `make test` (whose MAKELEVEL makes make print its directory)
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("train.py budget=tiny seed=1"), proc.stdout
