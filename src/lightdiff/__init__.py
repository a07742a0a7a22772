"""lightdiff: diffusion training with Hydra configs, Lightning modules and diffusers networks."""

__version__ = "0.1.0"
