"""Packing: small runs share one GPU as several isolated processes in one SLURM job.

On the local SLURM cluster: test_slurm.py::test_two_small_runs_packed_on_one_gpu_both_complete.
"""

import sys

from telepathy.cluster import packing
from telepathy.cluster.sweep import PlannedJob
from telepathy.resources import Resources

MEMBER = (
    "import sys, pathlib; pathlib.Path(sys.argv[2]).write_text(sys.argv[1]); "
    "sys.exit(3 if sys.argv[1] == 'fail' else 0)"
)


def test_a_failing_member_does_not_stop_the_others(tmp_path):
    pack = packing.Pack(command=[sys.executable, "-c", MEMBER])
    codes = pack([["fail", str(tmp_path / "a")], ["ok", str(tmp_path / "b")], ["ok", str(tmp_path / "c")]])
    assert codes == [3, 0, 0]
    assert [(tmp_path / n).read_text() for n in "abc"] == ["fail", "ok", "ok"]


def _job(idx, gb, gpus=1, kind="run"):
    res = Resources(gpus=gpus, cpus=2, mem_gb=8, timeout_min=60 + idx, estimate_gb=gb)
    return PlannedJob(idx=idx, overrides=[f"seed={idx}"], run_dir=f"/r/{idx}", state="queue", resources=res, kind=kind)


def test_small_jobs_are_packed_first_fit_within_one_gpu():
    from omegaconf import OmegaConf

    jobs = [_job(0, 20), _job(1, 25), _job(2, 10), _job(3, 27), _job(4, 5, gpus=2), _job(5, 60), _job(6, 3)]
    config = OmegaConf.create({"cluster": {"gpu_mem_gb": 80, "pack_max": 3}})
    packs, alone = packing.split(jobs, config)
    # 25+20+10 <= 80 in one pack; 27 GB > 80/3 runs alone, and so does 6 (the pack is full)
    assert [[j.idx for j in p] for p in packs] == [[1, 0, 2]]
    assert sorted(j.idx for j in alone) == [3, 4, 5, 6]
    res = packing.resources(packs[0])
    assert (res.gpus, res.cpus, res.mem_gb, res.timeout_min) == (1, 6, 24, 62)
    assert packing.split(jobs, OmegaConf.create({"cluster": {"gpu_mem_gb": 80, "pack_max": 1}}))[0] == []
