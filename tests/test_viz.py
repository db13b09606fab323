"""Overlays and grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image

from clip_surgery.viz import grid_figure, heatmap_rgb, overlay, save_png


def test_overlay_known_answer():
    image = Image.new("RGB", (4, 2), (100, 200, 50))
    zeros = overlay(image, torch.zeros(2, 4))  # jet(0) is dark blue (0, 0, 127.5)
    ones = overlay(image, np.ones((2, 4)))  # jet(1) is dark red (127.5, 0, 0)
    assert np.asarray(zeros)[0, 0].tolist() == [40, 80, 97]
    assert np.asarray(ones)[0, 0].tolist() == [117, 80, 20]


def test_overlay_resizes_the_map_to_the_image():
    image = photo((40, 30))
    heatmap = torch.zeros(3, 4)
    heatmap[:, 2:] = 1.0
    result = np.asarray(overlay(image, heatmap), dtype=np.int16)
    assert result.shape == (30, 40, 3)
    colours = heatmap_rgb(heatmap, (30, 40))  # (height, width)
    assert (
        colours[:, 0].tolist() == [[0, 0, 128]] * 30
        and colours[:, -1].tolist() == [[128, 0, 0]] * 30
    )
    with pytest.raises(ValueError):
        overlay(image, torch.zeros(1, 3, 4))


def test_grid_figure_png(tmp_path):
    figure = grid_figure(photo((64, 48)), torch.rand(5, 48, 64), list("abcde"), [0.1] * 5)
    path = save_png(figure, tmp_path / "sub" / "grid.png")
    picture = Image.open(path)
    assert picture.format == "PNG" and picture.size[0] > picture.size[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_save_png_leaves_nothing_on_failure(tmp_path):
    class Broken:
        def savefig(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_png(Broken(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
