"""Hydra/submitit glue: launch a sweep (``python train.py -m ...``) on SLURM or locally.

What it changes in hydra-submitit-launcher's ``BaseSubmititLauncher``:

* ``launch`` is replaced. It plans the sweep with ``telepathy.cluster.sweep.plan``
  (compose, validate and resource-plan every job before anything is submitted; skip
  completed, still-active and duplicate runs), prints the plan and stops there under
  ``+dry_run=true``, else submits one submitit job array per resource class (that
  class's GPUs, CPUs, memory and time limit) and writes ``jobs.json``
  (``sweep.write_manifest``), which ``python -m telepathy status`` reads. On SLURM it
  returns as soon as the arrays are queued. Unlike upstream it builds the executor
  itself (per-class parameters, ``env`` exported in every sbatch script) and does not
  apply ``hydra.sweep.mode`` to the sweep dir.
* ``checkpoint`` is upstream's (requeue the same job with the same arguments, so it
  resumes in the same run dir) plus a log line.
* ``TelepathyBasicLauncher`` is ``python train.py -m``'s default (conf/hydra/launcher/default.yaml):
  Hydra's basic launcher (the jobs one after another, in this process), except that every job
  of the sweep is composed and checked before the first one runs (one line per bad job, none
  run), and that a job which fails is a row of the end table, not the end of the sweep.
* A failed job never ends a sweep: Hydra's sweeper re-raises the error of a failed job as soon
  as its batch is back, so the other launchers' failed jobs come back as ``FailedJob``, whose
  value is its error (the multirun summary shows it and exits 1).
* Three config nodes: ``hydra/launcher=telepathy_slurm``, ``telepathy_local`` and
  ``telepathy_basic`` (conf/hydra/launcher/slurm.yaml, local.yaml and default.yaml select them).
"""

import contextlib
import hashlib
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from telepathy.cluster import packing, preflight, sweep
from telepathy.cluster.status import alive_runs
from telepathy.cluster.sweep import PlannedJob

log = logging.getLogger(__name__)

# executor parameters this launcher sets per resource class, ignoring the launcher config's values
PER_CLASS_KEYS = {"gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"}


def batch_lines(planned: list[PlannedJob]) -> str:
    """One line per queued job that trains: its per-device batch and why (``resources.batch_plan``)."""
    from telepathy.resources import describe_batch

    lines = [
        f"batch #{j.idx}: {describe_batch(j.resources.batch)}"
        for j in planned
        if j.state == "queue" and getattr(j.resources, "batch", None)
    ]
    return "".join(f"\n{line}" for line in lines)


