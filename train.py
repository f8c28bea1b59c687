"""Train and evaluate one run (or a sweep with -m). All options live in conf/; see README."""

import hydra
from omegaconf import DictConfig

from telepathy.hydra_glue import register_resolvers, task_errors
from telepathy.lifecycle import main as run
from telepathy.tracking import publishing

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    # a data/model/config error, a full disk or a live run in the dir found mid-run: one line,
    # like the checks before it; logger=...: the finished run's log.jsonl rows and metrics go to the tracker
    with task_errors(cfg), publishing(cfg):
        return run(cfg)


if __name__ == "__main__":
    main()
