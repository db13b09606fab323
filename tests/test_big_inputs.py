"""Big inputs: images reduced while decoding, bounded input size, overlays equal to matplotlib's
colouring in bounded memory, grids split into pages."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image

import clip_surgery
from clip_surgery import ImageError
from clip_surgery.cli import main
from clip_surgery.defaults import MAX_INPUT_SIDE
from clip_surgery.images import as_hw, open_image
from clip_surgery.viz import GRID_TEXTS, OVERLAY_ROWS, heatmap_rgb, overlay


def _jpeg(path, size, orientation: int | None = None):
    picture = photo(size, seed=3).resize(size)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    picture.save(path, quality=90, exif=exif)
    return path


def test_reduced_while_decoding_keeps_aspect_and_orientation(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", (3000, 2000))
    image = open_image(path, max_side=1000)
    assert image.size == (1000, 667)
    assert open_image(path).size == (3000, 2000)  # no limit: full size
    small = _jpeg(tmp_path / "small.jpg", (300, 200))
    assert open_image(small, max_side=1000).size == (300, 200)  # smaller images untouched
    rotated = _jpeg(tmp_path / "rotated.jpg", (3000, 2000), orientation=6)  # 90 degrees
    assert open_image(rotated, max_side=1000).size == (667, 1000)
    with pytest.raises(ImageError):
        open_image(path, max_side=0)


def test_reduced_image_is_close_to_a_full_decode_then_resize(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", (2400, 1600))
    reduced = np.asarray(open_image(path, max_side=600), dtype=np.float32)
    full = np.asarray(open_image(path).resize((600, 400), Image.BICUBIC), dtype=np.float32)
    assert np.abs(reduced - full).mean() < 3.0  # the same picture, another resampling path


def test_input_size_is_bounded_but_not_output_maps(vit_model):
    assert as_hw(MAX_INPUT_SIDE) == (MAX_INPUT_SIDE, MAX_INPUT_SIDE)
    with pytest.raises(ImageError, match="over the limit"):
        as_hw((224, MAX_INPUT_SIDE + 1))
    model = clip_surgery.wrap(vit_model)
    with pytest.raises(ImageError, match="over the limit"):
        model.explain(photo(), ["a", "b"], size=(224, MAX_INPUT_SIDE + 16))
    result = model.explain(photo(), ["a", "b"], output_size=(3000, 4000))  # maps may be big
    assert result.output_size == (3000, 4000)
    assert result.maps_at((30, 40)).shape == (1, 2, 30, 40)


def test_heatmap_colours_equal_matplotlib():
    values = torch.rand(37, 53, generator=torch.Generator().manual_seed(0))
    values[0, :4] = torch.tensor([0.0, 1.0, 255 / 256, 1 / 256])  # the table's edges
    expected = (matplotlib.colormaps["jet"](values.numpy())[..., :3] * 255).round()
    assert np.array_equal(heatmap_rgb(values, (37, 53)), expected.astype(np.uint8))


def test_overlay_in_row_chunks_equals_one_pass():
    height = 2 * OVERLAY_ROWS + 17
    image = photo((40, height), seed=1).resize((40, height))
    heatmap = torch.rand(5, 4, generator=torch.Generator().manual_seed(2))
    colours = heatmap_rgb(heatmap, (height, 40)).astype(np.float32)
    rgb = np.asarray(image, dtype=np.float32)
    expected = (0.4 * rgb + 0.6 * colours).clip(0, 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(overlay(image, heatmap)), expected)


def test_cli_size_limit_is_one_line(capsys, tmp_path):
    code = main(["explain", "x.png", "-t", "a", "--size", str(MAX_INPUT_SIDE + 1)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(MAX_INPUT_SIDE) in err[0]


def test_cli_big_jpeg_and_paged_grids(tmp_path, capsys, vit_checkpoint):
    path = _jpeg(tmp_path / "huge.jpg", (4000, 2400))
    texts = [f"thing {k}" for k in range(GRID_TEXTS + 2)]
    out = tmp_path / "out"
    args = ["explain", str(path), "-t", *texts, "--checkpoint", vit_checkpoint, "--quick-gelu"]
    assert main([*args, "--out", str(out), "--no-progress", "--max-side", "1000"]) == 0
    report = json.loads((out / "explain.json").read_text())
    record = report["images"][0]
    assert [p.rsplit("/", 1)[-1] for p in record["grid_pages"]] == ["grid-1.png", "grid-2.png"]
    assert record["grid"] == record["grid_pages"][0]
    assert len(record["texts"]) == len(texts)
    for entry in record["texts"]:
        assert Image.open(entry["overlay"]).size == (1000, 600)
    assert "grid-1.png" in report["naming"] or "grid-2.png" in report["naming"]
