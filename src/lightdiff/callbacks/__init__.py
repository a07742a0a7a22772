"""Training machinery shared by every method: EMA, sample grids, FID / KID, throughput, checkpoints, NaN guard."""

from lightdiff.callbacks.checkpoint import FinalCheckpoint, StepCheckpoint
from lightdiff.callbacks.ema import EMA, find_ema
from lightdiff.callbacks.fid import FrechetDistance
from lightdiff.callbacks.nonfinite import NonFiniteGuard
from lightdiff.callbacks.preemption import Preemption
from lightdiff.callbacks.random_state import RandomState
from lightdiff.callbacks.samples import SampleGrid, method_previews
from lightdiff.callbacks.throughput import ImagesPerSecond, StepProgressBar

__all__ = [
    "EMA",
    "FinalCheckpoint",
    "FrechetDistance",
    "ImagesPerSecond",
    "NonFiniteGuard",
    "Preemption",
    "RandomState",
    "SampleGrid",
    "StepCheckpoint",
    "StepProgressBar",
    "find_ema",
    "method_previews",
]
