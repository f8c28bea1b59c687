"""Latency and throughput: bridge vs text relay vs direct, same device, same inputs, same answer budget.

    python -m benchmarks.latency -m compression=4,8,16,32 batch_size=1,4,8,16 [bridge_checkpoint=<run dir>]

Each job loads the sender and receiver once and times three paths on the same
``iterations`` batches of ``batch_size`` test inputs, after ``warmup_batches`` untimed
batches of other inputs. ``iterations`` counts *calls* because latency percentiles are
over calls (the plan times 100 per cell); when ``iterations x batch_size`` exceeds the
distinct test inputs (``num_inputs``, or what the test split holds after the warm-up:
SST-2's 872 items at batch 16 x 100), the inputs are cycled and each result.json says so
(``latency.iterations``, ``distinct_inputs``, ``inputs_reused``):

* bridge:     tokenise → sender forward (up to ``sender.layer``) → bridge → receiver answers
* text_relay: the sender writes its message and the receiver answers from it, exactly as the accuracy
  baseline ``method=text_relay`` does (``relay.*`` is conf/method/text_relay.yaml: one definition)
* direct:     the receiver reads the whole text prompt and answers

"Answers" is the same for all three: label scoring (one receiver pass, ``answer=score``)
or ``answer_tokens`` greedy tokens (``answer=generate``). Latency is the wall time of
the call that returns an example's answer (its batch's), with ``torch.cuda.synchronize``
on GPU; throughput is examples / total timed seconds.

Output (the analysis code reads it like any run): one run directory per path,
``<job dir>/<path>/result.json`` with method "latency", ``config.path``,
``config.batch_size``, ``config.compression`` and metrics ``p50_ms, p90_ms, p99_ms,
throughput_eps``; ``<job dir>/summary.json`` holds all three with the ratios.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from telepathy.bridge import build_bridge, count_params
from telepathy.compression import latents
from telepathy.config import resolve_layer, validate_latency
from telepathy.data import Example, batches, load_split
from telepathy.evaluation import text_prompt
from telepathy.features import collate, encode, sender_prompts
from telepathy.methods.text_relay import relay_messages, relay_reader
from telepathy.models import embedding_rms_median, load_model, placement
from telepathy.prompting import PromptIO, label_token_ids
from telepathy.results import RESULT_FILE, environment, identity_block, now, record, write_json
from telepathy.training import latest_checkpoint, load_trainable

log = logging.getLogger("telepathy.latency")
PATHS = ("bridge", "text_relay", "direct")


def _sync(devices) -> None:
    for d in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(d)


class Timer:
    """Accumulates synchronised wall time per named stage of one call."""

    def __init__(self, devices):
        self.devices = devices
        self.stages: dict[str, float] = {}

    def stage(self, name: str, fn):
        _sync(self.devices)
        t0 = time.perf_counter()
        out = fn()
        _sync(self.devices)
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0
        return out


BRIDGE_SHAPE = ("dim", "depth", "heads", "mlp_ratio", "num_latents")


def trained_bridge_run(cfg) -> Path | None:
    """``bridge_checkpoint=auto``: the completed bridge run of the run store (``paths.output_dir``)
    with this job's task, sender, receiver, sender layer, compression and bridge shape; the
    lowest seed when several match. None when there is none (the bridge is then timed untrained)."""
    from telepathy.results import read_result

    def key(c):
        return (
            c["task"]["name"],
            c["sender"]["name"],
            c["receiver"]["name"],
            c["sender"]["layer"],
            c["compression"],
            tuple(c["bridge"].get(k) for k in BRIDGE_SHAPE),
        )

    want = key(OmegaConf.to_container(cfg, resolve=True))
    found = []
    for rdir in sorted((Path(cfg.paths.output_dir).expanduser() / "runs").glob("*")):
        record = read_result(rdir) or {}
        conf = record.get("config") or {}
        if (
            record.get("status") == "completed"
            and record.get("method") == "bridge"
            and "bridge" in conf
            and key(conf) == want
            and latest_checkpoint(rdir) is not None
        ):
            found.append((int(record.get("seed", 0)), rdir))
    return min(found)[1] if found else None


def load_bridge(cfg, sender, receiver, m: int, reference: list[Example]):
    """The bridge to time: trained weights from ``bridge_checkpoint`` (a run dir, a checkpoint, or
    ``auto``: found in the run store) when there are any, else a seeded init whose reference set
    (``bridge.reference_items``) is the sender's features of ``reference`` (a trained bridge's
    checkpoint holds its own)."""
    torch.manual_seed(cfg.seed)
    bridge = (
        build_bridge(cfg, sender.hidden_size, receiver.hidden_size, m, target_rms=embedding_rms_median(receiver.model))
        .to(receiver.device)
        .eval()
    )
    source = None
    run = cfg.bridge_checkpoint
    if run == "auto":
        run = trained_bridge_run(cfg)
        if run is None:
            log.warning(
                "bridge_checkpoint=auto: no completed bridge run of this task, pair and compression "
                "under %s/runs; timing an untrained bridge",
                cfg.paths.output_dir,
            )
    if run:
        path = Path(run).expanduser()
        checkpoint = path if (path / "trainable.safetensors").exists() else latest_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"bridge_checkpoint={path}: no checkpoints/step_*/trainable.safetensors")
        load_trainable(bridge, checkpoint)
        source = str(checkpoint)
    elif bridge.reference_items:
        layer = resolve_layer(cfg.sender.layer, sender.num_layers)
        ids = sender_prompts(sender, reference[: bridge.reference_items], cfg.task.prompt, cfg.task.max_input_tokens)
        bridge.set_reference(encode(sender, ids, [layer])[layer])
    return bridge, source


class Paths:
    """The three ways to answer a batch of examples; each returns the receiver's readout."""

    def __init__(self, cfg, sender, receiver, bridge, layer: int):
        self.cfg, self.sender, self.receiver, self.bridge, self.layer = cfg, sender, receiver, bridge, layer
        self.rio, self.sio = PromptIO(receiver), PromptIO(sender)
        self.template = self.rio.soft_prompt(cfg.task.receiver_primer, cfg.task.answer_prompt, cfg.bridge.placement)
        self.label_ids = label_token_ids(self.rio, list(cfg.task.labels), cfg.task.label_prefix)
        self.read_text = text_prompt(self.rio, cfg.task.prompt)
        self.read_relay = relay_reader(self.rio, cfg.relay)  # the accuracy baseline's relay (conf/method/text_relay)
        self.lengths: dict[str, list[int]] = {"sender_tokens": [], "relay_message_tokens": []}

    def answer(self, seqs: list[list]):
        if self.cfg.answer == "score":
            return self.rio.score_labels(seqs, self.label_ids)
        return self.rio.generate(seqs, max_new_tokens=self.cfg.answer_tokens)

    @torch.no_grad()
    def bridge_path(self, chunk: list[Example], timer: Timer):
        ids = timer.stage(
            "sender", lambda: sender_prompts(self.sender, chunk, self.cfg.task.prompt, self.cfg.task.max_input_tokens)
        )
        self.lengths["sender_tokens"] += [len(x) for x in ids]
        feats = timer.stage("sender", lambda: encode(self.sender, ids, [self.layer], batch_size=len(ids))[self.layer])
        soft = timer.stage("bridge", lambda: self.bridge(*collate(feats, self.receiver.device)).to(self.receiver.dtype))
        seqs = [self.rio.fill(self.template, soft[j]) for j in range(len(chunk))]
        return timer.stage("receiver", lambda: self.answer(seqs))

    @torch.no_grad()
    def text_relay_path(self, chunk: list[Example], timer: Timer):
        messages = timer.stage("sender", lambda: relay_messages(self.sio, chunk, self.cfg.relay, len(chunk)))
        self.lengths["relay_message_tokens"] += [len(self.sio.ids(messages[ex.idx])) for ex in chunk]
        relayed = [Example(idx=ex.idx, text=messages[ex.idx]) for ex in chunk]
        return timer.stage("receiver", lambda: self.answer(self.read_relay(relayed)))

    @torch.no_grad()
    def direct_path(self, chunk: list[Example], timer: Timer):
        return timer.stage("receiver", lambda: self.answer(self.read_text(chunk)))


