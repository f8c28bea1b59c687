"""Packing: small runs share a GPU, as several runs in one SLURM job on one GPU.

Why this and not ``gres/shard``: shards (SLURM >= 22.05) need the site's slurm.conf and
gres.conf to declare them on every GPU node, which most clusters do not, and they isolate
nothing either (a shard is a scheduling count; every process sees the whole card). A job
that runs k runs side by side needs nothing from the site, works on any SLURM and on the
local test cluster as it is, and isolates the runs as processes:

* every member is its own ``python train.py <its overrides>`` process, writing its own run
  dir and result.json; one that fails (even a CUDA OOM) does not stop the others, and the
  job waits for all of them;
* SIGUSR2 (preemption, time limit) and SIGTERM (``scancel``) are passed to every member,
  which checkpoints and records ``interrupted``; after SIGUSR2 the pack is requeued like a
  lone run: its completed members are skipped, the others resume (``Pack.checkpoint``).

Which runs pack: queued 1-GPU jobs whose estimate is at most ``cluster.gpu_mem_gb /
cluster.pack_max`` (zero-shot, few-shot, probes, LLMLingua on 1–2B models, tiny runs),
first-fit by decreasing estimate into packs of at most ``cluster.pack_max`` runs whose
estimates sum to at most one GPU. A pack asks for 1 GPU, the sum of its members' CPUs and
host memory and the longest member time limit. ``cluster.pack_max=1`` turns packing off.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

TRAIN = Path(__file__).resolve().parents[2] / "train.py"


def packable(job, gpu_mem_gb: float, pack_max: int) -> bool:
    r = job.resources
    return pack_max > 1 and job.kind == "run" and r.gpus == 1 and r.estimate_gb <= gpu_mem_gb / pack_max


def split(jobs: list, config) -> tuple[list[list], list]:
    """(packs of 2+ jobs, the jobs that run alone) of the queued jobs."""
    gpu_mem = float(OmegaConf.select(config, "cluster.gpu_mem_gb", default=80))
    pack_max = int(OmegaConf.select(config, "cluster.pack_max", default=1))
    small = sorted((j for j in jobs if packable(j, gpu_mem, pack_max)), key=lambda j: (-j.resources.estimate_gb, j.idx))
    packs: list[list] = []
    for job in small:
        for p in packs:
            if len(p) < pack_max and sum(x.resources.estimate_gb for x in p) + job.resources.estimate_gb <= gpu_mem:
                p.append(job)
                break
        else:
            packs.append([job])
    alone = [j for j in jobs if not any(j in p for p in packs if len(p) > 1)]
    return [p for p in packs if len(p) > 1], alone


def resources(pack: list):
    """One GPU; the members' CPUs and host memory added up; the longest time limit."""
    first = pack[0].resources
    return replace(
        first,
        cpus=sum(j.resources.cpus for j in pack),
        mem_gb=sum(j.resources.mem_gb for j in pack),
        timeout_min=max(j.resources.timeout_min for j in pack),
        estimate_gb=sum(j.resources.estimate_gb for j in pack),
    )


def member_args(job) -> list[str]:
    """The member's ``train.py`` command line: its overrides (Hydra's own left out) and its resource plan."""
    return [o for o in job.job_overrides if not o.startswith("hydra.")]


class Pack:
    """A submitit callable: run every member side by side as its own process and wait for all.

    Preemption / time limit: submitit calls ``checkpoint`` on SIGUSR2; it passes the signal to
    every member (each checkpoints and records ``interrupted``), waits for them and asks for the
    same pack to be requeued: completed members are skipped, the others resume. SIGTERM
    (``scancel``) is passed on too, so cancelled members checkpoint and stay resumable."""

    def __init__(self, command: list[str] | None = None):
        self.command = command or [sys.executable, str(TRAIN)]
        self.procs: list[subprocess.Popen] = []

    def _signal(self, signum, _frame=None) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def __call__(self, members: list[list[str]]) -> list[int]:
        """Returns the members' exit codes; the job itself succeeds: each member's result.json is its record."""
        self.procs = [subprocess.Popen([*self.command, *args]) for args in members]
        previous = signal.signal(signal.SIGTERM, self._signal)
        try:
            codes = [p.wait() for p in self.procs]
        finally:
            signal.signal(signal.SIGTERM, previous)
        for args, code in zip(members, codes):
            print(f"pack member exited {code}: {' '.join(args)}", flush=True)
        return codes

    def checkpoint(self, members: list[list[str]]):
        import submitit

        self._signal(signal.SIGUSR2)
        for p in self.procs:
            p.wait()
        return submitit.helpers.DelayedSubmission(Pack(self.command), members)
