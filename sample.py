"""Sample images from a trained model, or export it to diffusers: see README.md."""

import re
import sys

import hydra
from omegaconf import DictConfig

from lightdiff.sample import run


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    # `demo=true` is the switch of the `demo` settings node (demo.port, ...), which Hydra cannot set with a bool
    sys.argv = [re.sub(r"^demo=(true|false)$", r"demo.enabled=\1", argument) for argument in sys.argv]
    main()
