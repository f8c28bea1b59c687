"""Train and evaluate one run (or a sweep with -m). All options live in conf/; see README."""

import hydra
from omegaconf import DictConfig

from telepathy.hydra_glue import register_resolvers, user_errors
from telepathy.lifecycle import main as run

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    # a data/model/config error found mid-run: one line, like the checks before it
    with user_errors():
        return run(cfg)


if __name__ == "__main__":
    main()
