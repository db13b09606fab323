"""Heatmap overlays and grids as PNG files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from .outputs import atomic_path  # noqa: E402

IMAGE_WEIGHT = 0.4  # the reference demo blends 0.4 image + 0.6 jet heatmap


def _map_array(heatmap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [0, 1] float map resized bilinearly to ``size`` = (height, width)."""
    tensor = torch.as_tensor(heatmap, dtype=torch.float32)
    if tensor.dim() != 2:
        raise ValueError(f"expected a [H, W] map, got shape {tuple(tensor.shape)}")
    height, width = size
    if tuple(tensor.shape) != (height, width):
        tensor = F.interpolate(
            tensor[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
    return tensor.clamp(0, 1).numpy()


def heatmap_rgb(heatmap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The jet-coloured ``uint8`` RGB picture of a [0, 1] map at ``size`` = (height, width)."""
    colours = matplotlib.colormaps["jet"](_map_array(heatmap, size))[..., :3]
    return (colours * 255).round().astype(np.uint8)


def overlay(image: Image.Image, heatmap: torch.Tensor | np.ndarray) -> Image.Image:
    """The image blended with its jet-coloured map (resized to the image), as RGB."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = heatmap_rgb(heatmap, (image.height, image.width)).astype(np.float32)
    blended = IMAGE_WEIGHT * rgb + (1 - IMAGE_WEIGHT) * heat
    return Image.fromarray(blended.clip(0, 255).round().astype(np.uint8))


def grid_figure(
    image: Image.Image,
    heatmaps: torch.Tensor,
    texts: Sequence[str],
    scores: Sequence[float] | None = None,
    columns: int = 4,
) -> plt.Figure:
    """A figure: the image, then one overlay per text titled with the text (and score)."""
    panels = len(texts) + 1
    columns = panels if panels <= columns + 1 else columns
    rows = math.ceil(panels / columns)
    panel_height = 3.2 * image.height / image.width + 0.4  # room for the title
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, panel_height * rows), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("input", fontsize=10)
    for index, text in enumerate(texts):
        axis = axes.flat[index + 1]
        axis.imshow(overlay(image, heatmaps[index]))
        title = text if scores is None else f"{text} ({scores[index]:.2f})"
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def save_png(picture: Image.Image | plt.Figure, path: str | Path) -> Path:
    """Write a PNG atomically (temporary file, then rename), so no half-written file remains."""
    with atomic_path(Path(path)) as temporary:
        if isinstance(picture, Image.Image):
            picture.save(temporary, format="PNG")
        else:
            picture.savefig(temporary, format="png", dpi=100)
            plt.close(picture)
    return Path(path)
