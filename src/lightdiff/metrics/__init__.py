"""Sample-quality metrics: the shapes metric, FID / KID and their feature networks, precision / recall and spread."""

from lightdiff.metrics.diversity import precision_recall, within_group_distance
from lightdiff.metrics.features import InceptionFeatures, RandomConvFeatures, check_unit_range
from lightdiff.metrics.fid import FrechetEvaluator
from lightdiff.metrics.shapes import ShapeJudgement, judge_image, shapes_metric
from lightdiff.metrics.shapes_features import ShapesFeatures

__all__ = [
    "FrechetEvaluator",
    "InceptionFeatures",
    "RandomConvFeatures",
    "ShapeJudgement",
    "ShapesFeatures",
    "check_unit_range",
    "judge_image",
    "precision_recall",
    "shapes_metric",
    "within_group_distance",
]