class _TelepathyMixin:
    """``launch`` replaced: plan with telepathy.cluster.sweep, then one submitit array per resource class."""

    _EXECUTOR = "abstract"
    _WAIT_FOR_RESULTS = False

    def plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[PlannedJob]:
        def compose(overrides: list[str]):
            return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

        alive = alive_runs(Path(str(self.config.paths.output_dir)))
        return sweep.plan(compose, self.config, job_overrides, initial_job_idx, alive)

    # ---------------------------------------------------------------- launching
    def _executor(self, resources):
        import submitit

        params = dict(self.params)
        for key in ("dry_run", "env"):
            params.pop(key, None)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(LocalQueueConf).keys())
        prefixed = {
            (k if k in base else f"{self._EXECUTOR}_{k}"): v
            for k, v in params.items()
            if k not in PER_CLASS_KEYS and v is not None
        }
        if self._EXECUTOR == "slurm":
            setup = list(prefixed.pop("slurm_setup", None) or [])
            setup += [f"export {k}={shlex.quote(str(v))}" for k, v in (self.params.get("env") or {}).items()]
            prefixed["slurm_setup"] = setup
        executor.update_parameters(
            **prefixed,
            gpus_per_node=resources.gpus,
            cpus_per_task=resources.cpus,
            mem_gb=resources.mem_gb,
            timeout_min=resources.timeout_min,
        )
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except sweep.LaunchError as err:  # the message says it all: no traceback
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        dry = bool(self.params.get("dry_run")) or bool(OmegaConf.select(self.config, "dry_run", default=False))
        phase = sweep.phase(self.config)
        output_dir = Path(str(self.config.paths.output_dir))
        # plan-then-submit under a lock per output root: a concurrent launch plans after this one has queued
        with contextlib.nullcontext() if dry else sweep.launch_lock(output_dir):
            planned = self.plan(job_overrides, initial_job_idx)
            header = (
                f"{'DRY RUN (nothing submitted): ' if dry else ''}{len(planned)} jobs"
                f"{' of phase ' + phase if phase else ''} via {self._EXECUTOR}"
            )
            summary = sweep.describe(planned, header) + batch_lines(planned)
            if dry:
                print(summary, flush=True)
                return [_job_return(j, "dry_run") for j in planned]
            log.info("%s", summary)
            submitted = self._submit(planned, sweep_dir, phase, output_dir)

        if not self._WAIT_FOR_RESULTS:
            return [_job_return(j, "queued" if j.state == "queue" else j.state) for j in planned]
        results = {job.idx: kept(handle.results()[0]) for job, handle in submitted}
        return [results.get(j.idx) or _job_return(j, j.state) for j in planned]

    def _preflight(self, classes, packs=()) -> None:
        """Refuse, before the first sbatch, arrays that no node of the partition can run (one line)."""
        enabled = OmegaConf.select(self.config, "cluster.preflight", default=True)
        if not isinstance(enabled, bool):
            raise sweep.LaunchError(f"cluster.preflight={enabled!r} is not allowed; allowed: true, false")
        if self._EXECUTOR != "slurm" or not enabled or not (classes or packs):
            return
        requests = {name: jobs[0].resources for name, jobs in classes.items()}
        for pack in packs:  # a pack asks for one GPU and its members' CPUs and memory added up
            res = packing.resources(pack)
            requests.setdefault(f"pack-{res.class_name}", res)
        problem = preflight.check(requests, self.params.get("partition"))
        if problem:
            raise sweep.LaunchError(problem)

    def _submit(self, planned: list[PlannedJob], sweep_dir: Path, phase, output_dir: Path) -> list:
        """Packs of small runs (one array per resource class of packs), then one array per resource class;
        each is added to jobs.json as soon as sbatch accepts it, so a later failing sbatch leaves no
        queued job unrecorded."""
        written = self.__dict__.setdefault("_manifest_dirs", set())  # a batched sweeper launches more than once
        sweep.check_sweep_dir(sweep_dir, str(sweep_dir) in written)
        queue = [j for j in planned if j.state == "queue"]
        packs: list[list[PlannedJob]] = []
        if self._EXECUTOR == "slurm":  # small runs share a GPU: several runs in one job (cluster/packing.py)
            packs, queue = packing.split(queue, self.config)
        classes = sweep.group(queue)
        self._preflight(classes, packs)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        manifest = sweep.write_manifest(
            sweep_dir, [j for j in planned if j.state not in ("queue", "shared")], [], phase, self._EXECUTOR
        )
        written.add(str(sweep_dir))

        def intend(executor, label: str, tasks: list[list[PlannedJob]]) -> str:
            """Name the array after this launch and record it before its sbatch (``sweep.record_intent``):
            a launcher killed during the sbatch leaves it findable in squeue by that name."""
            token = hashlib.sha1(f"{sweep_dir}:{label}:{tasks[0][0].idx}".encode()).hexdigest()[:8]
            job_name = f"{self.config.hydra.job.name}-{label}-{token}"
            executor.update_parameters(name=job_name)
            sweep.record_intent(sweep_dir, job_name, label, tasks, phase, self._EXECUTOR)
            return job_name

        def refused(job_name: str) -> None:
            """sbatch answered with an error: the array was not queued, so its intent goes."""
            sweep.write_manifest(sweep_dir, [], [], phase, self._EXECUTOR, done_intent=job_name)

        def recorded(array: dict, jobs: list[PlannedJob], job_name: str) -> None:
            arrays.append(array)
            sweep.write_manifest(
                sweep_dir, jobs + sweep.sharers(planned, jobs), [array], phase, self._EXECUTOR, done_intent=job_name
            )

        arrays: list[dict] = []
        self._submit_packs(packs, intend, refused, recorded, manifest, output_dir, arrays)
        n_packed = sum(len(p) for p in packs)
        state = Singleton.get_state()
        submitted = []
        for name, jobs in classes.items():
            executor = self._executor(jobs[0].resources)
            job_name = intend(executor, name, [[j] for j in jobs])
            args = [(j.job_overrides, "hydra.sweep.dir", j.idx, f"job_id_for_{j.idx}", state) for j in jobs]
            try:
                handles = executor.map_array(self, *zip(*args))
            except Exception as err:  # noqa: BLE001 - sbatch refused it: say what is queued and recorded
                refused(job_name)
                raise sweep.partial_launch_error(err, name, len(jobs), arrays, manifest, output_dir) from None
            for job, handle in zip(jobs, handles):
                job.slurm_job_id = str(handle.job_id)
            submitted += list(zip(jobs, handles))
            array_id = str(handles[0].job_id).split("_")[0] if handles else None
            recorded(
                {"class": name, "job_id": array_id, "n_jobs": len(jobs), "resources": jobs[0].resources.to_dict()},
                jobs,
                job_name,
            )
            log.info("queued array %s (%s): %d jobs", array_id, name, len(jobs))
        print(
            f"queued {len(submitted) + n_packed} jobs in {len(arrays)} arrays, skipped "
            f"{sum(j.state != 'queue' for j in planned)}; manifest {manifest}\n"
            f"watch: python -m telepathy status {output_dir}",
            flush=True,
        )
        return submitted

    def _submit_packs(
        self,
        packs: list[list[PlannedJob]],
        intend,
        refused,
        recorded,
        manifest: Path,
        output_dir: Path,
        arrays: list[dict],
    ) -> None:
        """One array per resource class of packs; every member records its pack's job id, and each array
        is recorded as an intent before its sbatch (``intend``) and goes into jobs.json (``recorded``)
        right after sbatch accepts it (or the intent goes, ``refused``, when sbatch says no)."""
        by_class: dict = {}
        for pack in packs:
            by_class.setdefault(packing.resources(pack).class_name, []).append(pack)
        for name, group in by_class.items():
            res = packing.resources(group[0])
            executor = self._executor(res)
            job_name = intend(executor, f"pack-{name}", group)
            n_jobs = sum(len(p) for p in group)
            try:
                handles = executor.map_array(packing.Pack(), [[packing.member_args(j) for j in p] for p in group])
            except Exception as err:  # noqa: BLE001 - sbatch refused it: say what is queued and recorded
                refused(job_name)
                raise sweep.partial_launch_error(err, f"pack-{name}", n_jobs, arrays, manifest, output_dir) from None
            for pack, handle in zip(group, handles):
                for job in pack:
                    job.slurm_job_id = str(handle.job_id)
            array = {
                "class": f"pack-{name}",
                "job_id": str(handles[0].job_id).split("_")[0],
                "n_jobs": n_jobs,
                "packs": len(group),
                "resources": res.to_dict(),
            }
            recorded(array, [j for p in group for j in p], job_name)
            log.info("queued array %s (%d packs of small runs sharing a GPU)", array["job_id"], len(group))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue this job with the same arguments: it resumes in the same run dir."""
        import submitit

        log.warning("preempted or timing out: requeueing %s", " ".join(filter_overrides(args[0]) if args else []))
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class FailedJob(JobReturn):
    """A job whose run failed (its result.json says so, with the error). Its value is its error
    instead of raising it, so that Hydra's sweeper goes on to the next batch and the sweep ends
    with the multirun summary, which shows the job as failed and exits 1."""

    @property
    def return_value(self):
        return self._return_value

    @return_value.setter
    def return_value(self, value) -> None:
        self._return_value = value


def kept(ret: JobReturn) -> JobReturn:
    """``ret``, or for a failed job the same job as a ``FailedJob`` (status FAILED, error as value)."""
    if ret.status != JobStatus.FAILED:
        return ret
    failed = FailedJob()
    failed.__dict__.update(ret.__dict__)
    return failed


def check_job(cfg) -> str | None:
    """What stops one composed job before anything runs (one line), or None: the checks that
    ``${telepathy.run_dir:}`` makes when Hydra resolves the job's directory."""
    from telepathy import hydra_glue

    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # the job's own ${hydra:...} values resolve as they will when it runs
    try:
        hydra_glue.checked_run_dir(_root_=cfg)
    except hydra_glue.UsageError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - listed with the others; the run itself would raise it too
        return f"{type(err).__name__}: {err}"
    finally:
        HydraConfig.instance().cfg = previous
    return None


