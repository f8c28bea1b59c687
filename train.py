"""Train and evaluate one run (or a sweep with -m). All options live in conf/; see README."""

import hydra
from omegaconf import DictConfig

from telepathy.hydra_glue import register_resolvers, task_errors
from telepathy.lifecycle import main as run

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    # a data/model/config error, a full disk or a live run in the dir found mid-run: one line,
    # like the checks before it (logger=: the lifecycle drives the tracker)
    with task_errors(cfg):
        return run(cfg)


if __name__ == "__main__":
    main()
