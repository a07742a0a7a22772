"""Training machinery shared by every method: EMA, sample grids, FID / KID, throughput."""

from lightdiff.callbacks.ema import EMA, find_ema
from lightdiff.callbacks.fid import FrechetDistance
from lightdiff.callbacks.samples import SampleGrid, method_previews
from lightdiff.callbacks.throughput import ImagesPerSecond

__all__ = ["EMA", "FrechetDistance", "ImagesPerSecond", "SampleGrid", "find_ema", "method_previews"]
