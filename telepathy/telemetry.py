"""What a run used: GPU utilisation and memory, host RSS and CPU, sampled in a background thread.

Why: the plan's success metrics are ">80% average GPU utilisation" and "no OOM"; neither
can be checked from a run's final numbers. ``start(cfg, run_dir)`` samples every
``cluster.telemetry_interval_s`` seconds (0: off) and appends one JSON line per sample to
``<run_dir>/telemetry.jsonl``; ``Sampler.stop()`` returns the summary that goes into
result.json under ``telemetry``: per GPU mean/peak utilisation and memory, host mean/peak
RSS and CPU. GPU figures come from NVML (``nvidia-ml-py``, ``import pynvml``) for the
devices the job sees (``CUDA_VISIBLE_DEVICES``); without NVML or a GPU the summary says
``gpu_available: false`` with the reason and keeps the host figures.

The GPU reader is injectable (``start(..., gpu_reader=...)``; any object with
``sample() -> list[dict]``), so tests and machines without a GPU exercise the same code.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

TELEMETRY_FILE = "telemetry.jsonl"


class NvmlReader:
    """GPU utilisation (%) and memory (MB) of the visible devices through NVML."""

    def __init__(self):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = pynvml.nvmlDeviceGetCount()
        if visible:
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            self.handles = [
                (
                    pynvml.nvmlDeviceGetHandleByUUID(v)
                    if v.startswith(("GPU-", "MIG-"))
                    else pynvml.nvmlDeviceGetHandleByIndex(int(v))
                )
                for v in ids
            ]
        else:
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        if not self.handles:
            raise RuntimeError("NVML sees no GPU")

    def sample(self) -> list[dict]:
        out = []
        for i, h in enumerate(self.handles):
            util = self._nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
            out.append(
                {"gpu": i, "util_pct": float(util.gpu), "mem_mb": mem.used / 2**20, "mem_total_mb": mem.total / 2**20}
            )
        return out


def default_gpu_reader() -> tuple[object | None, str | None]:
    """(NVML reader, None), or (None, why GPU telemetry is unavailable)."""
    try:
        return NvmlReader(), None
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, no driver, no device ...
        return None, f"NVML unavailable ({type(err).__name__}: {err})"


class Sampler:
    """Background sampler; ``stop()`` joins it and returns the summary (idempotent)."""

    def __init__(self, run_dir: Path, interval_s: float, gpu_reader=None, unavailable: str | None = None):
        import psutil

        self.path = Path(run_dir) / TELEMETRY_FILE
        self.interval_s = float(interval_s)
        self.gpu_reader, self.unavailable = gpu_reader, unavailable
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # first call primes the CPU counter
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="telepathy-telemetry", daemon=True)
        self._summary: dict | None = None
        # process start → method start: imports, config, result record (the planner's start-up term)
        self.startup_s = max(0.0, time.time() - self.process.create_time())

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def sample_once(self) -> dict:
        rss = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
        row = {"t": round(time.time(), 3), "rss_mb": rss / 2**20, "cpu_pct": self.process.cpu_percent(None)}
        if self.gpu_reader is not None:
            try:
                row["gpus"] = self.gpu_reader.sample()
            except Exception as err:  # noqa: BLE001 - a reader that fails mid-run must not stop the run
                self.unavailable, self.gpu_reader = f"GPU sampling failed ({type(err).__name__}: {err})", None
        self.samples.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def _loop(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> dict:
        if self._summary is None:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self.sample_once()  # the last state, even for runs shorter than one interval
            self._summary = {
                **summarise(self.samples, self.interval_s, self.unavailable),
                "startup_s": round(self.startup_s, 2),
            }
        return self._summary


def summarise(samples: list[dict], interval_s: float, unavailable: str | None = None) -> dict:
    """Mean / peak per GPU and for the host over all samples."""

    def stats(values):
        return (round(sum(values) / len(values), 2), round(max(values), 2)) if values else (None, None)

    rss_mean, rss_peak = stats([s["rss_mb"] for s in samples])
    cpu_mean, cpu_peak = stats([s["cpu_pct"] for s in samples])
    out = {
        "file": TELEMETRY_FILE,
        "interval_s": interval_s,
        "n_samples": len(samples),
        "host": {"rss_mean_mb": rss_mean, "rss_peak_mb": rss_peak, "cpu_mean_pct": cpu_mean, "cpu_peak_pct": cpu_peak},
    }
    per_gpu: dict[int, list[dict]] = {}
    for s in samples:
        for g in s.get("gpus") or []:
            per_gpu.setdefault(int(g["gpu"]), []).append(g)
    gpus = []
    for idx, rows in sorted(per_gpu.items()):
        util_mean, util_peak = stats([r["util_pct"] for r in rows])
        mem_mean, mem_peak = stats([r["mem_mb"] for r in rows])
        gpus.append(
            {
                "gpu": idx,
                "util_mean_pct": util_mean,
                "util_peak_pct": util_peak,
                "mem_mean_mb": mem_mean,
                "mem_peak_mb": mem_peak,
                "mem_total_mb": rows[-1].get("mem_total_mb"),
            }
        )
    out["gpu_available"] = bool(gpus)
    out["gpus"] = gpus
    if not gpus:
        out["gpu_unavailable"] = unavailable or "no GPU samples"
    else:
        out["gpu_util_mean_pct"] = round(sum(g["util_mean_pct"] for g in gpus) / len(gpus), 2)
    return out


class _Off:
    """Telemetry switched off (``cluster.telemetry_interval_s=0``)."""

    def stop(self) -> dict:
        return {
            "gpu_available": False,
            "gpu_unavailable": "telemetry off (cluster.telemetry_interval_s=0)",
            "n_samples": 0,
        }


def start(cfg, run_dir: Path, gpu_reader=None) -> Sampler | _Off:
    """Start sampling for a run (called by telepathy.lifecycle around the method)."""
    from omegaconf import OmegaConf

    interval = float(OmegaConf.select(cfg, "cluster.telemetry_interval_s", default=5) or 0)
    if interval <= 0:
        return _Off()
    unavailable = None
    if gpu_reader is None:
        gpu_reader, unavailable = default_gpu_reader()
    return Sampler(run_dir, interval, gpu_reader, unavailable).start()
