"""Measures that see a collapsed generator: improved precision and recall, and the spread within each prompt.

A model that draws one image per prompt can be right about every prompt and, on a feature space that averages, near
the data in FID. These numbers cannot be fooled that way:
- recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models",
  Section 3): the share of real images that fall inside the generated set's manifold, the union of balls around each
  generated feature reaching its k-th nearest generated neighbour. Repeated images have a radius of 0, so a collapsed
  set covers nothing;
- precision (same paper): the share of generated images inside the real set's manifold (quality, not variety);
- within-group distance: the mean pairwise distance between the images made for one prompt, averaged over prompts
  (0 for one image per prompt); reported as a ratio to the reference model's, the within-caption diversity ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (Eq. 1's NN_k)."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st value is the row's distance to itself (0)


def _inside_manifold(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int = 1024
) -> torch.Tensor:
    """Whether each query lies within radii[j] of some support row j (Eq. 1's f(phi, Phi))."""
    inside = []
    for start in range(0, len(queries), batch):
        distances = torch.cdist(queries[start : start + batch], support)
        inside.append((distances <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> dict[str, float]:
    """{"precision", "recall"} of `generated` features (N, D) against `real` ones (M, D), k-NN manifolds (Eq. 2)."""
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be (N, D) with one D, got {tuple(real.shape)} and {tuple(generated.shape)}")
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} real and generated images")
    real, generated = real.double(), generated.double()
    precision = _inside_manifold(generated, real, _kth_neighbour_radii(real, k)).double().mean()
    recall = _inside_manifold(real, generated, _kth_neighbour_radii(generated, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def within_group_distance(vectors: torch.Tensor, groups: Sequence[int]) -> float:
    """Mean over groups of the mean pairwise RMS distance between a group's rows (N, ...): 0 when each group repeats
    one image. Groups of one row have no spread and are left out; at least one group needs two rows."""
    if len(groups) != len(vectors):
        raise ValueError(f"{len(groups)} group ids for {len(vectors)} images")
    flat = vectors.flatten(1).double()
    group_ids = torch.as_tensor(list(groups))
    distances = []
    for group in group_ids.unique():
        members = flat[group_ids == group]
        if len(members) < 2:
            continue
        pairwise = torch.cdist(members, members) / flat.shape[1] ** 0.5
        distances.append(pairwise.sum() / (len(members) * (len(members) - 1)))
    if not distances:
        raise ValueError(f"no group of {len(groups)} images has two members: a spread needs at least 2")
    return float(torch.stack(distances).mean())


def variety(
    real_features: torch.Tensor,
    generated_features: torch.Tensor,
    real: torch.Tensor,
    real_groups: Sequence[int] | None,
    generated: torch.Tensor,
    generated_groups: Sequence[int] | None,
    k: int = 3,
) -> dict[str, float]:
    """What a generated set keeps of the data's variety, against a reference set of the data: precision and recall of
    their features (k-NN manifolds), and, where both sets have groups (captions or classes) drawn at least twice, the
    within-group distance of the generated images / clips and its ratio to the reference's ("diversity": 1 as varied
    as the data, 0 one image per caption)."""
    result = precision_recall(real_features, generated_features, k=k)
    if real_groups is None or generated_groups is None or not (_repeats(real_groups) and _repeats(generated_groups)):
        return result
    spread = within_group_distance(generated, generated_groups)
    return result | {"within_caption_distance": spread, "diversity": spread / within_group_distance(real, real_groups)}


def caption_groups(keys: Sequence[object]) -> list[int]:
    """Each key's group index (captions or classes), numbered in order of first appearance."""
    names = {key: index for index, key in enumerate(dict.fromkeys(str(key) for key in keys))}
    return [names[str(key)] for key in keys]


@torch.no_grad()
def grouped_image_variety(
    features: nn.Module,  # images (N, 3, H, W) in [0, 1] -> (N, D): `ShapesFeatures` for the shapes data
    real: torch.Tensor,  # the data's images (N, 3, H, W) in [0, 1]
    real_keys: Sequence[object],  # their captions or classes
    generated: np.ndarray,  # uint8 images (M, H, W, 3)
    generated_keys: Sequence[object] | None,  # what each was made for (None: unknown, no diversity)
    k: int = 3,
) -> dict[str, float]:
    """`variety` of generated uint8 images against the data's, each side grouped by its captions or classes: what
    sample.py's metrics and the training previews report as precision, recall and diversity."""
    ours = torch.from_numpy(generated).permute(0, 3, 1, 2).float() / 255
    our_groups = caption_groups(generated_keys) if generated_keys is not None else None
    return variety(features(real), features(ours), real, caption_groups(real_keys), ours, our_groups, k=k)


def _repeats(groups: Sequence[int]) -> bool:
    return len(set(groups)) < len(groups)
