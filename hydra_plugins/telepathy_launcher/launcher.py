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
* Two config nodes: ``hydra/launcher=telepathy_slurm`` and ``telepathy_local``
  (conf/hydra/launcher/slurm.yaml and local.yaml select them).
"""

import contextlib
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

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
        results = {job.idx: handle.results()[0] for job, handle in submitted}
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

        def recorded(array: dict, jobs: list[PlannedJob]) -> None:
            arrays.append(array)
            sweep.write_manifest(sweep_dir, jobs + sweep.sharers(planned, jobs), [array], phase, self._EXECUTOR)

        arrays: list[dict] = []
        self._submit_packs(packs, recorded, manifest, output_dir, arrays)
        n_packed = sum(len(p) for p in packs)
        state = Singleton.get_state()
        submitted = []
        for name, jobs in classes.items():
            executor = self._executor(jobs[0].resources)
            executor.update_parameters(name=f"{self.config.hydra.job.name}-{name}")
            args = [(j.job_overrides, "hydra.sweep.dir", j.idx, f"job_id_for_{j.idx}", state) for j in jobs]
            try:
                handles = executor.map_array(self, *zip(*args))
            except Exception as err:  # noqa: BLE001 - sbatch refused it: say what is queued and recorded
                raise sweep.partial_launch_error(err, name, len(jobs), arrays, manifest, output_dir) from None
            for job, handle in zip(jobs, handles):
                job.slurm_job_id = str(handle.job_id)
            submitted += list(zip(jobs, handles))
            array_id = str(handles[0].job_id).split("_")[0] if handles else None
            recorded(
                {"class": name, "job_id": array_id, "n_jobs": len(jobs), "resources": jobs[0].resources.to_dict()}, jobs
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
        self, packs: list[list[PlannedJob]], recorded, manifest: Path, output_dir: Path, arrays: list[dict]
    ) -> None:
        """One array per resource class of packs; every member records its pack's job id, and each array
        goes into jobs.json (``recorded``) right after sbatch accepts it."""
        by_class: dict = {}
        for pack in packs:
            by_class.setdefault(packing.resources(pack).class_name, []).append(pack)
        for name, group in by_class.items():
            res = packing.resources(group[0])
            executor = self._executor(res)
            executor.update_parameters(name=f"{self.config.hydra.job.name}-pack-{name}")
            n_jobs = sum(len(p) for p in group)
            try:
                handles = executor.map_array(packing.Pack(), [[packing.member_args(j) for j in p] for p in group])
            except Exception as err:  # noqa: BLE001 - sbatch refused it: say what is queued and recorded
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
            recorded(array, [j for p in group for j in p])
            log.info("queued array %s (%d packs of small runs sharing a GPU)", array["job_id"], len(group))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue this job with the same arguments: it resumes in the same run dir."""
        import submitit

        log.warning("preempted or timing out: requeueing %s", " ".join(filter_overrides(args[0]) if args else []))
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


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


ConfigStore.instance().store(
    group="hydra/launcher", name="telepathy_slurm", node=TelepathySlurmConf, provider="telepathy_launcher"
)
ConfigStore.instance().store(
    group="hydra/launcher", name="telepathy_local", node=TelepathyLocalConf, provider="telepathy_launcher"
)
