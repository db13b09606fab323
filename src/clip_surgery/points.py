"""Text to point prompts for SAM (docs/method.md, section 5).

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


def _cells(grid_map: torch.Tensor, downsample: int) -> tuple[torch.Tensor, int, int]:
    """The map downsampled by ``downsample`` (bilinear) and min-maxed, flattened; cell grid."""
    if grid_map.dim() != 2:
        raise ValueError(f"expected a [h, w] map, got shape {tuple(grid_map.shape)}")
    cells_h = max(grid_map.shape[0] // downsample, 1)
    cells_w = max(grid_map.shape[1] // downsample, 1)
    small = F.interpolate(
        grid_map.float()[None, None], size=(cells_h, cells_w), mode="bilinear", align_corners=False
    )
    return min_max(small.reshape(-1), dim=0), cells_h, cells_w


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the split maximising between-class variance."""
    histogram = torch.histc(values.float(), bins=bins, min=0.0, max=1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    weight = torch.cumsum(histogram, 0)
    mean = torch.cumsum(histogram * centres, 0)
    total, total_mean = weight[-1], mean[-1]
    between = (total_mean * weight - mean * total) ** 2 / (weight * (total - weight)).clamp_min(
        1e-12
    )
    return float((torch.argmax(between[:-1]) + 1) / bins)


def _resolve(threshold: float | str, values: torch.Tensor) -> float:
    if threshold == "otsu":
        return otsu_threshold(values)
    if isinstance(threshold, str):
        raise ValueError(f"threshold must be a number or 'otsu', got {threshold!r}")
    return float(threshold)


def points_from_map(
    grid_map: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | str = 0.8,
    downsample: int = 2,
    *,
    max_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative points ``[K, 2]`` as ``(x, y)`` pixels, labels ``[K]`` (1, then 0).

    The ``[h, w]`` map is downsampled by ``downsample`` (bilinear) and min-maxed;
    ``k = min(#(value >= threshold), cells // 2)``; the k highest cells' centres are positive
    (ascending order) and the k lowest negative (ascending order), as in the reference.
    ``threshold="otsu"`` adapts the threshold to the map (Otsu's split of its histogram);
    ``max_points`` caps the points (half positive, half negative; the strongest are kept).
    """
    values, cells_h, cells_w = _cells(grid_map, downsample)
    order = torch.sort(values, stable=True).indices
    count = min(int((values >= _resolve(threshold, values)).sum()), values.numel() // 2)
    if max_points is not None:
        count = min(count, max(max_points // 2, 1))
    scale = (image_size[0] / cells_h, image_size[1] / cells_w)
    chosen = torch.cat([order[values.numel() - count :], order[:count]])
    points = _cell_centres(chosen, cells_w, scale, image_size).numpy()
    labels = np.concatenate([np.ones(count, np.int64), np.zeros(count, np.int64)])
    return points.reshape(-1, 2), labels


def _components(mask: np.ndarray) -> list[list[int]]:
    """4-connected components of a boolean grid, as lists of flat indices."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, members = [start], []
        seen[start] = True
        while stack:
            row, col = stack.pop()
            members.append(row * width + col)
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                r, c = row + dr, col + dc
                if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    stack.append((r, c))
        components.append(members)
    return components


def instance_prompts(
    grid_map: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | str = 0.8,
    downsample: int = 2,
    min_cells: int = 1,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One prompt per instance: each connected region of cells >= threshold gives a positive
    point at its peak; all share the negatives of ``points_from_map``. Largest region first."""
    values, cells_h, cells_w = _cells(grid_map, downsample)
    cutoff = _resolve(threshold, values)
    grid = values.reshape(cells_h, cells_w).numpy()
    regions = [r for r in _components(grid >= cutoff) if len(r) >= min_cells]
    regions.sort(key=lambda r: (-len(r), r[0]))
    all_points, all_labels = points_from_map(grid_map, image_size, threshold, downsample)
    negatives = all_points[all_labels == 0]
    scale = (image_size[0] / cells_h, image_size[1] / cells_w)
    prompts = []
    for region in regions:
        peak = max(region, key=lambda index: (grid.flat[index], -index))
        point = _cell_centres(torch.tensor([peak]), cells_w, scale, image_size).numpy()
        prompts.append(
            (
                np.concatenate([point, negatives]),
                np.concatenate([np.ones(1, np.int64), np.zeros(len(negatives), np.int64)]),
            )
        )
    return prompts


def box_from_map(
    grid_map: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | str = 0.8,
    downsample: int = 2,
) -> np.ndarray | None:
    """A box prompt ``[x0, y0, x1, y1]`` (pixels) around the cells >= threshold; None if none."""
    values, cells_h, cells_w = _cells(grid_map, downsample)
    grid = values.reshape(cells_h, cells_w) >= _resolve(threshold, values)
    if not grid.any() or values.max() == 0:
        return None
    rows, cols = torch.nonzero(grid, as_tuple=True)
    height, width = image_size
    scale_y, scale_x = height / cells_h, width / cells_w
    return np.array(
        [
            int(cols.min()) * scale_x,
            int(rows.min()) * scale_y,
            min((int(cols.max()) + 1) * scale_x, width) - 1,
            min((int(rows.max()) + 1) * scale_y, height) - 1,
        ],
        dtype=np.float32,
    )


def points_for_targets(
    grid_maps: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | str = 0.8,
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
