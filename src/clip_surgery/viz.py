"""Heatmap overlays and grids as PNG files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
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


@cache
def _jet_table() -> np.ndarray:
    """matplotlib's jet as a 256 x 3 ``uint8`` table (its own 256 entries, rounded)."""
    colours = matplotlib.colormaps["jet"](np.arange(256))[:, :3]
    return (colours * 255).round().astype(np.uint8)


def _jet(values: np.ndarray) -> np.ndarray:
    """``uint8`` jet colours of [0, 1] values: the entry matplotlib's colormap picks
    (``int(value * 256)``, 1.0 to the last), without its float64 RGBA copy."""
    index = np.minimum(values * np.float32(256), np.float32(255)).astype(np.uint8)
    return _jet_table()[index]


def heatmap_rgb(heatmap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The jet-coloured ``uint8`` RGB picture of a [0, 1] map at ``size`` = (height, width)."""
    return _jet(_map_array(heatmap, size))


OVERLAY_ROWS = 256  # rows blended at a time: bounded memory on large images


def overlay(image: Image.Image, heatmap: torch.Tensor | np.ndarray) -> Image.Image:
    """The image blended with its jet-coloured map (resized to the image), as RGB."""
    rgb = np.asarray(image.convert("RGB"))
    values = _map_array(heatmap, (image.height, image.width))
    blended = np.empty_like(rgb)
    for top in range(0, image.height, OVERLAY_ROWS):
        rows = slice(top, top + OVERLAY_ROWS)
        heat = _jet(values[rows]).astype(np.float32)
        mixed = IMAGE_WEIGHT * rgb[rows].astype(np.float32) + (1 - IMAGE_WEIGHT) * heat
        blended[rows] = mixed.clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(blended)


GRID_TEXTS = 23  # texts per grid page (with the input panel: 6 rows of 4)
GRID_PANEL_SIDE = 640  # grid panels show the image at most this long


def grid_figure(
    image: Image.Image,
    heatmaps: torch.Tensor,
    texts: Sequence[str],
    scores: Sequence[float] | None = None,
    columns: int = 4,
) -> plt.Figure:
    """A figure: the image, then one overlay per text titled with the text (and score).

    Panels show the image reduced to at most ``GRID_PANEL_SIDE`` pixels; pages of many texts
    are ``grid_pages``' job."""
    if max(image.size) > GRID_PANEL_SIDE:
        image = image.copy()
        image.thumbnail((GRID_PANEL_SIDE, GRID_PANEL_SIDE), Image.BICUBIC)
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


def save_grid_pages(
    image: Image.Image, result, index: int, texts: Sequence[str], scores, folder: Path
) -> list[Path]:
    """The grid figure of image ``index`` of an ``Explanation``, ``GRID_TEXTS`` texts a page:
    ``grid.png``, or ``grid-1.png``, ``grid-2.png``, ... when there are more."""
    from .outputs import grid_names

    if max(image.size) > GRID_PANEL_SIDE:
        image = image.copy()
        image.thumbnail((GRID_PANEL_SIDE, GRID_PANEL_SIDE), Image.BICUBIC)
    pages = [range(s, min(s + GRID_TEXTS, len(texts))) for s in range(0, len(texts), GRID_TEXTS)]
    paths = []
    for name, page in zip(grid_names(len(texts), GRID_TEXTS), pages, strict=True):
        maps = result.maps_at((image.height, image.width), index, list(page))
        figure = grid_figure(image, maps, [texts[k] for k in page], [scores[k] for k in page])
        paths.append(save_png(figure, folder / name))
    return paths
