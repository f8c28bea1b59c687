"""Launch a sweep (``python train.py -m ...``) on SLURM or locally through submitit.

What this adds to hydra-submitit-launcher's launchers:

* every job's config is composed and checked (``telepathy.config.validate`` and
  the resource plan) before anything is submitted: one bad job aborts the launch
  with every problem listed and zero jobs queued;
* each job's run dir is ``telepathy.config.run_dir(cfg)``; a run whose
  result.json says ``completed`` is skipped (``+rerun=all`` forces it), and so is
  a run whose previous SLURM job is still queued or running;
* resources are planned per job (``telepathy.resources.plan``) and jobs are
  grouped by resource class: one submitit job array per class, with that class's
  GPUs, CPUs, memory and time limit; the plan is passed to the job as
  ``resources.*`` overrides so result.json records it;
* ``+dry_run=true`` (or ``hydra.launcher.dry_run=true``) prints every job with
  its resources and GPU-hours and submits nothing;
* on SLURM, ``launch`` returns as soon as the arrays are queued and writes
  ``jobs.json`` (run dirs, SLURM job ids, resources) into the sweep dir, which
  ``python -m telepathy.status`` reads;
* ``checkpoint`` (called by submitit on the pre-timeout / preemption signal, after
  the training loop saved its checkpoint) requeues the same job with the same
  arguments, so it runs again in the same run dir and resumes.
"""

import json
import logging
import shlex
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

MANIFEST = "jobs.json"
MANIFEST_VERSION = 1
# executor parameters this launcher sets per resource class, ignoring the launcher config's values
PER_CLASS_KEYS = {"gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"}

@dataclass
class PlannedJob:
    """One job of the sweep after composition, validation and resource planning."""

    idx: int
    overrides: List[str]
    run_dir: str
    # "queue" | "skipped" (completed) | "active" (its earlier SLURM job is still alive)
    # | "duplicate" (an earlier job of this sweep has the same run dir)
    state: str
    resources: Any = None  # telepathy.resources.Resources
    reason: str = ""
    slurm_job_id: Optional[str] = None
    kind: str = "run"  # "run": a train.py run dir with result.json | "benchmark": another app's job dir

    @property
    def job_overrides(self) -> List[str]:
        """The sweep overrides plus the resource plan, which result.json records."""
        r = self.resources
        extra = [f"++resources.gpus={r.gpus}", f"++resources.cpus={r.cpus}", f"++resources.mem_gb={r.mem_gb}",
                 f"++resources.timeout_min={r.timeout_min}", f"++resources.estimate_gb={r.estimate_gb:.3f}",
                 f"++resources.device_gb=[{','.join(f'{g:.3f}' for g in r.device_gb)}]"]
        extra += [f"++resources.placement.{role}='{dev}'" for role, dev in r.placement.items()]
        return list(self.overrides) + extra

class LaunchError(ValueError):
    """The sweep cannot be launched; nothing was submitted."""

