"""Sample-quality metrics."""

from lightdiff.metrics.shapes import ShapeJudgement, judge_image, shapes_metric

__all__ = ["ShapeJudgement", "judge_image", "shapes_metric"]
