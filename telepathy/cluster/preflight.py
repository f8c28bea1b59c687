"""Before the first ``sbatch``: can the cluster run what the launch is about to ask for?

A sweep is submitted as several arrays, one ``sbatch`` each. When a later one is
refused (a memory request no node has, a partition that does not exist) the earlier
ones are already queued; finding that out only from sbatch's error, mid-launch, is how
jobs end up queued twice. ``check`` asks ``sinfo`` once for every node's partition,
CPUs, memory and GPUs and refuses the launch, in one line, when some array fits no
node of its partition. Without the SLURM tools (local launcher, tests) it checks
nothing. ``cluster.preflight=false`` skips it (a site whose sinfo does not show what
sbatch enforces).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    partitions: tuple[str, ...]
    cpus: int
    mem_mb: int
    gpus: int


def _gpus(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:8``, ``gpu:a100:4(S:0-1)``, ``gpu:a100:2,gpu:v100:2`` → 8, 4, 4."""
    total = 0
    for entry in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", entry).split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str) -> tuple[list[Node], str | None]:
    """``sinfo -h -N -o '%P|%c|%m|%G'`` → (one Node per node, merged over its partitions; default partition)."""
    nodes: dict[tuple, set] = {}
    default = None
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        partition, cpus, mem, gres = fields
        if partition.endswith("*"):
            partition = partition[:-1]
            default = partition
        try:
            key = (int(cpus.rstrip("+")), int(mem.rstrip("+")), _gpus(gres))
        except ValueError:
            continue
        nodes.setdefault(key, set()).add(partition)
    return [Node(tuple(sorted(p)), cpus, mem, gpus) for (cpus, mem, gpus), p in nodes.items()], default


def sinfo_nodes() -> tuple[list[Node], str | None] | None:
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sinfo(out.stdout) if out.returncode == 0 else None


def problems(requests: dict[str, object], partition: str | None, nodes: list[Node], default: str | None) -> list[str]:
    """One line per array (``{class name: Resources}``) that no node of ``partition`` can run."""
    known = sorted({p for n in nodes for p in n.partitions})
    if partition and partition not in known:
        return [f"cluster.partition={partition!r} does not exist on this cluster; partitions: {', '.join(known)}"]
    name = partition or default
    usable = [n for n in nodes if name is None or name in n.partitions]
    out = []
    for cls, r in requests.items():
        if any(n.cpus >= r.cpus and n.mem_mb >= r.mem_gb * 1024 and n.gpus >= r.gpus for n in usable):
            continue
        largest = (
            f"{max((n.cpus for n in usable), default=0)} CPUs, "
            f"{max((n.mem_mb for n in usable), default=0) // 1024}G, "
            f"{max((n.gpus for n in usable), default=0)} GPUs"
        )
        out.append(
            f"array {cls} (--gpus-per-node={r.gpus} --cpus-per-task={r.cpus} --mem={r.mem_gb}G) fits no "
            f"node of partition {name or '(default)'} (at most {largest} per node)"
        )
    return out


def check(requests: dict[str, object], partition: str | None) -> str | None:
    """The launch-refusing message (one line), or None when every array fits (or sinfo is not there)."""
    found = sinfo_nodes()
    if found is None:
        return None
    bad = problems(requests, partition, *found)
    if not bad:
        return None
    return (
        "the cluster cannot run this launch; nothing was submitted: "
        + "; ".join(bad)
        + " (lower cluster.mem_gb_per_gpu / cpus_per_gpu / single_model.*, or choose cluster.partition)"
    )
