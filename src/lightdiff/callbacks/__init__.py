"""Training machinery shared by every method: EMA, sample grids, throughput."""

from lightdiff.callbacks.ema import EMA, find_ema
from lightdiff.callbacks.samples import SampleGrid
from lightdiff.callbacks.throughput import ImagesPerSecond

__all__ = ["EMA", "ImagesPerSecond", "SampleGrid", "find_ema"]
