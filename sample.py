"""Sample images from a trained model, or export it to diffusers: see README.md."""

import hydra
from omegaconf import DictConfig

from lightdiff.sample import run


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
