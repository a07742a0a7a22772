"""Aspect-ratio buckets: images of any shape trained near their own aspect ratio instead of centre-cropped square.

NovelAI's scheme (2022), as kohya's sd-scripts and SDXL's training use it (Podell et al. 2023, Section 2.3, "multi-
aspect training"): a set of (height, width) sizes of about equal area; each image goes to the bucket whose aspect
ratio is nearest its own (in log ratio: 2:1 and 1:2 are equally far from 1:1), is resized to cover it and cropped to
it; every batch is drawn from one bucket (`BucketBatchSampler`), so a batch is one tensor.

`data.buckets` is either an explicit list of [height, width] pairs or {max_area, step, max_aspect}: every size whose
sides are multiples of `step`, whose area is at most `max_area` (default: the square `data.resolution` squared) and
whose long side is at most `max_aspect` times the short one, keeping for each width the tallest height that fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightdiff.config import ConfigError

Bucket = tuple[int, int]  # (height, width) in pixels
BucketSpec = Sequence[Sequence[int]] | Mapping[str, float]  # what `data.buckets` holds


def bucket_sizes(spec: BucketSpec, resolution: int) -> list[Bucket]:
    """The buckets `spec` describes, sorted by aspect ratio (tall to wide)."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"max_area", "step", "max_aspect"})
        if unknown or "step" not in spec:
            raise ConfigError(
                f"data.buckets={dict(spec)}: a generated list takes step (and optionally max_area, max_aspect)"
                + (f"; unknown: {unknown}" if unknown else "")
            )
        max_area = int(spec.get("max_area", resolution * resolution))
        return generated_buckets(max_area, int(spec["step"]), float(spec.get("max_aspect", 2.0)))
    buckets = []
    for pair in spec:
        values = list(pair) if isinstance(pair, Sequence) and not isinstance(pair, str) else []
        if len(values) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise ConfigError(f"data.buckets: {pair!r} is not a [height, width] pair of positive whole numbers")
        buckets.append((int(values[0]), int(values[1])))
    if not buckets:
        raise ConfigError("data.buckets=[] lists no size; null trains square crops at data.resolution")
    return sorted(set(buckets), key=lambda bucket: (bucket[1] / bucket[0], bucket))


def generated_buckets(max_area: int, step: int, max_aspect: float = 2.0) -> list[Bucket]:
    """Sizes with sides multiples of `step`, area <= `max_area`, long side <= `max_aspect` x the short side: for each
    width the tallest height that fits, and the same size turned (NovelAI's construction)."""
    if step < 1 or max_area < step * step or max_aspect < 1:
        raise ConfigError(
            f"data.buckets: step={step}, max_area={max_area}, max_aspect={max_aspect} give no bucket "
            "(need step >= 1, max_area >= step^2, max_aspect >= 1)"
        )
    buckets = set()
    for width in range(step, max_area // step + 1, step):
        height = (max_area // width) // step * step
        if height >= step and max(height, width) <= max_aspect * min(height, width):
            buckets |= {(height, width), (width, height)}  # portrait and landscape alike
    return sorted(buckets, key=lambda bucket: (bucket[1] / bucket[0], bucket))


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's, in log ratio (ties: the larger bucket)."""
    ratio = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), -buckets[i][0] * buckets[i][1]),
    )


def smaller_than_every_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> bool:
    """Whether the image would have to be enlarged to cover any bucket: then it has no place in this training."""
    return all(height < h or width < w for h, w in buckets)