class _TelepathyMixin:
    """Planning, validation, skipping, grouping and the manifest, shared by both executors."""

    _EXECUTOR = "abstract"
    _WAIT_FOR_RESULTS = False

    # ---------------------------------------------------------------- planning
    def _compose(self, overrides: List[str]):
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _plan_job(self, idx: int, overrides: List[str], rerun: bool, alive: Dict[str, str]) -> PlannedJob:
        from telepathy import resources
        from telepathy.config import run_dir, validate
        from telepathy.results import read_result

        cfg = self._compose(overrides)
        if OmegaConf.select(cfg, "method.name") is None:
            return self._plan_benchmark_job(idx, overrides, cfg)
        validate(cfg)
        plan = resources.plan(cfg)
        rdir = str(run_dir(cfg))
        job = PlannedJob(idx=idx, overrides=list(overrides), run_dir=rdir, state="queue", resources=plan)
        if rerun:
            return job
        record = read_result(Path(rdir)) or {}
        if record.get("status") == "completed":
            job.state, job.reason = "skipped", "completed (+rerun=all to run it again)"
        elif rdir in alive:
            job.state, job.reason = "active", f"SLURM job {alive[rdir]} is still queued or running"
            job.slurm_job_id = alive[rdir]
        return job

    def _plan_benchmark_job(self, idx: int, overrides: List[str], cfg) -> PlannedJob:
        """A job of another Hydra app on the same conf/ tree (benchmarks/latency.py): no method,
        so no run id to skip on; it gets one GPU and the per-GPU CPU/memory request."""
        from telepathy.resources import Resources

        if OmegaConf.select(cfg, "cluster") is None:
            raise LaunchError("this app's config has no cluster group: add `+cluster=default` to the command "
                              "(or `- cluster: default` to its defaults list)")
        cluster = cfg.cluster
        plan = Resources(gpus=1, cpus=int(cluster.cpus_per_gpu), mem_gb=int(cluster.mem_gb_per_gpu),
                         timeout_min=int(cluster.timeout_min), placement={"sender": "cuda:0", "receiver": "cuda:0"})
        job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        return PlannedJob(idx=idx, overrides=list(overrides), run_dir=str(job_dir), state="queue", resources=plan,
                          kind="benchmark")

    def plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> List[PlannedJob]:
        """Compose, validate and plan every job; raise LaunchError listing every bad one."""
        from telepathy.status import alive_runs

        rerun = str(OmegaConf.select(self.config, "rerun", default="")) == "all"
        alive = {} if rerun else alive_runs(Path(str(self.config.paths.output_dir)))
        planned, errors = [], []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            try:
                planned.append(self._plan_job(idx, list(overrides), rerun, alive))
            except Exception as err:  # noqa: BLE001 - every composition/validation error is reported together
                errors.append(f"  #{idx} [{' '.join(filter_overrides(overrides))}]\n"
                              f"      {type(err).__name__}: {err}")
        first: Dict[str, int] = {}
        for job in planned:  # e.g. a sweep over a key that run.id_exclude leaves out of the run id
            if job.run_dir in first:
                job.state, job.reason = "duplicate", f"same run dir as job #{first[job.run_dir]}"
            else:
                first[job.run_dir] = job.idx
        if errors:
            raise LaunchError(f"{len(errors)} of {len(job_overrides)} jobs are invalid; nothing was submitted:\n"
                              + "\n".join(errors))
        return planned

    # ---------------------------------------------------------------- reporting
    @staticmethod
    def describe(planned: List[PlannedJob], header: str) -> str:
        rows = [("#", "state", "gpus", "cpus", "mem", "time", "est GB", "GPU-h", "run", "overrides")]
        for j in planned:
            r = j.resources
            state = {"queue": "queue", "skipped": "skip", "active": "active", "duplicate": "dup"}[j.state]
            rows.append((str(j.idx), state, str(r.gpus), str(r.cpus), f"{r.mem_gb}G", f"{r.timeout_min}m",
                         "/".join(f"{g:.1f}" for g in r.device_gb), f"{r.gpu_hours:.1f}",
                         Path(j.run_dir).name, " ".join(filter_overrides(j.overrides))))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
        lines = [header]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        classes = _group(j for j in planned if j.state == "queue")
        for name, jobs in classes.items():
            r = jobs[0].resources
            lines.append(f"array {name}: {len(jobs)} jobs, --gpus-per-node={r.gpus} --cpus-per-task={r.cpus} "
                         f"--mem={r.mem_gb}G --time={r.timeout_min}, up to "
                         f"{sum(j.resources.gpu_hours for j in jobs):.1f} GPU-hours")
        n_queue = sum(j.state == "queue" for j in planned)
        total = sum(j.resources.gpu_hours for j in planned if j.state == "queue")
        lines.append(f"total: {n_queue} to run in {len(classes)} arrays, "
                     f"{sum(j.state == 'skipped' for j in planned)} skipped (completed), "
                     f"{sum(j.state == 'active' for j in planned)} still queued/running, "
                     f"{sum(j.state == 'duplicate' for j in planned)} duplicates; "
                     f"up to {total:.1f} GPU-hours (GPUs x time limit)")
        return "\n".join(lines)

    def _write_manifest(self, sweep_dir: Path, planned: List[PlannedJob], arrays: List[dict]) -> Path:
        from telepathy.results import write_json

        path = sweep_dir / MANIFEST
        manifest = {"schema_version": MANIFEST_VERSION, "phase": _phase(self.config), "launcher": self._EXECUTOR,
                    "sweep_dir": str(sweep_dir), "command": " ".join(shlex.quote(a) for a in sys.argv),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "arrays": [], "jobs": []}
        if path.exists():  # a sweeper that launches in batches: one manifest for the whole sweep
            manifest = json.loads(path.read_text())
        manifest["arrays"] += arrays
        manifest["jobs"] += [{"idx": j.idx, "state": "queued" if j.state == "queue" else j.state,
                              "reason": j.reason, "kind": j.kind, "run_dir": j.run_dir, "overrides": j.overrides,
                              "slurm_job_id": j.slurm_job_id,
                              "resources": {**j.resources.to_dict(), "class": j.resources.class_name}}
                             for j in planned]
        write_json(path, manifest)
        return path

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
        prefixed = {(k if k in base else f"{self._EXECUTOR}_{k}"): v
                    for k, v in params.items() if k not in PER_CLASS_KEYS and v is not None}
        if self._EXECUTOR == "slurm":
            setup = list(prefixed.pop("slurm_setup", None) or [])
            setup += [f"export {k}={shlex.quote(str(v))}" for k, v in (self.params.get("env") or {}).items()]
            prefixed["slurm_setup"] = setup
        executor.update_parameters(**prefixed, gpus_per_node=resources.gpus, cpus_per_task=resources.cpus,
                                   mem_gb=resources.mem_gb, timeout_min=resources.timeout_min)
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        planned = self.plan(job_overrides, initial_job_idx)
        dry = bool(self.params.get("dry_run")) or bool(OmegaConf.select(self.config, "dry_run", default=False))
        phase = _phase(self.config)
        header = (f"{'DRY RUN (nothing submitted): ' if dry else ''}{len(planned)} jobs"
                  f"{' of phase ' + phase if phase else ''} via {self._EXECUTOR}")
        summary = self.describe(planned, header)
        if dry:
            print(summary, flush=True)
            return [_job_return(j, "dry_run") for j in planned]
        log.info("%s", summary)
        sweep_dir.mkdir(parents=True, exist_ok=True)

        state = Singleton.get_state()
        arrays, submitted = [], []
        for name, jobs in _group(j for j in planned if j.state == "queue").items():
            executor = self._executor(jobs[0].resources)
            executor.update_parameters(name=f"{self.config.hydra.job.name}-{name}")
            args = [(j.job_overrides, "hydra.sweep.dir", j.idx, f"job_id_for_{j.idx}", state) for j in jobs]
            handles = executor.map_array(self, *zip(*args))
            for job, handle in zip(jobs, handles):
                job.slurm_job_id = str(handle.job_id)
            submitted += list(zip(jobs, handles))
            array_id = str(handles[0].job_id).split("_")[0] if handles else None
            arrays.append({"class": name, "job_id": array_id, "n_jobs": len(jobs),
                           "resources": jobs[0].resources.to_dict()})
            log.info("queued array %s (%s): %d jobs", array_id, name, len(jobs))
        manifest = self._write_manifest(sweep_dir, planned, arrays)
        print(f"queued {len(submitted)} jobs in {len(arrays)} arrays, skipped "
              f"{sum(j.state != 'queue' for j in planned)}; manifest {manifest}\n"
              f"watch: python -m telepathy.status {self.config.paths.output_dir}", flush=True)

        if not self._WAIT_FOR_RESULTS:
            return [_job_return(j, "queued" if j.state == "queue" else j.state) for j in planned]
        results = {job.idx: handle.results()[0] for job, handle in submitted}
        return [results.get(j.idx) or _job_return(j, j.state) for j in planned]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue this job with the same arguments: it resumes in the same run dir."""
        import submitit

        log.warning("preempted or timing out: requeueing %s", " ".join(filter_overrides(args[0]) if args else []))
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

def _group(jobs) -> "OrderedDict[str, List[PlannedJob]]":
    classes: "OrderedDict[str, List[PlannedJob]]" = OrderedDict()
    for job in sorted(jobs, key=lambda j: (j.resources.resource_class, j.idx)):
        classes.setdefault(job.resources.class_name, []).append(job)
    return classes

def _phase(config) -> Optional[str]:
    return OmegaConf.select(config, "hydra.runtime.choices.phase", default=None)

def _job_return(job: PlannedJob, state: str) -> JobReturn:
    ret = JobReturn(overrides=job.overrides, working_dir=job.run_dir, task_name="train", status=JobStatus.COMPLETED)
    ret.return_value = {"state": state, "run_dir": job.run_dir, "slurm_job_id": job.slurm_job_id,
                        "resources": job.resources.to_dict()}
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

ConfigStore.instance().store(group="hydra/launcher", name="telepathy_slurm", node=TelepathySlurmConf,
                             provider="telepathy_launcher")
ConfigStore.instance().store(group="hydra/launcher", name="telepathy_local", node=TelepathyLocalConf,
                             provider="telepathy_launcher")
