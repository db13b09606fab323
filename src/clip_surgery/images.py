"""Reading images from disk and turning them into CLIP input tensors."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .defaults import MAX_INPUT_SIDE
from .errors import ImageError, InputFileError
from .typedefs import Size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def set_max_pixels(pixels: int | None) -> None:
    """Raise (or lower) Pillow's decompression-bomb limit; ``None`` removes it."""
    if pixels is not None and pixels <= 0:
        raise ImageError(f"the pixel limit must be positive, got {pixels}")
    Image.MAX_IMAGE_PIXELS = pixels


def open_image(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Open an image file as RGB, upright (its EXIF orientation applied), with a clear error for
    a missing, corrupt or oversized (decompression bomb) file.

    ``max_side``: a larger image is reduced while it is decoded (JPEG's DCT scaling, then a
    bicubic resize keeping the aspect ratio), so an 8000 x 6000 photo never exists in memory at
    full size."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"image not found: {path}")
    if max_side is not None and max_side <= 0:
        raise ImageError(f"the largest image side must be positive, got {max_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if max_side is not None and max(image.size) > max_side:
                    image.thumbnail((max_side, max_side), Image.BICUBIC)  # drafts, then loads
                else:
                    image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(_bomb_message(path, error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        detail = " ".join(str(error).split())[:160]
        raise InputFileError(f"cannot read image {path}: {detail}") from None


def _bomb_message(path: Path, error: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else None
    size = f"{pixels} pixels" if pixels else "too many pixels"
    return (
        f"image {path} has {size}, over the limit of {Image.MAX_IMAGE_PIXELS} that guards "
        f"against decompression bombs; allow it with --max-pixels {pixels or 'N'} "
        "(Python: clip_surgery.images.set_max_pixels(N))"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any common PIL mode to 8-bit RGB; transparency is composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_depth_to_rgb(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageError(f"unsupported image mode {image.mode!r}: {error}") from error


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float grayscale image to 8 bits by its nominal range."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F" and values.size and values.max() <= 1.0:
        top = 1.0
    elif values.size and values.max() > 255:
        top = 65535.0 if values.max() <= 65535 else float(values.max())
    else:
        top = 255.0
    scaled = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def as_hw(size: Size, limit: int | None = MAX_INPUT_SIDE) -> tuple[int, int]:
    """Return (height, width) from an int or a pair, checking it is positive and, for a model
    input, at most ``limit`` pixels a side (``None``: any size, e.g. for output maps)."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ImageError(f"image size must be positive, got {size}")
    if limit is not None and max(height, width) > limit:
        raise ImageError(
            f"input size {size} is over the limit of {limit} pixels a side "
            "(CLIP models are trained at 224-448)"
        )
    return int(height), int(width)


def resize_whole(image: Image.Image, size: Size) -> Image.Image:
    """The whole image as RGB at ``size`` (bicubic, no crop): what every model input starts as."""
    height, width = as_hw(size)
    return to_rgb(image).resize((width, height), Image.BICUBIC)


def preprocess(
    image: Image.Image,
    size: Size,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """Resize the whole image (bicubic, no crop) and normalise: Tensor[3, H, W]."""
    array = np.asarray(resize_whole(image, size), dtype=np.float32) / 255.0
    array = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (array - mean_t) / std_t


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (non-recursive, sorted) into image paths; check they exist."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputFileError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {item}")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise InputFileError(f"image not found: {item}")
    return paths