def timed_inputs(cfg, batch_size: int) -> tuple[list[Example], list[Example], dict]:
    """The warm-up inputs, the ``iterations x batch_size`` timed inputs and how they were drawn.

    Warm-up and timed inputs are disjoint seeded test items (``data.sample_seed``). The timed
    ones are ``num_inputs`` distinct items (null: as many as the iterations need), or all the
    split holds after the warm-up when that is fewer; a shortfall is filled by cycling through
    them again, never by shrinking the iterations: the timed calls are what the plan fixes.
    """
    n_warm = batch_size * int(cfg.warmup_batches)
    wanted = int(cfg.iterations) * batch_size
    distinct = min(wanted, int(cfg.num_inputs or wanted))
    examples = load_split(cfg.task, cfg.data, "test", seed=cfg.data.sample_seed)  # the whole test split
    if len(examples) > n_warm + distinct:  # a seeded subset, the same items for every job of the grid
        examples = load_split(cfg.task, cfg.data, "test", cap=n_warm + distinct, seed=cfg.data.sample_seed)
    if len(examples) <= n_warm:
        raise ValueError(
            f"the test split has {len(examples)} examples; warmup_batches={cfg.warmup_batches} x "
            f"batch_size={batch_size} leaves none to time"
        )
    warmup, pool = examples[:n_warm], examples[n_warm:]
    timed = [pool[i % len(pool)] for i in range(wanted)]
    drawn = {"iterations": int(cfg.iterations), "distinct_inputs": len(pool), "inputs_reused": len(pool) < wanted}
    if drawn["inputs_reused"]:
        log.info(
            "%d iterations x batch %d = %d timed inputs from %d distinct test items: cycling through them",
            cfg.iterations,
            batch_size,
            wanted,
            len(pool),
        )
    return warmup, timed, drawn


