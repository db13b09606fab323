"""Image reading, mode conversion and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image

from clip_surgery.errors import ImageError, InputFileError
from clip_surgery.images import (
    OPENAI_MEAN,
    OPENAI_STD,
    as_hw,
    list_images,
    open_image,
    preprocess,
    to_rgb,
)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        open_image(tmp_path / "nope.jpg")
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputFileError, match="cannot read image"):
        open_image(corrupt)
    truncated = tmp_path / "cut.jpg"
    photo((64, 64)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    with pytest.raises(InputFileError, match="cannot read image"):
        open_image(truncated)


def test_grayscale_becomes_grey_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L").save(tmp_path / "g.png")
    image = open_image(tmp_path / "g.png")
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [77, 77, 77]


def test_rgba_composited_over_white(tmp_path):
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[:2, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    array = np.asarray(open_image(tmp_path / "a.png"))
    assert array[0, 0].tolist() == [200, 0, 0]
    assert array[3, 0].tolist() == [255, 255, 255]


def test_palette_with_and_without_transparency(tmp_path):
    palette_image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette_image.save(tmp_path / "p.png")
    assert np.asarray(open_image(tmp_path / "p.png"))[0, 1].tolist() == [200, 100, 50]
    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "pt.png", transparency=0)
    array = np.asarray(open_image(tmp_path / "pt.png"))
    assert array[0, 0].tolist() == [255, 255, 255] and array[0, 1].tolist() == [200, 100, 50]


def test_sixteen_bit_scaled_by_range(tmp_path):
    values = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = open_image(tmp_path / "deep.png")
    grey = np.asarray(image)[..., 0]
    assert grey.tolist() == [[0, 255], [128, 4]]


def test_float_and_bilevel_modes():
    floats = Image.fromarray(np.array([[0.0, 1.0]], np.float32), mode="F")
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 255]
    bilevel = Image.new("1", (2, 1), 1)
    assert np.asarray(to_rgb(bilevel))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert to_rgb(cmyk).mode == "RGB"


def test_preprocess_is_bicubic_resize_and_clip_normalisation():
    image = photo((50, 30))
    tensor = preprocess(image, 32)
    resized = np.asarray(image.resize((32, 32), Image.BICUBIC), np.float32) / 255
    expected = torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(OPENAI_MEAN)[:, None, None]
    expected = expected / torch.tensor(OPENAI_STD)[:, None, None]
    assert tensor.shape == (3, 32, 32)
    assert torch.allclose(tensor, expected, atol=1e-6)
    assert preprocess(image, (48, 64)).shape == (3, 48, 64)


def test_sizes_and_listing(tmp_path):
    assert as_hw(5) == (5, 5) and as_hw((3, 4)) == (3, 4)
    with pytest.raises(ImageError):
        as_hw(0)
    photo().save(tmp_path / "b.png")
    photo().save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images([tmp_path])] == ["a.jpg", "b.png"]
    with pytest.raises(InputFileError, match="no images"):
        list_images([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [])
    with pytest.raises(InputFileError, match="not found"):
        list_images([tmp_path / "missing.png"])