class TelepathyBasicLauncher(BasicLauncher):
    """``python train.py -m``: check every job, then run them one after another in this process."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        jobs, problems = [], []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = cfg.hydra.job.num = idx
            problem = check_job(cfg)
            if problem:
                problems.append(f"  #{idx} {' '.join(filter_overrides(overrides))}: {problem}")
            jobs.append((idx, overrides, cfg))
        if problems:
            bad = f"{len(problems)} of {len(jobs)} jobs {'is' if len(problems) == 1 else 'are'} invalid"
            print(f"error: {bad}; none ran:\n" + "\n".join(problems), file=sys.stderr, flush=True)
            raise SystemExit(1)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs locally", len(jobs))
        runs = []
        for idx, overrides, cfg in jobs:
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=cfg,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            runs.append(kept(ret))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs


def _job_return(job: PlannedJob, state: str) -> JobReturn:
    ret = JobReturn(overrides=job.overrides, working_dir=job.run_dir, task_name="train", status=JobStatus.COMPLETED)
    ret.return_value = {
        "state": state,
        "run_dir": job.run_dir,
        "slurm_job_id": job.slurm_job_id,
        "resources": job.resources.to_dict(),
    }
    return ret


class TelepathySlurmLauncher(_TelepathyMixin, BaseSubmititLauncher):
    _EXECUTOR = "slurm"
    _WAIT_FOR_RESULTS = False


class TelepathyLocalLauncher(_TelepathyMixin, BaseSubmititLauncher):
    _EXECUTOR = "local"
    _WAIT_FOR_RESULTS = True


@dataclass
class TelepathySlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.telepathy_launcher.launcher.TelepathySlurmLauncher"
    dry_run: bool = False
    # typed Any so that they can interpolate the cluster group (${cluster.setup}, ...),
    # which is merged after the launcher config is composed
    setup: Any = None
    additional_parameters: Any = field(default_factory=dict)
    # exported in every job's sbatch script after ``setup``
    env: Any = field(default_factory=dict)


@dataclass
class TelepathyLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.telepathy_launcher.launcher.TelepathyLocalLauncher"
    dry_run: bool = False


@dataclass
class TelepathyBasicConf:
    _target_: str = "hydra_plugins.telepathy_launcher.launcher.TelepathyBasicLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="telepathy_basic", node=TelepathyBasicConf, provider="telepathy_launcher"
)
ConfigStore.instance().store(
    group="hydra/launcher", name="telepathy_slurm", node=TelepathySlurmConf, provider="telepathy_launcher"
)
ConfigStore.instance().store(
    group="hydra/launcher", name="telepathy_local", node=TelepathyLocalConf, provider="telepathy_launcher"
)