def measure(run, warmup: list[Example], timed: list[Example], batch_size: int, devices) -> dict:
    """Warm up on ``warmup``, then time every batch of ``timed``; latency stats in ms."""
    for chunk in batches(warmup, batch_size):
        run(chunk, Timer(devices))
    latencies, stages = [], {}
    for chunk in batches(timed, batch_size):
        timer = Timer(devices)
        _sync(devices)
        t0 = time.perf_counter()
        run(chunk, timer)
        _sync(devices)
        latencies.append(time.perf_counter() - t0)
        for k, v in timer.stages.items():
            stages[k] = stages.get(k, 0.0) + v
    total = sum(latencies)
    ms = np.array(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "throughput_eps": len(timed) / total,
        "n_examples": len(timed),
        "n_batches": len(latencies),
        "total_s": total,
        **{f"{k}_share": v / total for k, v in stages.items()},
    }


@hydra.main(config_path="../conf", config_name="latency", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    started_at, t0 = now(), time.perf_counter()
    validate_latency(cfg)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    devices = placement(cfg)
    sender, receiver = load_model(cfg.sender, devices["sender"]), load_model(cfg.receiver, devices["receiver"])
    layer = resolve_layer(cfg.sender.layer, sender.num_layers)
    m = latents(cfg)
    bs = int(cfg.batch_size)
    warmup, timed, drawn = timed_inputs(cfg, bs)
    bridge, checkpoint = load_bridge(cfg, sender, receiver, m, reference=warmup + timed)
    paths = Paths(cfg, sender, receiver, bridge, layer)
    runners = {"bridge": paths.bridge_path, "text_relay": paths.text_relay_path, "direct": paths.direct_path}
    dev_list = list(devices.values())

    results = {name: measure(runners[name], warmup, timed, bs, dev_list) for name in PATHS}
    paths.lengths["sender_tokens"] = paths.lengths["sender_tokens"][-len(timed) :]  # timed inputs only
    paths.lengths["relay_message_tokens"] = paths.lengths["relay_message_tokens"][-len(timed) :]
    mean_len = {k: float(np.mean(v)) for k, v in paths.lengths.items()}
    direct_len = {ex.idx: paths.rio.embed(paths.read_text([ex]))[2][0] for ex in timed[: drawn["distinct_inputs"]]}
    info = {
        "device": {k: str(v) for k, v in devices.items()},
        "gpu": torch.cuda.get_device_name(devices["receiver"]) if devices["receiver"].type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "dtype": {"sender": str(sender.dtype), "receiver": str(receiver.dtype)},
        "models": {
            "sender": cfg.sender.get("hub_id") or cfg.sender.name,
            "receiver": cfg.receiver.get("hub_id") or cfg.receiver.name,
            "random_init": bool(cfg.sender.random_init or cfg.receiver.random_init),
        },
        "bridge_trained": checkpoint is not None,
        "bridge_checkpoint": checkpoint,
        "bridge_params": count_params(bridge),
        "num_latents": m,
        "sender_layer": layer,
        "answer": cfg.answer if cfg.answer == "score" else f"generate {cfg.answer_tokens} tokens",
        **drawn,  # iterations, distinct_inputs, inputs_reused
        "mean_sender_tokens": mean_len["sender_tokens"],
        "mean_relay_message_tokens": mean_len["relay_message_tokens"],
        "mean_direct_receiver_tokens": float(np.mean([direct_len[ex.idx] for ex in timed])),
        "bridge_receiver_tokens": paths.rio.embed(
            [paths.rio.fill(paths.template, torch.zeros(m, receiver.hidden_size, dtype=receiver.dtype))]
        )[2][0],
    }
    ratios = {
        "text_relay_over_bridge_p50": results["text_relay"]["p50_ms"] / results["bridge"]["p50_ms"],
        "direct_over_bridge_p50": results["direct"]["p50_ms"] / results["bridge"]["p50_ms"],
        "bridge_over_text_relay_throughput": results["bridge"]["throughput_eps"]
        / results["text_relay"]["throughput_eps"],
        "bridge_over_direct_throughput": results["bridge"]["throughput_eps"] / results["direct"]["throughput_eps"],
        "bridge_share_of_bridge_path": results["bridge"].get("bridge_share", 0.0),
    }
    config = OmegaConf.to_container(cfg, resolve=True)
    identity = identity_block(
        task=cfg.task.name,
        method="latency",
        sender=cfg.sender.name,
        receiver=cfg.receiver.name,
        compression=cfg.compression,
        num_latents=m,
        layer=cfg.sender.layer,
        seed=cfg.seed,
    )
    for name in PATHS:
        write_json(
            job_dir / name / RESULT_FILE,
            record(
                "completed",
                run_id=f"{job_dir.name}-{name}",
                run_dir=job_dir / name,
                identity=identity,
                config={**config, "method": "latency", "path": name, "batch_size": bs},
                metrics=results[name],
                latency=info,
                env=environment(device=str(devices["receiver"])),
                timing={"started_at": started_at, "total_s": time.perf_counter() - t0},  # the whole job, every path
                finished_at=now(),
            ),
        )
    write_json(job_dir / "summary.json", {"config": config, "info": info, "paths": results, "ratios": ratios})

    print(
        f"latency c{cfg.compression} batch {bs} on {info['device']['receiver']} "
        f"({'trained' if checkpoint else 'UNTRAINED'} bridge, M={m}, answer: {info['answer']}; "
        f"{drawn['iterations']} timed batches of {drawn['distinct_inputs']} distinct inputs"
        f"{', cycled' if drawn['inputs_reused'] else ''})"
    )
    for name in PATHS:
        r = results[name]
        print(
            f"  {name:<10} p50 {r['p50_ms']:8.1f} ms  p90 {r['p90_ms']:8.1f}  p99 {r['p99_ms']:8.1f}  "
            f"{r['throughput_eps']:7.2f} ex/s"
        )
    print(
        f"  text_relay/bridge p50 {ratios['text_relay_over_bridge_p50']:.2f}x  "
        f"direct/bridge p50 {ratios['direct_over_bridge_p50']:.2f}x  "
        f"bridge share of bridge path {100 * ratios['bridge_share_of_bridge_path']:.2f}%"
    )
    print(f"  written: {job_dir}")
    return ratios


if __name__ == "__main__":
    main()
