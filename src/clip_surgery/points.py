"""Text to point prompts for SAM (METHOD.md section 5).

After CLIP Surgery's reference ``similarity_map_to_points`` and its combined-target demo
(Li et al., arXiv 2304.05653; github.com/xmed-lab/CLIP_Surgery).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .features import min_max


def _cell_centres(indices: torch.Tensor, cells_w: int, scale: tuple[float, float], image_hw):
    height, width = image_hw
    xs = torch.clamp((indices % cells_w + 0.5) * scale[1], max=width - 1)
    ys = torch.clamp((indices // cells_w + 0.5) * scale[0], max=height - 1)
    return torch.stack([xs, ys], dim=1).to(torch.int64)


def points_from_map(
    grid_map: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.8,
    downsample: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative points ``[K, 2]`` as ``(x, y)`` pixels, labels ``[K]`` (1, then 0).

    The ``[h, w]`` map is downsampled by ``downsample`` (bilinear) and min-maxed;
    ``k = min(#(value >= threshold), cells // 2)``; the k highest cells' centres are positive
    (ascending order) and the k lowest negative (ascending order), as in the reference.
    """
    if grid_map.dim() != 2:
        raise ValueError(f"expected a [h, w] map, got shape {tuple(grid_map.shape)}")
    cells_h = max(grid_map.shape[0] // downsample, 1)
    cells_w = max(grid_map.shape[1] // downsample, 1)
    small = F.interpolate(
        grid_map.float()[None, None], size=(cells_h, cells_w), mode="bilinear", align_corners=False
    )
    values = min_max(small.reshape(-1), dim=0)
    order = torch.sort(values, stable=True).indices
    count = min(int((values >= threshold).sum()), values.numel() // 2)
    scale = (image_size[0] / cells_h, image_size[1] / cells_w)
    chosen = torch.cat([order[values.numel() - count :], order[:count]])
    points = _cell_centres(chosen, cells_w, scale, image_size).numpy()
    labels = np.concatenate([np.ones(count, np.int64), np.zeros(count, np.int64)])
    return points.reshape(-1, 2), labels


def points_for_targets(
    grid_maps: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.8,
    downsample: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Points for a combined target such as ``"person+bench"`` from maps ``[n, h, w]``.

    Negatives come from the mean of the min-max maps, positives from each map of its own;
    negatives first, then each text's positives, as in the reference demo.
    """
    flat = min_max(grid_maps.float().flatten(1), dim=1)
    mean_map = flat.mean(dim=0).reshape(grid_maps.shape[1:])
    mean_points, mean_labels = points_from_map(mean_map, image_size, threshold, downsample)
    points, labels = [mean_points[mean_labels == 0]], [mean_labels[mean_labels == 0]]
    for grid_map in grid_maps:
        own_points, own_labels = points_from_map(grid_map, image_size, threshold, downsample)
        points.append(own_points[own_labels == 1])
        labels.append(own_labels[own_labels == 1])
    return np.concatenate(points).reshape(-1, 2), np.concatenate(labels)
