"""Sample-quality metrics: the shapes metric, FID / KID and their feature networks."""

from lightdiff.metrics.features import InceptionFeatures, RandomConvFeatures, check_unit_range
from lightdiff.metrics.fid import FrechetEvaluator
from lightdiff.metrics.shapes import ShapeJudgement, judge_image, shapes_metric

__all__ = [
    "FrechetEvaluator",
    "InceptionFeatures",
    "RandomConvFeatures",
    "ShapeJudgement",
    "check_unit_range",
    "judge_image",
    "shapes_metric",
]
